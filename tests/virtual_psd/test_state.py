"""The card's persistent state: working copies and equality."""

from __future__ import annotations

from pathlib import Path

from virtual_psd.factory import new_card_state
from virtual_psd.state import CardState, KeySet, load_state, save_state


def _state() -> CardState:
    state = new_card_state(transport_master=bytes(range(16)))
    state.stored_ber[0x42] = b"\x01\x02"
    state.applications["A000000151000000"] = {"life_cycle": 7, "data": {"k": [1, 2]}}
    return state


def test_a_working_copy_equals_its_original_and_shares_nothing_mutable() -> None:
    state = _state()
    before = state.to_json()
    work = state.copy()
    assert work == state and work.to_json() == state.to_json()

    work.key_sets[0x70] = KeySet(b"\x11" * 16, b"\x22" * 16, b"\x33" * 16)
    work.stored_ber[0x42] = b"\xff"
    work.applications["A000000151000000"]["data"]["k"].append(3)
    work.sequence_counter += 1

    assert work != state
    assert 0x70 not in state.key_sets
    assert state.stored_ber[0x42] == b"\x01\x02"
    assert state.applications["A000000151000000"]["data"]["k"] == [1, 2]
    assert state.to_json() == before


def test_equality_sees_every_field_and_survives_the_file(tmp_path: Path) -> None:
    state = _state()
    save_state(tmp_path / "card.json", state)
    assert load_state(tmp_path / "card.json") == state
    for change in (lambda s: setattr(s, "life_cycle", 0x7F),
                   lambda s: setattr(s, "scp_i", 0x00),
                   lambda s: setattr(s, "strict", True),
                   lambda s: s.stored_dgi.update({0x0101: b"x"}),
                   lambda s: setattr(s.key_sets[0xFF], "dek", b"\x00" * 16)):
        other = state.copy()
        change(other)
        assert other != state
