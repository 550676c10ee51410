"""The local tools' card channel (cms.runtime.agent_cards) over real mutual TLS: a script
and its answers reach the tool, other identities are refused, a vanished agent is an
AgentCardGone for the tool and not a hang."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest

from cms.identity import ADMIN, CARD_AGENT, PROVIDER
from cms.runtime.agent_cards import AgentCard, AgentCardGone, AgentCardServer
from cms.runtime.tls import TlsFiles, secure_channel
from cms.v1 import card_channel_pb2 as pb
from cms.v1 import card_channel_pb2_grpc as pb_grpc
from tests.support.pki import make_pki

SELECT = bytes.fromhex("00A4040000")
TIMEOUT = 30


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    pki = make_pki(tmp_path_factory.mktemp("pki"), (PROVIDER, CARD_AGENT, ADMIN))
    return {name: TlsFiles(pki.ca, f.cert, f.key) for name, f in pki.identities.items()}


class Tool:
    """A tool that runs one script per card and records what came of it."""

    def __init__(self) -> None:
        self.seen: queue.Queue[object] = queue.Queue()

    def handle(self, card: AgentCard) -> pb.SessionDone:
        try:
            answers = card.run([SELECT])
        except AgentCardGone as exc:
            self.seen.put(exc)
            return pb.SessionDone(outcome=pb.SessionDone.FAILED, message=str(exc))
        self.seen.put((card.name, answers))
        return pb.SessionDone(outcome=pb.SessionDone.OK, message="done")


@pytest.fixture()
def server(tls: dict[str, TlsFiles]) -> Iterator[tuple[AgentCardServer, Tool]]:
    tool = Tool()
    with AgentCardServer("127.0.0.1:0", tls[PROVIDER], frozenset({CARD_AGENT}),
                         tool.handle) as running:
        yield running, tool


def _stream(server: AgentCardServer, files: TlsFiles):
    """An agent's stream that has said hello: (what it sends next, channel, replies)."""
    messages: queue.Queue = queue.Queue()
    messages.put(pb.AgentMessage(hello=pb.AgentHello(agent_label="station-1",
                                                     reader="Reader 0")))
    channel = secure_channel(server.address, files, server_identity=PROVIDER)

    def requests() -> Iterator[pb.AgentMessage]:
        while (message := messages.get()) is not None:
            yield message

    return messages, channel, pb_grpc.CardChannelStub(channel).Connect(requests(),
                                                                        timeout=TIMEOUT)


def _answer(messages: queue.Queue, replies, outcome: int, **result) -> pb.SessionDone:
    """Answer the tool's script with ``outcome``; the SessionDone that follows."""
    script = next(replies).script
    messages.put(pb.AgentMessage(result=pb.ScriptResult(
        script_id=script.script_id, outcome=outcome, **result)))
    done = next(replies).done
    messages.put(None)
    return done


def test_a_script_and_its_answers_reach_the_tool(server, tls) -> None:
    running, tool = server
    messages, channel, replies = _stream(running, tls[CARD_AGENT])
    try:
        done = _answer(messages, replies, pb.SCRIPT_COMPLETED,
                       responses=[pb.ApduResponse(data=b"\x6f\x00", sw=0x9000)])
        assert done.outcome == pb.SessionDone.OK
    finally:
        channel.close()
    assert tool.seen.get(timeout=TIMEOUT) == ("station-1 (Reader 0)", [(b"\x6f\x00", 0x9000)])


def test_another_identity_is_refused(server, tls) -> None:
    running, tool = server
    messages, channel, replies = _stream(running, tls[ADMIN])
    try:
        with pytest.raises(grpc.RpcError) as err:
            next(replies)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin may not connect a card" in err.value.details()
    finally:
        messages.put(None)
        channel.close()
    assert tool.seen.empty()


def test_an_agent_that_goes_away_ends_the_tools_card(server, tls) -> None:
    running, tool = server
    messages, channel, replies = _stream(running, tls[CARD_AGENT])
    script = next(replies).script
    assert [c.apdu for c in script.commands] == [SELECT] and script.commands[0].sensitive
    messages.put(None)                # the agent half-closes without answering
    try:
        assert next(replies).done.outcome == pb.SessionDone.FAILED
    finally:
        channel.close()
    assert isinstance(tool.seen.get(timeout=TIMEOUT), AgentCardGone)


def test_a_card_gone_in_the_reader_is_reported(server, tls) -> None:
    running, tool = server
    messages, channel, replies = _stream(running, tls[CARD_AGENT])
    try:
        done = _answer(messages, replies, pb.SCRIPT_CARD_REMOVED, message="pulled out")
        assert done.outcome == pb.SessionDone.FAILED
    finally:
        channel.close()
    gone = tool.seen.get(timeout=TIMEOUT)
    assert isinstance(gone, AgentCardGone) and "pulled out" in str(gone)
