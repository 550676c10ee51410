"""Fault injection: power loss before / during an APDU, hooks, persistence."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cardcore import gp, host
from cardcore.kcv import kcv_aes
from cardcore.psd import ISD_AID
from cardcore.sw import SW
from tests.virtual_psd.conftest import MK1, MK2, MKRK, TRANSPORT, open_session, personalize
from virtual_psd.card import VirtualCard
from virtual_psd.faults import CardPowerLost, FaultPlan, FaultPlanError
from virtual_psd.isd import isd_state
from virtual_psd.state import FORMAT, VERSION, load_state


def test_fault_plan_text_form() -> None:
    plan = FaultPlan.parse("power-loss@5, tear@9,kill@3:1234:INT")
    assert [(f.kind, f.at) for f in plan.faults] == [("power-loss", 5), ("tear", 9), ("kill", 3)]
    assert plan.faults[2].pid == 1234 and plan.faults[2].signal == signal.SIGINT
    assert plan.describe() == "power-loss@5,tear@9,kill@3:1234:INT"
    assert FaultPlan.parse("").faults == [] and FaultPlan.parse(None).faults == []
    for bad in ("power-loss", "tear@x", "tear@0", "boom@3", "kill@3", "tear@3:1"):
        with pytest.raises(FaultPlanError):
            FaultPlan.parse(bad)


def _replace_mk_script(card: VirtualCard, start: int) -> tuple[host.SecureSession, bytes]:
    """Open an MKRK session and return it with the PUT KEY that replaces MK 01 by 02."""
    s = open_session(card, 0x70, MKRK)
    cmd, _ = host.put_key_set_command(MKRK.dek, MK2, 0x02, replace_kvn=0x01)
    assert card.apdu_count == start + 3  # SELECT, INITIALIZE UPDATE, EXTERNAL AUTHENTICATE
    return s, cmd


def test_power_loss_before_put_key_leaves_the_previous_state(card: VirtualCard) -> None:
    personalize(card)
    before = isd_state(load_state(card.state_path))
    start = card.apdu_count
    card.faults = FaultPlan().add("power-loss", start + 4)
    s, cmd = _replace_mk_script(card, start)
    with pytest.raises(CardPowerLost) as info:
        s.send(cmd)
    assert not info.value.torn and not card.powered
    # The INITIALIZE UPDATE of this session moved the sequence counter; the key
    # sets are exactly as before.
    assert isd_state(load_state(card.state_path)).key_sets == before.key_sets
    assert sorted(isd_state(card.state).key_sets) == [0x01, 0x70]
    card.power_on()
    # The secure channel was volatile: the old session is gone.
    assert s.send(gp.get_status_command())[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert open_session(card, 0x01, MK1).send(gp.get_status_command())[1] == SW.OK


def test_tear_during_put_key_leaves_the_full_new_state(card: VirtualCard) -> None:
    personalize(card)
    start = card.apdu_count
    card.faults = FaultPlan().add("tear", start + 4)
    s, cmd = _replace_mk_script(card, start)
    with pytest.raises(CardPowerLost) as info:
        s.send(cmd)
    assert info.value.torn
    after = isd_state(load_state(card.state_path))
    assert sorted(after.key_sets) == [0x02, 0x70]
    assert after.key_sets[0x02].kcvs() == tuple(kcv_aes(k) for k in MK2.keys())
    card.power_on()
    assert open_session(card, 0x02, MK2).send(gp.get_status_command())[1] == SW.OK


def test_hook_runs_before_the_apdu(card: VirtualCard) -> None:
    seen: list[tuple[int, bytes, list[int]]] = []
    card.faults = FaultPlan().add_hook(
        2, lambda n, apdu: seen.append((n, apdu, sorted(isd_state(card.state).key_sets))))
    card.transmit(gp.select_command())
    card.transmit(gp.get_data_command(0x9F7F))
    card.transmit(gp.get_data_command(0x9F7F))
    assert seen == [(2, gp.get_data_command(0x9F7F), [0xFF])]


def test_kill_fault_signals_a_process(card: VirtualCard) -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        card.faults = FaultPlan.parse(f"kill@1:{victim.pid}:TERM")
        card.transmit(gp.select_command())
        assert victim.wait(10) == -signal.SIGTERM
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


@pytest.mark.parametrize("kind", ["power-loss", "tear"])
def test_every_step_of_personalization_is_recoverable(tmp_path: Path, kind: str) -> None:
    """Cut the power at each APDU of flow A1: the card is always in a state the
    server can recover from (transport still there, or MK and MKRK installed),
    never with a half-written key set."""
    from virtual_psd.factory import create_card

    total = 11  # SELECT, IU, EA, PUT MKRK, PUT MK, DELETE FF (+ margin)
    for k in range(1, total + 1):
        path = tmp_path / f"{kind}-{k}.json"
        create_card(path, psd_id="00000000000000000001")
        card = VirtualCard.open(path, faults=FaultPlan().add(kind, k))
        card.power_on()
        try:
            personalize(card)
        except CardPowerLost:
            pass
        state = load_state(path)
        sets = sorted(isd_state(state).key_sets)
        assert sets in ([0xFF], [0x70, 0xFF], [0x01, 0x70, 0xFF], [0x01, 0x70]), (k, sets)
        for kvn, ks in isd_state(state).key_sets.items():
            expected = {0xFF: TRANSPORT, 0x70: MKRK, 0x01: MK1}[kvn]
            assert (ks.enc, ks.mac, ks.dek) == expected.keys()
        card = VirtualCard.open(path)
        card.power_on()
        kvn = 0xFF if 0xFF in isd_state(state).key_sets else 0x01
        keys = TRANSPORT if kvn == 0xFF else MK1
        assert open_session(card, kvn, keys).send(gp.get_status_command())[1] == SW.OK


def test_state_file_is_versioned_and_written_atomically(card: VirtualCard) -> None:
    personalize(card)
    obj = json.loads(Path(card.state_path).read_text())
    assert obj["format"] == FORMAT and obj["version"] == VERSION == 2
    assert sorted(obj["applets"]) == [ISD_AID.hex().upper()]
    assert sorted(obj["applets"][ISD_AID.hex().upper()]["key_sets"]) == ["01", "70"]
    leftovers = [p for p in Path(card.state_path).parent.iterdir() if p.suffix == ".tmp"]
    assert leftovers == []
    assert Path(card.state_path).stat().st_mode & 0o077 == 0


def test_failed_commands_change_nothing_on_disk(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    before = Path(card.state_path).read_bytes()
    cmd, _ = host.put_key_set_command(bytes(16), MK1, 0x01)  # wrong DEK: KCV mismatch
    assert s.send(cmd)[1] == SW.WRONG_DATA
    assert Path(card.state_path).read_bytes() == before
