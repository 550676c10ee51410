"""The provider's serials: allocated from counters on disk, never handed out twice."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cardcore.issuance import SERIAL_PATTERN
from cms.pack_format import NAME_PATTERN
from provider.state import COUNTERS, ProviderState, StateError, card_serial


def test_card_serials_follow_the_counter_across_runs(tmp_path: Path) -> None:
    first = [ProviderState(tmp_path).next_card_serial("acme") for _ in range(3)]
    again = ProviderState(tmp_path).next_card_serial("acme")     # a new run
    assert first == ["ACME-0000000001", "ACME-0000000002", "ACME-0000000003"]
    assert again == "ACME-0000000004"
    assert json.loads((tmp_path / COUNTERS).read_text())["card"] == 4


def test_the_counter_is_on_disk_before_the_serial_is_returned(tmp_path: Path) -> None:
    state = ProviderState(tmp_path)
    serial = state.next_card_serial("acme")
    # Whatever happens to the serial now (the card loses power), the file already says so.
    assert json.loads((tmp_path / COUNTERS).read_text())["card"] == int(serial.split("-")[-1])
    assert stat.S_IMODE((tmp_path / COUNTERS).stat().st_mode) == 0o600


def test_pack_serials_are_claimed_once(tmp_path: Path) -> None:
    state = ProviderState(tmp_path)
    first = state.claim_pack_serial("acme")
    second = state.claim_pack_serial("acme")
    assert first != second and NAME_PATTERN.match(first) and NAME_PATTERN.match(second)
    assert state.claim_pack_serial("acme", "PK-CHOSEN-1") == "PK-CHOSEN-1"
    for used in (first, "PK-CHOSEN-1"):
        with pytest.raises(StateError, match="never reused"):
            ProviderState(tmp_path).claim_pack_serial("acme", used)


@pytest.mark.parametrize("provider_id", ["acme", "Acme.Cards_2", "x" * 64, "9"])
def test_card_serials_fit_the_card_for_any_provider_id(provider_id: str) -> None:
    serial = card_serial(provider_id, 9_999_999_999)
    assert SERIAL_PATTERN.match(serial), serial


def test_a_damaged_counter_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / COUNTERS).write_text("{not json")
    with pytest.raises(StateError, match="unreadable counters"):
        ProviderState(tmp_path).next_card_serial("acme")


def test_the_provider_id_is_remembered(tmp_path: Path) -> None:
    assert ProviderState(tmp_path).provider_id() is None
    ProviderState(tmp_path).record_provider_id("acme")
    assert ProviderState(tmp_path).provider_id() == "acme"
