"""The issuer's files (cms.perso_format): what is written reads back the same, and every
wrong shape (fields, columns, counts, sizes, encodings) is refused naming row and line."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from cms import perso_format as F
from cms.pack_format import PackFormatError

CREATED = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
SERIAL = os.urandom(16)


def perso_rows(count: int = 2) -> list[F.PersoRow]:
    return [F.PersoRow(f"ACME-{n:010d}", b"\x01" + os.urandom(600), f"Zoë Ünal {n}",
                       f"{n} Rue de l'Église\n1227 Carouge", b"\x02" + os.urandom(32))
            for n in range(1, count + 1)]


def perso_header(count: int = 2, **changes) -> F.FileHeader:
    return F.FileHeader(SERIAL, count, CREATED, issuer_key_id=os.urandom(8), pack="B-1",
                        pin_puk_by=F.PinMaker.HSM)._replace(**changes)


def results_file(rows: list[tuple[str, str, str]], count: int | None = None) -> bytes:
    body = "".join(f"{s},{st},{r}\r\n" for s, st, r in rows)
    return (f"format,version,file_serial,bureau,card_count,created_at\r\n"
            f"cms-personalization-results,1,{SERIAL.hex()},bureau-1,"
            f"{len(rows) if count is None else count},2026-12-02T05:00:00Z\r\n"
            f"serial,status,reason\r\n{body}").encode()


def test_a_personalization_file_reads_back_as_written() -> None:
    header, rows = perso_header(), perso_rows()
    data = F.write_perso(header, rows)
    assert data.startswith(b"format,version,file_serial,issuer,pack,card_count,created_at,"
                           b"pin_puk_by\r\ncms-personalization-device-data,1,")

    table = F.read_perso(data)

    assert table.header == header
    assert table.rows == rows


def test_mailing_and_result_files_read_back_as_written() -> None:
    header = F.FileHeader(SERIAL, 1, CREATED, issuer_key_id=bytes(8), pack="B-1")
    rows = [F.MailingRow("ACME-1", "Ada", "1 Lane\nTown", os.urandom(256))]
    assert F.read_mailing(F.write_mailing(header, rows)).rows == rows
    results = [F.ResultRow("ACME-1", F.Status.PERSONALIZED, ""),
               F.ResultRow("ACME-2", F.Status.FAILED, "no answer to SELECT")]
    rheader = F.FileHeader(SERIAL, 2, CREATED, bureau="bureau-1")
    table = F.read_results(F.write_results(rheader, results))
    assert table.header == rheader and table.rows == results


@pytest.mark.parametrize(("rows", "count", "message"), [
    ([("ACME-1", "done", "")], None, "row 1, line 4: status 'done': personalized or failed"),
    ([("acme-1", "personalized", "")], None, "row 1, line 4: serial 'acme-1' is malformed"),
    ([("ACME-1", "personalized", "x" * 501)], None, "reason longer than 500 characters"),
    ([("ACME-1", "personalized", "a,b")], None, "row 1, line 4: 4 columns, expected 3"),
    ([("ACME-1", "personalized", "")], 2, "header says 2 cards, the file has 1"),
    ([("ACME-1", "personalized", ""), ("ACME-2", "failed", "")], 1,
     "row 2, line 5: more cards than the header's 1"),
    ([("ACME-1", "personalized", ""), ("ACME-1", "failed", "")], None,
     "row 2: card ACME-1 is also row 1"),
    ([("ACME-1", "personalized", "x" * 5000)], None, "not CSV: field larger than field limit"),
])
def test_malformed_results_are_refused(rows, count, message: str) -> None:
    with pytest.raises(PackFormatError, match=message):
        F.read_results(results_file(rows, count))


def test_malformed_headers_are_refused() -> None:
    good = results_file([("ACME-1", "personalized", "")])
    for bad, message in (
            (good.replace(b"cms-personalization-results", b"cms-device-initialization-data"),
             "header, line 2: format"),
            (good.replace(SERIAL.hex().encode(), b"zz"), "file serial 'zz': 32 lower-case hex"),
            (good.replace(b",1,", b",2,", 1), "version '2', this reader reads 1"),
            (good.replace(b"bureau-1", b"bureau 1"), "bureau 'bureau 1'"),
            (good.replace(b"2026-12-02T05:00:00Z", b"yesterday"), "creation time"),
            (good.replace(b"serial,status,reason", b"serial,status"), "columns 'serial,status'"),
            (b"\xff" + good, "not UTF-8 text"),
            (b"", "no header")):
        with pytest.raises(PackFormatError, match=message):
            F.read_results(bad)
    with pytest.raises(PackFormatError, match=r"header fields .*, expected format,version,"):
        F.read_perso(good)


def test_writers_refuse_what_readers_would() -> None:
    with pytest.raises(PackFormatError, match="user name longer than 200"):
        F.write_perso(perso_header(1), [perso_rows(1)[0]._replace(user_name="x" * 201)])
    with pytest.raises(PackFormatError, match="user name holds control characters"):
        F.write_perso(perso_header(1), [perso_rows(1)[0]._replace(user_name="a\nb")])
    with pytest.raises(PackFormatError, match="header says 3 cards, 2 written"):
        F.write_perso(perso_header(3), perso_rows(2))
    short_key = perso_rows(1)[0]._replace(user_public_key=bytes(32))
    with pytest.raises(PackFormatError, match="user public key of 32 bytes, expected 33"):
        F.read_perso(F.write_perso(perso_header(1), [short_key]))
