"""Idle card channel streams cannot starve the access server (real processes, mutual TLS).

An agent may open streams and then send nothing: 500 of them (most saying
hello, some not even that) must not keep the health check, an operator's
`cms psd list` or a real card contact from being answered, and the server
must end each of them once its timeout passes. A peer over its stream limit
is refused at once. The stack runs with short timeouts and limits sized for
the test (``restart_with``).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from card_agent.session import AgentInfo, run_session
from cms.runtime.client import load_endpoints
from cms.runtime.tls import channel_credentials
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc, card_channel_pb2_grpc
from cms.v1 import card_channel_pb2 as pb
from tests.support.card_keys import provision
from tests.support.launcher import dev_stack
from tests.support.reconfigure import restart_with
from virtual_psd.agent_source import VirtualTransport
from virtual_psd.card import VirtualCard
from virtual_psd.factory import new_card_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TIMEOUT_S = 25
"""The stack's hello and answer timeouts: longer than every check below may take."""
PER_PEER = 520
IDLE_WITH_HELLO = 400
IDLE_SILENT = 100
CALL_S = 10
"""'Answered within a few seconds': a starved server fails these, however slow the machine."""
CLI_S = 20
"""The same for `cms psd list`, which starts a Python process first."""
MASTER = bytes(range(16))
STATION = AgentInfo(role=pb.PERSONALIZATION_STATION, label="limits-station")
HELLO = pb.AgentMessage(hello=pb.AgentHello(role=pb.USER_PC, agent_label="idle"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("card-channel-limits")
    with dev_stack(directory) as endpoints_path:
        restart_with(directory, "access_server", {"card_channel": {
            "hello_timeout_seconds": TIMEOUT_S, "answer_timeout_seconds": TIMEOUT_S,
            "max_streams": 1000, "max_streams_per_peer": PER_PEER}})
        provision(endpoints_path, MASTER)
        yield endpoints_path


# -- the idle agent's side: aio streams that say hello (or not) and then nothing ----

class IdleStreams:
    """Streams opened over a few connections and left waiting."""

    def __init__(self, endpoints_path: Path, connections: int = 4) -> None:
        ep = load_endpoints(endpoints_path)
        credentials = channel_credentials(ep.tls("card-agent"))
        # Separate connections, as an agent opening many would.
        self.channels = [grpc.aio.secure_channel(ep.grpc_address("access_server"), credentials,
                                                 options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(connections)]
        self.calls: list[tuple[bool, grpc.aio.StreamStreamCall]] = []

    async def open(self, with_hello: int, silent: int) -> None:
        """Open the streams; returns once each hello-sender got the server's first script
        (so every one of them is counted by the server)."""
        for i in range(with_hello + silent):
            stub = card_channel_pb2_grpc.CardChannelStub(self.channels[i % len(self.channels)])
            call = stub.Connect(timeout=300)     # the server's deadline comes first
            if i < with_hello:
                await call.write(HELLO)
            self.calls.append((i < with_hello, call))
        firsts = await asyncio.wait_for(asyncio.gather(
            *(call.read() for hello, call in self.calls if hello)), CALL_S * 3)
        assert all(m is not grpc.aio.EOF and m.HasField("script") for m in firsts)

    def still_open(self) -> int:
        return sum(not call.done() for _, call in self.calls)

    async def endings(self) -> list[tuple[bool, grpc.StatusCode, str]]:
        async def ending(hello: bool, call: grpc.aio.StreamStreamCall):
            return hello, await call.code(), await call.details()
        return await asyncio.gather(*(ending(h, c) for h, c in self.calls))

    async def close(self) -> None:
        for _, call in self.calls:
            call.cancel()
        for channel in self.channels:
            await channel.close()


# -- what must keep working meanwhile ------------------------------------------------

def _health(endpoints_path: Path) -> int:
    with load_endpoints(endpoints_path).channel("access_server", "admin") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="cms.v1.CardChannel"), timeout=CALL_S).status


def _psd_list(endpoints_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cms.cli", "psd", "--endpoints",
                           str(endpoints_path), "list"],
                          capture_output=True, text=True, timeout=CLI_S, check=False)


def _metrics(endpoints_path: Path) -> str:
    import urllib.request

    url = load_endpoints(endpoints_path).metrics_url("access_server")
    with urllib.request.urlopen(url, timeout=CALL_S) as reply:   # noqa: S310 (loopback)
        return reply.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    for line in text.splitlines():
        if (line.startswith((name + "{", name + " "))
                and all(f'{k}="{v}"' in line for k, v in labels.items())):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _cuts(metrics: str) -> tuple[float, float]:
    """Streams ended at the hello timeout and at the answer timeout so far."""
    return tuple(_metric(metrics, "cms_access_card_channels_cut_total", reason=reason)
                 for reason in ("hello_timeout_seconds", "answer_timeout_seconds"))


