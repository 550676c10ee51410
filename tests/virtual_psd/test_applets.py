"""The card as a container of applets: a second applet beside the ISD.

A tiny counter applet, defined here and nowhere in ``virtual_psd``, shows
what an applet such as the issuance applet gets from the card without any
change to the ISD: selection by AID, its commands routed to it, a state
section of its own, and the same all-or-nothing commit and fault plans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cardcore import gp
from cardcore.apdu import CommandApdu
from cardcore.issuance import ISSUANCE_AID
from cardcore.psd import ISD_AID, psd_id_from_cplc
from cardcore.sw import SW
from tests.virtual_psd.conftest import PSD_ID, TRANSPORT, open_session, send
from virtual_psd.applet import CommandContext, StatusError
from virtual_psd.card import VirtualCard
from virtual_psd.faults import CardPowerLost, FaultPlan
from virtual_psd.isd import isd_state
from virtual_psd.state import CardState, StateError, load_state

COUNTER_AID = bytes.fromhex("F0000000CA0201")
INS_ADD = 0x10        # add P1 to the count; answers the new count
INS_ADD_THEN_FAIL = 0x12  # adds, then fails: nothing of it may stay
INS_READ = 0x14
READ = bytes((0x80, INS_READ, 0, 0, 0))

h = bytes.fromhex


@dataclass
class CounterState:
    """The counter applet's section."""

    count: int = 0
    history: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "history": list(self.history)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CounterState:
        if not isinstance(obj.get("count"), int):
            raise StateError("malformed counter section: count must be an integer")
        return cls(obj["count"], [int(x) for x in obj.get("history", [])])

    def copy(self) -> CounterState:
        return CounterState(self.count, list(self.history))


