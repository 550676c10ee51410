"""The card's persistent state: working copies, equality, sections, version 1 files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cardcore import gp
from cardcore.psd import ISD_AID, cplc_for_psd_id, psd_id_bytes
from cardcore.sw import SW
from tests.virtual_psd.conftest import PSD_ID, TRANSPORT, open_session, send
from virtual_psd.card import VirtualCard
from virtual_psd.factory import new_card_state
from virtual_psd.isd import IsdState, KeySet, isd_state
from virtual_psd.state import FORMAT, VERSION, CardState, StateError, load_state, save_state

ISD = ISD_AID.hex().upper()
GP_KEY = bytes(range(0x40, 0x50)).hex()


def _state() -> CardState:
    state = new_card_state(transport_master=bytes(range(16)))
    isd = isd_state(state)
    isd.stored_ber[0x42] = b"\x01\x02"
    isd.applications["A000000151000000"] = {"life_cycle": 7, "data": {"k": [1, 2]}}
    return state


def test_a_working_copy_equals_its_original_and_shares_nothing_mutable() -> None:
    state = _state()
    before = state.to_json()
    work = state.copy()
    assert work == state and work.to_json() == state.to_json()

    isd = isd_state(work)
    isd.key_sets[0x70] = KeySet(b"\x11" * 16, b"\x22" * 16, b"\x33" * 16)
    isd.stored_ber[0x42] = b"\xff"
    isd.applications["A000000151000000"]["data"]["k"].append(3)
    isd.sequence_counter += 1

    assert work != state
    original = isd_state(state)
    assert 0x70 not in original.key_sets
    assert original.stored_ber[0x42] == b"\x01\x02"
    assert original.applications["A000000151000000"]["data"]["k"] == [1, 2]
    assert state.to_json() == before


def test_an_isd_working_copy_shares_nothing_mutable() -> None:
    original = isd_state(_state())
    work = original.copy()
    assert work == original
    work.key_sets[0xFF].dek = b"\x00" * 16
    work.stored_dgi[0x0101] = b"x"
    work.applications["A000000151000000"]["data"]["k"].append(3)
    assert work != original
    assert original.key_sets[0xFF].dek != b"\x00" * 16 and not original.stored_dgi
    assert original.applications["A000000151000000"]["data"]["k"] == [1, 2]


def test_equality_sees_every_field_and_survives_the_file(tmp_path: Path) -> None:
    state = _state()
    save_state(tmp_path / "card.json", state)
    assert load_state(tmp_path / "card.json") == state
    for change in (lambda s: setattr(isd_state(s), "life_cycle", 0x7F),
                   lambda s: setattr(isd_state(s), "scp_i", 0x00),
                   lambda s: setattr(isd_state(s), "strict", True),
                   lambda s: isd_state(s).stored_dgi.update({0x0101: b"x"}),
                   lambda s: setattr(isd_state(s).key_sets[0xFF], "dek", b"\x00" * 16),
                   lambda s: setattr(s, "psd_id", "00" * 10),
                   lambda s: s.sections.update({b"\xF0\x01": {"n": 1}})):
        other = state.copy()
        change(other)
        assert other != state


def test_the_isd_keeps_its_data_in_its_own_section(tmp_path: Path) -> None:
    save_state(tmp_path / "card.json", _state())
    obj = json.loads((tmp_path / "card.json").read_text())
    assert (obj["format"], obj["version"]) == (FORMAT, VERSION)
    assert sorted(obj) == ["applets", "cplc", "format", "psd_id", "version"]
    assert sorted(obj["applets"]) == [ISD]
    assert sorted(obj["applets"][ISD]["key_sets"]) == ["FF"]
    assert obj["applets"][ISD]["stored_data"]["ber_tlv"] == {"42": "0102"}


def _version_1_file(path: Path, **changes: object) -> dict[str, object]:
    """A card file as version 1 wrote it: the ISD's data at the top level."""
    obj: dict[str, object] = {
        "format": FORMAT, "version": 1, "psd_id": PSD_ID,
        "cplc": cplc_for_psd_id(psd_id_bytes(PSD_ID)).hex().upper(),
        "life_cycle": 15, "scp_i": 0x70, "strict": True, "sequence_counter": 7,
        "key_sets": {"FF": {"enc": GP_KEY, "mac": GP_KEY, "dek": GP_KEY}},
        "stored_data": {"ber_tlv": {"5F20": "414243"}, "dgi": {"0101": "AA"}},
        "applications": {},
        **changes,
    }
    path.write_text(json.dumps(obj))
    return obj


