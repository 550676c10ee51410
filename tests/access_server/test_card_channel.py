"""The access server's card channel against real processes (launcher: proxy + access server,
mutual TLS, SQLite) with the card agent's session code and an in-process virtual card."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from card_agent.session import AgentInfo, run_session
from cms.runtime.client import load_endpoints
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc, card_channel_pb2_grpc
from cms.v1 import card_channel_pb2 as pb
from tests.support.contacts import contact
from tests.support.launcher import dev_stack
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STATION = AgentInfo(role=pb.PERSONALIZATION_STATION, label="test-station")
USER = AgentInfo(role=pb.USER_PC, label="test-pc")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("card-channel-stack")
    with dev_stack(directory) as endpoints_path:
        yield endpoints_path


def _card(tmp_path: Path, name: str = "card.json", **kwargs) -> tuple[Path, str]:
    path = tmp_path / name
    state = create_card(path, transport_master=bytes(range(16)), **kwargs)
    return path, state.psd_id


def _session(stack: Path, card: Path, info: AgentInfo):
    return contact(stack, card, info)


def _key_sets(card: Path) -> dict:
    """The card's key sets (INITIALIZE UPDATE moves its sequence counter; keys must not move)."""
    from virtual_psd.state import load_state

    return dict(isd_state(load_state(card)).key_sets)


def _register(stack: Path, psd_id: str) -> None:
    channel = load_endpoints(stack).channel("access_server", "admin")
    access_pb2_grpc.PsdRegistryStub(channel).RegisterPsds(
        apb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
    channel.close()


class GarbageCard:
    """A 'card' that answers every command with 9000 and bytes that mean nothing."""

    atr = bytes.fromhex("3B800180")
    reader_name = "garbage reader"

    def transmit(self, apdu: bytes) -> bytes:
        return b"\x9f\x7f\x03abc\x90\x00"

    def close(self) -> None:
        pass


def test_an_unregistered_card_is_refused_and_left_untouched(stack: Path, tmp_path: Path) -> None:
    card, psd_id = _card(tmp_path)
    before = _key_sets(card)
    report = _session(stack, card, STATION)
    assert report.done is not None
    assert report.done.outcome == pb.SessionDone.REFUSED
    assert psd_id in report.done.message and "not registered" in report.done.message
    assert report.scripts_run == 1                      # the probe only
    assert _key_sets(card) == before


def test_a_card_answering_garbage_fails_clearly_and_the_server_keeps_serving(
        stack: Path, tmp_path: Path) -> None:
    channel = load_endpoints(stack).channel("access_server", "card-agent")
    report = run_session(GarbageCard(), channel, STATION, deadline_s=60)
    channel.close()
    assert report.done is not None and report.done.outcome == pb.SessionDone.FAILED
    assert "CPLC is malformed" in report.done.message
    card, _ = _card(tmp_path)
    assert _session(stack, card, STATION).done.outcome == pb.SessionDone.REFUSED


def test_a_registered_blank_card_without_key_blocks_in_hsm1_fails_clearly(
        stack: Path, tmp_path: Path) -> None:
    card, psd_id = _card(tmp_path)
    _register(stack, psd_id)
    before = _key_sets(card)
    report = _session(stack, card, STATION)
    assert report.done.outcome == pb.SessionDone.FAILED
    assert "HSM1 holds no usable mk key block" in report.done.message
    assert _key_sets(card) == before
    assert _session(stack, card, USER).done.outcome == pb.SessionDone.NOTHING_TO_DO


def test_a_revoked_card_is_refused(stack: Path, tmp_path: Path) -> None:
    card, psd_id = _card(tmp_path)
    _register(stack, psd_id)
    channel = load_endpoints(stack).channel("access_server", "admin")
    access_pb2_grpc.PsdRegistryStub(channel).RevokePsd(
        apb.RevokePsdRequest(psd_id=psd_id, reason="stolen"), timeout=30)
    channel.close()
    report = _session(stack, card, USER)
    assert report.done.outcome == pb.SessionDone.REFUSED and "revoked" in report.done.message


def _raw_connect(stack: Path, messages: list[pb.AgentMessage], identity: str = "card-agent"):
    channel = load_endpoints(stack).channel("access_server", identity)
    stub = card_channel_pb2_grpc.CardChannelStub(channel)
    try:
        return list(stub.Connect(iter(messages), timeout=30))
    finally:
        channel.close()


@pytest.mark.parametrize("messages, detail", [
    ([], "first message must be hello"),
    ([pb.AgentMessage(result=pb.ScriptResult(script_id=1))], "first message must be hello"),
    ([pb.AgentMessage(hello=pb.AgentHello(role=pb.AGENT_ROLE_UNSPECIFIED))], "hello.role"),
    ([pb.AgentMessage(hello=pb.AgentHello(role=pb.USER_PC)),
      pb.AgentMessage(result=pb.ScriptResult(script_id=7))], "expected the result of script 1"),
    ([pb.AgentMessage(hello=pb.AgentHello(role=pb.USER_PC)),
      pb.AgentMessage(hello=pb.AgentHello(role=pb.USER_PC))], "expected a script result"),
    ([pb.AgentMessage(hello=pb.AgentHello(role=pb.USER_PC)),
      pb.AgentMessage(result=pb.ScriptResult(
          script_id=1, responses=[pb.ApduResponse(data=b"x", sw=0x9000)] * 9))],
     "had 4 commands"),
    ([pb.AgentMessage(hello=pb.AgentHello(role=pb.USER_PC)),
      pb.AgentMessage(result=pb.ScriptResult(
          script_id=1, responses=[pb.ApduResponse(sw=0x1FFFF)]))], "out of range"),
])
def test_garbage_from_the_agent_gets_invalid_argument(stack: Path, messages, detail) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _raw_connect(stack, messages)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in err.value.details()


def test_only_the_card_agent_identity_opens_card_channels(stack: Path) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _raw_connect(stack, [pb.AgentMessage(hello=pb.AgentHello(role=pb.USER_PC))], "admin")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