class CounterApplet:
    aid = COUNTER_AID

    def __init__(self) -> None:
        self.selections = 0

    def read_section(self, state: CardState) -> None:
        if self.aid in state.sections:
            state.section(self.aid, CounterState)

    def _state(self, ctx: CommandContext) -> CounterState:
        return ctx.section(self.aid, CounterState, new=CounterState)

    def select(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        self.selections += 1
        return gp.select_response(self.aid, 0xFFFF)

    def deselect(self, ctx: CommandContext) -> None:
        pass

    def process(self, ctx: CommandContext, command: CommandApdu) -> tuple[bytes, int]:
        if command.cla != 0x80:
            raise StatusError(SW.CLA_NOT_SUPPORTED)
        if command.ins == INS_READ:
            return self._state(ctx).count.to_bytes(2, "big"), SW.OK
        if command.ins in (INS_ADD, INS_ADD_THEN_FAIL):
            state = self._state(ctx)
            state.count += command.p1
            state.history.append(command.p1)
            if command.ins == INS_ADD_THEN_FAIL:
                raise StatusError(SW.WRONG_DATA)
            return state.count.to_bytes(2, "big"), SW.OK
        raise StatusError(SW.INS_NOT_SUPPORTED)


def _add(n: int) -> bytes:
    return bytes((0x80, INS_ADD, n, 0x00, 0x00))


def _open(path: Path, faults: FaultPlan | None = None) -> tuple[VirtualCard, CounterApplet]:
    card = VirtualCard.open(path, faults=faults)
    applet = CounterApplet()
    card.register(applet)
    card.power_on()
    return card, applet


def _sections(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["applets"]


def test_the_card_selects_the_second_applet_by_aid_and_routes_its_commands(
        state_path: Path) -> None:
    card, applet = _open(state_path)
    # The ISD is selected at power on and answers its own commands.
    data, sw = send(card, gp.get_data_command(0x9F7F))
    assert sw == SW.OK and psd_id_from_cplc(data) == PSD_ID
    assert send(card, _add(1))[1] == SW.INS_NOT_SUPPORTED      # not an ISD command
    data, sw = send(card, gp.select_command(COUNTER_AID))
    assert sw == SW.OK and gp.parse_select_response(data) == COUNTER_AID
    assert send(card, _add(2)) == (h("0002"), SW.OK)
    assert send(card, gp.get_data_command(0x9F7F))[1] == SW.INS_NOT_SUPPORTED  # not the ISD
    assert send(card, gp.select_command(COUNTER_AID[:5]))[1] == SW.OK  # partial AID
    assert send(card, READ) == (h("0002"), SW.OK)
    assert applet.selections == 2
    # Back to the ISD, which lists the applet in its registry.
    assert send(card, gp.select_command(ISD_AID))[1] == SW.OK
    session = open_session(card, 0xFF, TRANSPORT)
    data, sw = session.send(gp.get_status_command(gp.STATUS_APPLICATIONS))
    assert sw == SW.OK
    assert [e.aid for e in gp.parse_get_status_response(data)] == [ISSUANCE_AID, COUNTER_AID]


def test_each_applet_keeps_its_section_apart(state_path: Path) -> None:
    card, _ = _open(state_path)
    isd_before = _sections(state_path)[ISD_AID.hex().upper()]
    assert send(card, gp.select_command(COUNTER_AID))[1] == SW.OK
    assert send(card, _add(5))[1] == SW.OK
    sections = _sections(state_path)
    assert sections[COUNTER_AID.hex().upper()] == {"count": 5, "history": [5]}
    assert sections[ISD_AID.hex().upper()] == isd_before      # the ISD's untouched
    # An ISD change (INITIALIZE UPDATE moves its sequence counter) leaves the counter's.
    assert send(card, gp.select_command(ISD_AID))[1] == SW.OK
    open_session(card, 0xFF, TRANSPORT)
    sections = _sections(state_path)
    assert sections[ISD_AID.hex().upper()]["sequence_counter"] == \
        isd_before["sequence_counter"] + 1
    assert sections[COUNTER_AID.hex().upper()] == {"count": 5, "history": [5]}
    # Both come back from the file, each through its own applet.
    card, _ = _open(state_path)
    assert send(card, gp.select_command(COUNTER_AID))[1] == SW.OK
    assert send(card, READ) == (h("0005"), SW.OK)
    assert sorted(isd_state(card.state).key_sets) == [0xFF]


def test_a_failed_command_or_a_read_of_the_applet_writes_nothing(state_path: Path) -> None:
    card, _ = _open(state_path)
    assert send(card, gp.select_command(COUNTER_AID))[1] == SW.OK
    assert send(card, _add(3))[1] == SW.OK
    before = state_path.read_bytes()
    assert send(card, bytes((0x80, INS_ADD_THEN_FAIL, 4, 0, 0)))[1] == SW.WRONG_DATA
    assert card.state.section(COUNTER_AID, CounterState) == CounterState(3, [3])
    assert send(card, READ) == (h("0003"), SW.OK)
    assert state_path.read_bytes() == before


@pytest.mark.parametrize("kind, count", [("power-loss", 1), ("tear", 3)])
def test_fault_plans_cut_the_applets_commands_as_the_isds(
        state_path: Path, kind: str, count: int) -> None:
    """SELECT is APDU 1, ADD 1 is APDU 2, ADD 2 is APDU 3: power lost before APDU 3
    keeps only the first ADD; torn during it, its change is committed."""
    card, _ = _open(state_path, FaultPlan().add(kind, 3))
    assert send(card, gp.select_command(COUNTER_AID))[1] == SW.OK
    assert send(card, _add(1))[1] == SW.OK
    with pytest.raises(CardPowerLost) as lost:
        card.transmit(_add(2))
    assert lost.value.torn is (kind == "tear") and not card.powered
    stored = load_state(state_path).section(COUNTER_AID, CounterState)
    assert stored.count == count
    assert card.state.section(COUNTER_AID, CounterState).count == count
    card.power_on()  # the ISD is selected again, the counter kept what was committed
    assert send(card, gp.select_command(COUNTER_AID))[1] == SW.OK
    assert send(card, READ) == (count.to_bytes(2, "big"), SW.OK)


def test_a_malformed_section_of_the_applet_is_refused_when_it_is_registered(
        state_path: Path) -> None:
    card, _ = _open(state_path)
    assert send(card, gp.select_command(COUNTER_AID))[1] == SW.OK
    assert send(card, _add(1))[1] == SW.OK
    obj = json.loads(state_path.read_text())
    obj["applets"][COUNTER_AID.hex().upper()]["count"] = "one"
    state_path.write_text(json.dumps(obj))
    card = VirtualCard.open(state_path)   # the ISD alone does not read the counter's
    with pytest.raises(StateError, match="count must be an integer"):
        card.register(CounterApplet())
