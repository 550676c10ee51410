"""Sessions in process, over real gRPC with mutual TLS: how each kind of ending is reported."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from card_agent.cancel import Cancellation
from card_agent.session import AgentInfo, SessionStatus, run_session, run_session_async
from cms.v1 import card_channel_pb2 as pb
from deploy.pki import Pki
from tests.card_agent.cards import TEST_ATR, TEST_READER, ScriptedCard
from tests.card_agent.channel_server import ChannelServer, free_port
from tests.card_agent.conftest import target_for
from tests.card_agent.scripts import command, done_message, script_message

SELECT = "00a4040008a000000151000000"
GET_DATA = "80ca9f7f00"
STATION = AgentInfo(role=pb.PERSONALIZATION_STATION, label="station-7")


def two_scripts_then_ok(hello, receive, context):
    yield script_message(1, command(SELECT), command(GET_DATA))
    first = receive().result
    second = script_message(2, command(GET_DATA, 0x6A88, 0x9000))
    second.script.steps.append("read PSD id")
    yield second
    receive()
    yield done_message(pb.SessionDone.OK, message="keys installed", psd_id=first.responses[1]
                       .data.hex(), steps=("read PSD id", "installed MK v1"))


def test_full_session(pki: Pki) -> None:
    card = ScriptedCard(lambda apdu: b"\x01\x02\x90\x00")
    with ChannelServer(pki, two_scripts_then_ok) as server:
        channel = target_for(pki, server.address).open_channel()
        live: list[tuple[int, str]] = []
        report = run_session(card, channel, STATION,
                             on_steps=lambda steps: live.extend((len(card.sent), s)
                                                                for s in steps))
        channel.close()
    assert report.status is SessionStatus.DONE and report.ok
    assert report.done.psd_id == "0102"
    # The step came with script 2 and was shown before its command reached the card.
    assert live == [(2, "read PSD id")]
    assert list(report.done.steps) == ["read PSD id", "installed MK v1"]
    assert report.scripts_run == 2
    hello = server.record.hellos[0]
    assert hello.role == pb.PERSONALIZATION_STATION
    assert hello.reader == TEST_READER and hello.atr == TEST_ATR
    assert hello.agent_label == "station-7" and hello.agent_version
    assert server.record.identities == ["card-agent"]  # the client certificate was used
    assert [r.outcome for r in server.record.results] == [pb.SCRIPT_COMPLETED] * 2
    assert len(card.sent) == 3


def test_garbage_command_gets_bad_script_and_session_goes_on(pki: Pki) -> None:
    def garbage(hello, receive, context):
        yield script_message(1, command(SELECT), command(b"\x80\xca"))
        receive()
        yield script_message(2, command(GET_DATA))
        receive()
        yield done_message(pb.SessionDone.NOTHING_TO_DO)

    card = ScriptedCard()
    with ChannelServer(pki, garbage) as server:
        channel = target_for(pki, server.address).open_channel()
        report = run_session(card, channel, AgentInfo())
        channel.close()
    assert report.ok
    assert [r.outcome for r in server.record.results] == [
        pb.SCRIPT_BAD_SCRIPT, pb.SCRIPT_COMPLETED]
    assert server.record.results[0].stopped_at == 1
    assert card.sent == [bytes.fromhex(GET_DATA)]  # nothing of the bad script ran


def test_unreachable_server_is_not_connected(pki: Pki) -> None:
    card = ScriptedCard()
    channel = target_for(pki, f"127.0.0.1:{free_port()}").open_channel()
    report = run_session(card, channel, AgentInfo(), deadline_s=10)
    channel.close()
    assert report.status is SessionStatus.NOT_CONNECTED
    assert report.code == grpc.StatusCode.UNAVAILABLE
    assert card.sent == []


def test_refusal_before_the_session_is_refused(pki: Pki) -> None:
    def refuse(hello, receive, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "agent not enrolled")
        yield  # pragma: no cover

    with ChannelServer(pki, refuse) as server:
        channel = target_for(pki, server.address).open_channel()
        report = run_session(ScriptedCard(), channel, AgentInfo())
        channel.close()
    assert report.status is SessionStatus.REFUSED
    assert "agent not enrolled" in report.error


def test_server_failure_mid_session_is_broken(pki: Pki) -> None:
    def fail_after_one(hello, receive, context):
        yield script_message(1, command(SELECT))
        receive()
        context.abort(grpc.StatusCode.INTERNAL, "database gone")
        yield  # pragma: no cover

    with ChannelServer(pki, fail_after_one) as server:
        channel = target_for(pki, server.address).open_channel()
        report = run_session(ScriptedCard(), channel, AgentInfo())
        channel.close()
    assert report.status is SessionStatus.BROKEN
    assert report.scripts_run == 1 and report.done is None
    assert "database gone" in report.error


def test_stream_ended_without_done_is_broken(pki: Pki) -> None:
    def hang_up(hello, receive, context):
        yield script_message(1, command(SELECT))
        receive()

    with ChannelServer(pki, hang_up) as server:
        channel = target_for(pki, server.address).open_channel()
        report = run_session(ScriptedCard(), channel, AgentInfo())
        channel.close()
    assert report.status is SessionStatus.BROKEN
    assert "without SessionDone" in report.error


def test_deadline_ends_a_stalled_session(pki: Pki) -> None:
    release = threading.Event()

    def stall(hello, receive, context):
        yield script_message(1, command(SELECT))
        receive()
        release.wait(10)
        yield done_message()

    with ChannelServer(pki, stall) as server:
        channel = target_for(pki, server.address).open_channel()
        report = run_session(ScriptedCard(), channel, AgentInfo(), deadline_s=2.5)
        release.set()
        channel.close()
    assert report.status is SessionStatus.BROKEN
    assert report.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancellation_stops_a_waiting_session(pki: Pki) -> None:
    cancellation = Cancellation()
    release = threading.Event()

    def slow(hello, receive, context):
        yield script_message(1, command(SELECT))
        receive()
        cancellation.cancel()  # as a signal would, while the agent waits for us
        release.wait(10)
        yield done_message()

    with ChannelServer(pki, slow) as server:
        channel = target_for(pki, server.address).open_channel()
        report = run_session(ScriptedCard(), channel, AgentInfo(), cancellation=cancellation)
        release.set()
        channel.close()
    assert report.status is SessionStatus.CANCELLED


@pytest.mark.parametrize("agents", [24])
def test_many_async_sessions_share_one_channel(pki: Pki, agents: int) -> None:
    """The fleet form: many agents, in-process cards, one aio channel, one event loop."""

    def echo_psd(hello, receive, context):
        yield script_message(1, command(GET_DATA))
        result = receive().result
        yield done_message(pb.SessionDone.OK, psd_id=result.responses[0].data.hex())

    async def fleet(address: str) -> list:
        channel = target_for(pki, address).open_aio_channel()
        cards = [ScriptedCard(lambda apdu, i=i: bytes([i]) + b"\x90\x00") for i in range(agents)]
        try:
            return await asyncio.gather(*(
                run_session_async(card, channel, AgentInfo(label=f"agent-{i}"))
                for i, card in enumerate(cards)))
        finally:
            await channel.close()

    with ChannelServer(pki, echo_psd) as server:
        reports = asyncio.run(fleet(server.address))
    assert all(r.ok for r in reports)
    assert sorted(r.done.psd_id for r in reports) == sorted(f"{i:02x}" for i in range(agents))
    assert len(server.record.hellos) == agents


def test_async_session_reports_a_broken_stream(pki: Pki) -> None:
    def fail_after_one(hello, receive, context):
        yield script_message(1, command(SELECT))
        receive()
        context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
        yield  # pragma: no cover

    async def one(address: str):
        channel = target_for(pki, address).open_aio_channel()
        try:
            return await run_session_async(ScriptedCard(), channel, AgentInfo())
        finally:
            await channel.close()

    with ChannelServer(pki, fail_after_one) as server:
        report = asyncio.run(one(server.address))
    assert report.status is SessionStatus.BROKEN
    assert report.scripts_run == 1


def test_server_lingering_after_done_does_not_hold_the_agent(
        pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    import card_agent.session as session_module

    monkeypatch.setattr(session_module, "DONE_GRACE_S", 0.2)
    release = threading.Event()

    def linger(hello, receive, context):
        yield done_message(pb.SessionDone.OK, psd_id="77")
        release.wait(30)  # a server that keeps its side open after SessionDone

    async def one_async(address: str):
        channel = target_for(pki, address).open_aio_channel()
        try:
            return await run_session_async(ScriptedCard(), channel, AgentInfo())
        finally:
            await channel.close()

    with ChannelServer(pki, linger) as server:
        channel = target_for(pki, server.address).open_channel()
        report = run_session(ScriptedCard(), channel, AgentInfo())
        channel.close()
        async_report = asyncio.run(one_async(server.address))
        returned_before_release = not release.is_set()
        release.set()
    assert returned_before_release
    assert report.ok and report.done.psd_id == "77"
    assert async_report.ok
