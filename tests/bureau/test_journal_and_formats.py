"""The bureau's journal and the files of B4 it adds to ``cms.perso_format``, without a proxy.

The journal keeps a card's step and its mailer data once recorded, refuses a
batch begun before unless resumed and another file under the same serial;
the shipping and dispatch files read back what was written and refuse
malformed rows with the row and line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from bureau.journal import Journal, JournalError, Step
from cms import perso_format as F
from cms.pack_format import PackFormatError

SERIAL = b"\x42" * 16


def test_the_journal_keeps_steps_and_mailer_data_across_runs(tmp_path: Path) -> None:
    journal = Journal(tmp_path, SERIAL, b"\x01" * 32, resume=False)
    journal.record("CMS-1", Step.STARTED)
    journal.record("CMS-1", Step.CODES_SEALED, mailer_data=b"sealed")
    journal.record("CMS-1", Step.PIN_SET)
    journal.record("CMS-2", Step.FAILED, reason="personalized by another payload")
    journal.close()
    with pytest.raises(JournalError, match="--resume"):
        Journal(tmp_path, SERIAL, b"\x01" * 32, resume=False)
    with pytest.raises(JournalError, match="another file"):
        Journal(tmp_path, SERIAL, b"\x02" * 32, resume=True)
    again = Journal(tmp_path, SERIAL, b"\x01" * 32, resume=True)
    assert again.card("CMS-1") == ("CMS-1", Step.PIN_SET, "", b"sealed")
    assert again.card("CMS-2").reason == "personalized by another payload"  # type: ignore[union-attr]
    assert again.unfinished({"CMS-1", "CMS-2", "CMS-3"}) == {"CMS-1", "CMS-3"}
    assert (tmp_path / "journal.sqlite").stat().st_mode & 0o777 == 0o600


def test_shipping_and_dispatch_files_read_back(tmp_path: Path) -> None:
    now = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
    header = F.FileHeader(SERIAL, 1, now, bureau="bureau-1")
    shipping = F.write_shipping(header, [F.ShippingRow("CMS-1", "Zoë", "1 Rue\n75005 Paris")])
    assert F.read_shipping(shipping).rows == [F.ShippingRow("CMS-1", "Zoë", "1 Rue\n75005 Paris")]
    dispatch = F.write_dispatch(F.FileHeader(SERIAL, 1, now), [F.DispatchRow("CMS-1", now)])
    table = F.read_dispatch(dispatch)
    assert table.rows == [F.DispatchRow("CMS-1", now)] and table.header.file_serial == SERIAL


@pytest.mark.parametrize(("change", "reason"), [
    ((b"2026-12-02T06:00:00Z\r\n", b"yesterday\r\n"), "dispatched_at 'yesterday'"),
    ((b"CMS-1,", b"cms 1,"), "serial"),
    ((b"CMS-1,", b"CMS-1,x,"), "3 columns, expected 2"),
])
def test_a_malformed_dispatch_row_is_named(change: tuple[bytes, bytes], reason: str) -> None:
    now = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
    data = F.write_dispatch(F.FileHeader(SERIAL, 1, now), [F.DispatchRow("CMS-1", now)])
    bad = data[::-1].replace(change[0][::-1], change[1][::-1], 1)[::-1]
    with pytest.raises(PackFormatError, match=reason) as refused:
        F.read_dispatch(bad)
    assert "row 1" in str(refused.value)