def test_a_version_1_file_is_read_with_its_isd_data_as_the_isd_section(tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    _version_1_file(path)
    isd = isd_state(load_state(path))
    assert isd == IsdState(
        key_sets={0xFF: KeySet(*(bytes.fromhex(GP_KEY),) * 3)}, sequence_counter=7,
        scp_i=0x70, life_cycle=15, stored_ber={0x5F20: b"ABC"}, stored_dgi={0x0101: b"\xAA"},
        strict=True)
    assert load_state(path).psd_id == PSD_ID


def test_a_version_1_card_works_and_is_written_as_version_2_at_its_next_change(
        tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    _version_1_file(path)
    card = VirtualCard.open(path)
    card.power_on()
    assert send(card, gp.get_data_command(0x5F20))[1] == SW.OK
    assert json.loads(path.read_text())["version"] == 1   # a read changes nothing
    session = open_session(card, 0xFF, TRANSPORT)        # moves the sequence counter
    assert session.send(gp.get_status_command())[1] == SW.OK
    obj = json.loads(path.read_text())
    assert obj["version"] == 2 and sorted(obj["applets"]) == [ISD]
    section = obj["applets"][ISD]
    assert section["sequence_counter"] == 8 and section["strict"] is True
    assert section["stored_data"] == {"ber_tlv": {"5F20": "414243"}, "dgi": {"0101": "AA"}}


def test_cms_card_show_reads_a_version_1_file(tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    _version_1_file(path)
    show = subprocess.run([sys.executable, "-m", "cms.cli", "card", "show", "--state",
                           str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert show.returncode == 0, show.stderr
    summary = json.loads(show.stdout)
    assert (summary["psd_id"], summary["policy"], summary["sequence_counter"]) == \
        (PSD_ID, "strict", 7)


def test_a_section_no_applet_of_this_card_knows_is_kept_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    state = new_card_state(psd_id=PSD_ID)
    state.sections[bytes.fromhex("F000000001")] = {"anything": [1, {"x": "y"}]}
    save_state(path, state)
    card = VirtualCard.open(path)
    card.power_on()
    session = open_session(card, 0xFF, TRANSPORT)   # a change: the file is written again
    assert session.send(gp.get_status_command())[1] == SW.OK
    obj = json.loads(path.read_text())
    assert obj["applets"][ISD]["sequence_counter"] == 1
    assert obj["applets"]["F000000001"] == {"anything": [1, {"x": "y"}]}


@pytest.mark.parametrize("text, message", [
    ("[]", "not a virtual PSD state file"),
    (json.dumps({"format": FORMAT, "version": 3}), "unsupported state version 3"),
    (json.dumps({"format": FORMAT, "version": 2, "psd_id": PSD_ID, "cplc": "00"}),
     "malformed"),
    (json.dumps({"format": FORMAT, "version": 2, "psd_id": PSD_ID, "cplc": "00",
                 "applets": {ISD: []}}), "malformed"),
    (json.dumps({"format": FORMAT, "version": 2, "psd_id": PSD_ID, "cplc": "00",
                 "applets": {"not hex": {}}}), "malformed"),
])
def test_malformed_files_are_refused_with_a_clear_error(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(StateError, match=message):
        load_state(path)


def test_a_card_without_an_isd_section_does_not_open(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    save_state(path, CardState(PSD_ID, cplc_for_psd_id(psd_id_bytes(PSD_ID))))
    with pytest.raises(StateError, match="no section for applet " + ISD):
        VirtualCard.open(path)
    bad = tmp_path / "v1-bad.json"
    _version_1_file(bad, key_sets={"FF": {"enc": "00"}})
    with pytest.raises(StateError, match="malformed"):
        VirtualCard.open(bad)