def _new_registered_card(endpoints_path: Path) -> VirtualCard:
    card = VirtualCard(new_card_state(transport_master=MASTER))
    with load_endpoints(endpoints_path).channel("access_server", "admin") as channel:
        access_pb2_grpc.PsdRegistryStub(channel).RegisterPsds(
            apb.RegisterPsdsRequest(psd_ids=[card.state.psd_id]), timeout=CALL_S)
    return card


def _install(endpoints_path: Path, card: VirtualCard):
    """A real contact: A1 on an in-process virtual card, through the proxy and the store."""
    transport = VirtualTransport(card)
    with load_endpoints(endpoints_path).channel("access_server", "card-agent") as channel:
        try:
            return run_session(transport, channel, STATION, deadline_s=CALL_S)
        finally:
            transport.close()


# -- the tests -------------------------------------------------------------------------

def test_idle_streams_neither_starve_the_server_nor_stay_open(stack: Path) -> None:
    async def scenario() -> None:
        idle = IdleStreams(stack)
        try:
            await idle.open(IDLE_WITH_HELLO, IDLE_SILENT)
            assert idle.still_open() == IDLE_WITH_HELLO + IDLE_SILENT

            assert await asyncio.to_thread(_health, stack) == \
                health_pb2.HealthCheckResponse.SERVING
            card = await asyncio.to_thread(_new_registered_card, stack)
            listed = await asyncio.to_thread(_psd_list, stack)
            assert listed.returncode == 0, listed.stderr
            assert card.state.psd_id in listed.stdout
            report = await asyncio.to_thread(_install, stack, card)
            assert report.ok, report.error or report.done
            assert report.done.outcome == pb.SessionDone.OK

            # All of that happened while every idle stream was still waiting ...
            assert idle.still_open() == IDLE_WITH_HELLO + IDLE_SILENT
            # ... and the server ends each of them once its timeout has passed.
            before = _cuts(await asyncio.to_thread(_metrics, stack))
            endings = await asyncio.wait_for(idle.endings(), TIMEOUT_S + 30)
        finally:
            await idle.close()
        after = _cuts(await asyncio.to_thread(_metrics, stack))
        assert after[0] - before[0] == IDLE_SILENT
        assert after[1] - before[1] == IDLE_WITH_HELLO
        for hello, code, details in endings:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
            if hello:
                assert details == (f"no result of script 1 within {TIMEOUT_S} s "
                                   f"(card_channel.answer_timeout_seconds)")
            else:
                assert details == (f"no hello within {TIMEOUT_S} s "
                                   f"(card_channel.hello_timeout_seconds)")

    asyncio.run(scenario())


def test_a_peer_over_its_limit_is_refused_at_once_and_served_again_later(stack: Path) -> None:
    async def scenario() -> None:
        idle = IdleStreams(stack)
        try:
            await idle.open(PER_PEER, 0)
            with pytest.raises(grpc.RpcError) as refused:
                await asyncio.to_thread(_raw_hello, stack)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == (
                f"127.0.0.1 has {PER_PEER} card channels open, its limit "
                f"(card_channel.max_streams_per_peer); try again later")
            assert await asyncio.to_thread(_health, stack) == \
                health_pb2.HealthCheckResponse.SERVING
            metrics = await asyncio.to_thread(_metrics, stack)
            assert _metric(metrics, "cms_access_card_channels_open") == PER_PEER
            assert _metric(metrics, "cms_access_card_channels_cut_total",
                           reason="stream_limit") >= 1
        finally:
            await idle.close()          # the agent leaves: its streams are released
        card = await asyncio.to_thread(_new_registered_card, stack)
        report = await asyncio.to_thread(_install_when_admitted, stack, card)
        assert report.ok, report.error or report.done

    asyncio.run(scenario())


def test_operator_errors_keep_their_status_on_the_asyncio_server(stack: Path) -> None:
    """The operator services are plain servicers run in threads of the aio server: an error
    still reaches the caller with its status and message, and the metrics count that status."""
    with load_endpoints(stack).channel("access_server", "admin") as channel:
        with pytest.raises(grpc.RpcError) as err:
            access_pb2_grpc.PsdRegistryStub(channel).GetPsd(
                apb.GetPsdRequest(psd_id="00000000000000000000"), timeout=CALL_S)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "00000000000000000000" in err.value.details()
    assert _metric(_metrics(stack), "cms_grpc_server_handled_total",
                   service="cms.v1.PsdRegistry", method="GetPsd", code="NOT_FOUND") >= 1


def _raw_hello(endpoints_path: Path) -> list[pb.ServerMessage]:
    with load_endpoints(endpoints_path).channel("access_server", "card-agent") as channel:
        stub = card_channel_pb2_grpc.CardChannelStub(channel)
        return list(stub.Connect(iter([HELLO]), timeout=CALL_S))


def _install_when_admitted(endpoints_path: Path, card: VirtualCard):
    """The server releases the cancelled streams as it learns of them: a contact refused
    meanwhile is tried again, as an agent would after its backoff."""
    import time

    deadline = time.monotonic() + CALL_S
    while True:
        report = _install(endpoints_path, card)
        if report.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
            return report
        time.sleep(0.2)
