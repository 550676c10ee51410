"""The runner and the agent loop on the in-process virtual card, faults included."""

from __future__ import annotations

from pathlib import Path

import pytest

from card_agent.agent import AgentSettings, CardAgent, ExitStatus
from card_agent.backoff import Backoff
from card_agent.cancel import Cancellation
from card_agent.runner import run_script
from card_agent.session import AgentInfo, SessionReport
from cms.v1 import card_channel_pb2 as pb
from deploy.pki import Pki
from tests.card_agent.channel_server import ChannelServer
from tests.card_agent.conftest import target_for
from tests.card_agent.scripts import command, done_message, script, script_message
from virtual_psd.agent_source import (
    VirtualCardError,
    VirtualCardSource,
    VirtualTransport,
    open_virtual_card,
)

card_module = pytest.importorskip("virtual_psd.card")
faults_module = pytest.importorskip("virtual_psd.faults")
factory = pytest.importorskip("virtual_psd.factory")

PSD_ID = "0A0B0C0D0E0F10111213"
SELECT_ISD = "00a4040000"
GET_CPLC = "80ca9f7f00"
SELECT_MISSING = "00a4040005d276000099"
# PUT KEY outside a secure channel: the card must refuse it.
PUT_KEY_DATA = "01" + "88" + "10" + "00" * 16 + "03" + "000000"
PUT_KEY = "80d80101" + f"{len(PUT_KEY_DATA) // 2:02x}" + PUT_KEY_DATA


def new_card(plan: str = ""):
    return card_module.VirtualCard(factory.new_card_state(psd_id=PSD_ID),
                                   faults=faults_module.FaultPlan.parse(plan))


def test_runner_on_virtual_card_completes_and_reads_cplc() -> None:
    transport = VirtualTransport(new_card())
    result = run_script(transport, script(1, command(SELECT_ISD), command(GET_CPLC)))
    assert result.outcome == pb.SCRIPT_COMPLETED
    assert result.responses[1].data[:2] == b"\x9f\x7f"
    assert transport.atr[0] == 0x3B


def test_runner_masks_and_first_unexpected_status_on_virtual_card() -> None:
    card = new_card()
    transport = VirtualTransport(card)
    result = run_script(transport, script(
        2,
        command(SELECT_MISSING, (0x6A00, 0xFF00)),   # "not found" of any kind is fine here
        command(SELECT_ISD),
        command(PUT_KEY, sensitive=True),           # refused: no secure channel
        command(GET_CPLC),
    ))
    assert result.outcome == pb.SCRIPT_UNEXPECTED_STATUS
    assert result.stopped_at == 2
    assert result.responses[0].sw >> 8 == 0x6A
    assert result.responses[2].sw != 0x9000
    assert card.apdu_count == 3  # GET CPLC after the refusal never reached the card


def test_bad_script_never_reaches_the_virtual_card() -> None:
    card = new_card()
    result = run_script(VirtualTransport(card), script(
        3, command(SELECT_ISD), command("00a40400ff0102")))  # Lc 255, 2 bytes
    assert result.outcome == pb.SCRIPT_BAD_SCRIPT
    assert card.apdu_count == 0


@pytest.mark.parametrize("fault", ["power-loss@2", "tear@2"])
def test_power_loss_mid_script_is_card_removed(fault: str) -> None:
    card = new_card(fault)
    result = run_script(VirtualTransport(card), script(
        4, command(SELECT_ISD), command(GET_CPLC), command(GET_CPLC)))
    assert result.outcome == pb.SCRIPT_CARD_REMOVED
    assert result.stopped_at == 1
    assert len(result.responses) == 1
    assert not card.powered


def test_hook_before_apdu_k_sees_the_script_in_order() -> None:
    seen: list[tuple[int, bytes]] = []
    card = new_card()
    card.faults.add_hook(2, lambda n, apdu: seen.append((n, apdu)))
    run_script(VirtualTransport(card), script(5, command(SELECT_ISD), command(GET_CPLC)))
    assert seen == [(2, bytes.fromhex(GET_CPLC))]


def test_power_loss_counts_as_pull_and_reinsert_for_a_running_agent(pki: Pki) -> None:
    """A long-running agent meets the card again after a power loss, as after a re-insertion."""

    def conversation(hello, receive, context):
        yield script_message(1, command(SELECT_ISD), command(GET_CPLC))
        result = receive().result
        if result.outcome == pb.SCRIPT_CARD_REMOVED:
            yield done_message(pb.SessionDone.FAILED, message="card lost")
        else:
            yield done_message(pb.SessionDone.OK)

    cancellation = Cancellation()
    reports: list[SessionReport] = []

    def on_session(report: SessionReport) -> None:
        reports.append(report)
        if len(reports) == 2:
            cancellation.cancel()

    source = VirtualCardSource(card=new_card("power-loss@2"))
    with ChannelServer(pki, conversation) as server:
        agent = CardAgent(source, target_for(pki, server.address).open_channel,
                          AgentSettings(info=AgentInfo(), server=server.address,
                                        backoff=Backoff(initial_s=0.01, max_s=0.05)),
                          cancellation, on_session=on_session)
        assert agent.run() == ExitStatus.OK
    assert [r.outcome_name for r in reports] == ["FAILED", "OK"]
    assert server.record.results[0].outcome == pb.SCRIPT_CARD_REMOVED


def test_open_virtual_card_reports_bad_input(tmp_path: Path) -> None:
    with pytest.raises(VirtualCardError, match="no virtual card state"):
        open_virtual_card(tmp_path / "missing.json")
    state = tmp_path / "card.json"
    factory.create_card(state, psd_id=PSD_ID)
    with pytest.raises(VirtualCardError, match="--virtual-fault"):
        open_virtual_card(state, "power-loss@zero")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(VirtualCardError, match="cannot open virtual card"):
        open_virtual_card(tmp_path / "junk.json")


def test_kill_self_in_a_fault_plan_names_this_process(tmp_path: Path) -> None:
    import os

    state = tmp_path / "card.json"
    factory.create_card(state, psd_id=PSD_ID)
    card = open_virtual_card(state, "kill@3:self:KILL,power-loss@5")
    kill = next(f for f in card.faults.faults if f.kind == "kill")
    assert kill.pid == os.getpid() and kill.at == 3
    assert card.faults.describe().endswith("power-loss@5")
