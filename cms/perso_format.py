"""The files between issuer, bureau and mailing house (seed 004, B4): their one definition.

Contracts between parties, like ``cms.pack_format`` (and shaped like it: CSV
by RFC 4180, two header lines, a column line, one line per card), so each
side reads the same definition. Text is UTF-8: users' names and addresses
are printed as they are. Binary fields are standard base64. Beside each
file, ``<file>.p7s`` is a detached CMS SignedData over its exact bytes;
optionally the file (and its signature) travel as ``<file>.p7m``, CMS
EnvelopedData to the recipient's certificate (``cms.envelope``).

**Personalization device data** (issuer to bureau, signed by the issuer key)::

    format,version,file_serial,issuer,pack,card_count,created_at,pin_puk_by
    cms-personalization-device-data,1,<32 hex>,<16 hex>,B-2026-01,2,2026-12-02T05:00:00Z,bureau
    serial,payload,user_name,user_address,user_public_key
    ACME-0000000001,AcEP...,Ada Lovelace,"12 Example Street
    1000 Town",AiC1...

``file_serial`` is the issuance id every payload of the file is bound to;
``issuer`` the issuer key id (``cardcore.issuance.issuer_key_id``) that
signed them; ``pack`` the operator's name for the batch; ``pin_puk_by`` who
makes PIN and PUK: ``bureau`` (claim 5) or ``hsm`` (claim 8: they are inside
the payload, and in the mailing file). A row: the card's serial, its payload
(``cardcore.personalization``), the user data printed on the card and its
letter (name, postal address), and the user's public key (compressed
secp256k1) for the bureau to check the card's answer against.

**Mailing data** (issuer to mailing house, signed by the issuer key), when the
HSM made PIN and PUK::

    format,version,file_serial,issuer,pack,card_count,created_at
    cms-pin-mailing-data,1,...
    serial,user_name,postal_address,mailer_data

``mailer_data`` is RSA-OAEP (SHA-1, MGF1-SHA1: what the mailing house's HSM
opens) of ``PIN || 00 || PUK`` to the mailing house's own key: only it can
open it.

**Personalization results** (bureau to issuer, signed by a bureau certificate
the issuer trusts, ``cms bureaus trust``)::

    format,version,file_serial,bureau,card_count,created_at
    cms-personalization-results,1,<the personalization file's serial>,bureau-1,2,...
    serial,status,reason
    ACME-0000000001,personalized,
    ACME-0000000002,failed,card did not answer SELECT

**Shipping file** (bureau to issuer and carrier, signed by the bureau key):
the personalized cards to send, each to its user::

    format,version,file_serial,bureau,card_count,created_at
    cms-card-shipping,1,<the personalization file's serial>,bureau-1,2,...
    serial,user_name,postal_address

When the bureau makes PIN and PUK (``pin_puk_by`` ``bureau``) it writes a
mailing file too, of the same shape as the issuer's, signed by the bureau
key: its mailer data sealed to the mailing house in the bureau's HSM.

**Dispatch confirmation** (mailing house to issuer): the letters sent::

    format,version,file_serial,card_count,created_at
    cms-pin-dispatch,1,<the mailing file's serial>,2,...
    serial,dispatched_at
    ACME-0000000001,2026-12-02T06:00:00Z

Every reader checks only the shape; errors name the card row (1 = the first
card; 0 = the header) and the file line, as ``PackFormatError`` does.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, NamedTuple

from cardcore.personalization import ISSUANCE_ID_LENGTH, MAX_PAYLOAD
from cms.pack_format import (
    ENVELOPE_SUFFIX,
    MAX_CARDS,
    MAX_FIELD,
    NAME_PATTERN,
    SIGNATURE_SUFFIX,
    TIME_FORMAT,
    HeaderFields,
    PackFormatError,
    RowParser,
    check_serial,
    decode_base64,
    format_time,
    read_table,
)

VERSION: Final = "1"
ENCODING: Final = "utf-8"
MAX_NAME: Final = 200
MAX_ADDRESS: Final = 500
MAX_REASON: Final = 500
MAX_EMAIL: Final = 254
USER_PUBLIC_KEY_LENGTH: Final = 33
MAX_MAILER_DATA: Final = 512
"""An RSA-4096 ciphertext."""
ISSUER_KEY_ID_LENGTH: Final = 8
CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
"""Characters no printed name or address holds (a newline may end an address line)."""


PERSO_SUFFIX: Final = ".csv"
MAILING_SUFFIX: Final = "-mailing.csv"


def file_names(pack: str, *, sealed: bool, mailing: bool) -> list[str]:
    """The files an issuance of ``pack`` writes: the personalization file and its
    signature (``.p7m`` each when sealed to the bureau), then the mailing file and its."""
    perso = [pack + PERSO_SUFFIX, pack + PERSO_SUFFIX + SIGNATURE_SUFFIX]
    if sealed:
        perso = [name + ENVELOPE_SUFFIX for name in perso]
    if mailing:
        perso += [pack + MAILING_SUFFIX, pack + MAILING_SUFFIX + SIGNATURE_SUFFIX]
    return perso


class PinMaker(StrEnum):
    """Who makes each card's PIN and PUK."""

    BUREAU = "bureau"
    HSM = "hsm"


class Status(StrEnum):
    PERSONALIZED = "personalized"
    FAILED = "failed"


class Spec(NamedTuple):
    """One kind of file: its format name, header fields and columns."""

    format: str
    header: tuple[str, ...]
    columns: tuple[str, ...]


PERSO: Final = Spec("cms-personalization-device-data",
                    ("format", "version", "file_serial", "issuer", "pack", "card_count",
                     "created_at", "pin_puk_by"),
                    ("serial", "payload", "user_name", "user_address", "user_public_key"))
MAILING: Final = Spec("cms-pin-mailing-data",
                      ("format", "version", "file_serial", "issuer", "pack", "card_count",
                       "created_at"),
                      ("serial", "user_name", "postal_address", "mailer_data"))
RESULTS: Final = Spec("cms-personalization-results",
                      ("format", "version", "file_serial", "bureau", "card_count",
                       "created_at"),
                      ("serial", "status", "reason"))


SHIPPING: Final = Spec("cms-card-shipping",
                       ("format", "version", "file_serial", "bureau", "card_count",
                        "created_at"),
                       ("serial", "user_name", "postal_address"))
DISPATCH: Final = Spec("cms-pin-dispatch",
                       ("format", "version", "file_serial", "card_count", "created_at"),
                       ("serial", "dispatched_at"))


class FileHeader(NamedTuple):
    """The header of any of the three files (``issuer`` empty in results, ``bureau`` empty
    elsewhere; ``pin_puk_by`` only in personalization files)."""

    file_serial: bytes
    card_count: int
    created_at: datetime
    issuer_key_id: bytes = b""
    pack: str = ""
    pin_puk_by: PinMaker = PinMaker.BUREAU
    bureau: str = ""


class PersoRow(NamedTuple):
    serial: str
    payload: bytes
    user_name: str
    user_address: str
    user_public_key: bytes


class MailingRow(NamedTuple):
    serial: str
    user_name: str
    postal_address: str
    mailer_data: bytes


class ResultRow(NamedTuple):
    serial: str
    status: Status
    reason: str


class ShippingRow(NamedTuple):
    serial: str
    user_name: str
    postal_address: str


class DispatchRow(NamedTuple):
    serial: str
    dispatched_at: datetime


class Table(NamedTuple):
    header: FileHeader
    rows: list


# -- field checks (shared by writers and readers) --------------------------------------

def check_text(what: str, value: str, limit: int, *, lines: bool = False,
               empty: bool = False, row: int | None = None, line: int | None = None) -> str:
    """A printable text field of at most ``limit`` characters (``lines``: newlines allowed)."""
    if not isinstance(value, str) or (not value and not empty):
        raise PackFormatError(f"{what} is empty", row=row, line=line)
    if len(value) > limit:
        raise PackFormatError(f"{what} longer than {limit} characters", row=row, line=line)
    if CONTROL.search(value) or (not lines and "\n" in value):
        raise PackFormatError(f"{what} holds control characters", row=row, line=line)
    return value


def _hex(what: str, value: str, length: int, line: int) -> bytes:
    if len(value) != 2 * length or not re.fullmatch(r"[0-9a-f]+", value):
        raise PackFormatError(f"{what} {value[:40]!r}: {2 * length} lower-case hex digits",
                              row=0, line=line)
    return bytes.fromhex(value)


def _binary(name: str, value: str, row: int, line: int, *, exact: int | None = None,
            limit: int = MAX_FIELD) -> bytes:
    data = decode_base64(name, value, row, line)
    if exact is not None and len(data) != exact:
        raise PackFormatError(f"{name} of {len(data)} bytes, expected {exact}", row=row,
                              line=line)
    if len(data) > limit:
        raise PackFormatError(f"{name} of {len(data)} bytes, more than {limit}", row=row,
                              line=line)
    return data


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


# -- writing -----------------------------------------------------------------------------

def _header_values(spec: Spec, header: FileHeader) -> list[str]:
    if not 0 < header.card_count <= MAX_CARDS:
        raise PackFormatError(f"card count {header.card_count}: 1 to {MAX_CARDS}", row=0)
    values = {"format": spec.format, "version": VERSION,
              "file_serial": header.file_serial.hex(), "issuer": header.issuer_key_id.hex(),
              "pack": header.pack, "card_count": str(header.card_count),
              "created_at": format_time(header.created_at),
              "pin_puk_by": header.pin_puk_by.value, "bureau": header.bureau}
    return [values[name] for name in spec.header]


def _write(spec: Spec, header: FileHeader, rows: Iterable[Sequence[str]]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(spec.header)
    writer.writerow(_header_values(spec, header))
    writer.writerow(spec.columns)
    count = 0
    for row in rows:
        count += 1
        writer.writerow(row)
    if count != header.card_count:
        raise PackFormatError(f"header says {header.card_count} cards, {count} written")
    return out.getvalue().encode(ENCODING)


def write_perso(header: FileHeader, rows: Iterable[PersoRow]) -> bytes:
    """A personalization file's bytes (the fields checked as a reader checks them)."""
    return _write(PERSO, header, (
        (check_serial(r.serial), _b64(r.payload), check_text("user name", r.user_name, MAX_NAME),
         check_text("user address", r.user_address, MAX_ADDRESS, lines=True),
         _b64(r.user_public_key)) for r in rows))


def write_mailing(header: FileHeader, rows: Iterable[MailingRow]) -> bytes:
    return _write(MAILING, header, (
        (check_serial(r.serial), check_text("user name", r.user_name, MAX_NAME),
         check_text("postal address", r.postal_address, MAX_ADDRESS, lines=True),
         _b64(r.mailer_data)) for r in rows))


def write_results(header: FileHeader, rows: Iterable[ResultRow]) -> bytes:
    return _write(RESULTS, header, (
        (check_serial(r.serial), r.status.value,
         check_text("reason", r.reason, MAX_REASON, empty=True)) for r in rows))


def write_shipping(header: FileHeader, rows: Iterable[ShippingRow]) -> bytes:
    return _write(SHIPPING, header, (
        (check_serial(r.serial), check_text("user name", r.user_name, MAX_NAME),
         check_text("postal address", r.postal_address, MAX_ADDRESS, lines=True))
        for r in rows))


def write_dispatch(header: FileHeader, rows: Iterable[DispatchRow]) -> bytes:
    return _write(DISPATCH, header, (
        (check_serial(r.serial), format_time(r.dispatched_at)) for r in rows))


# -- reading -----------------------------------------------------------------------------

def _file_header(spec: Spec, found: HeaderFields) -> FileHeader:
    fields, line = found.fields, found.line
    header = FileHeader(_hex("file serial", fields["file_serial"], ISSUANCE_ID_LENGTH, line),
                        found.card_count, found.created_at)
    if "issuer" in fields:
        header = header._replace(
            issuer_key_id=_hex("issuer", fields["issuer"], ISSUER_KEY_ID_LENGTH, line))
    for name in ("pack", "bureau"):
        if name in fields:
            if not NAME_PATTERN.match(fields[name]):
                raise PackFormatError(f"{name} {fields[name][:64]!r}: 1-64 of letters, "
                                      "digits, '.', '_' and '-'", row=0, line=line)
            header = header._replace(**{name: fields[name]})
    if "pin_puk_by" in fields:
        try:
            header = header._replace(pin_puk_by=PinMaker(fields["pin_puk_by"]))
        except ValueError:
            raise PackFormatError(f"pin_puk_by {fields['pin_puk_by'][:16]!r}: bureau or hsm",
                                  row=0, line=line) from None
    return header


def _read(spec: Spec, data: bytes, parse_row: RowParser[Any]) -> Table:
    found, rows = read_table(data, spec.header, spec.format, spec.columns, parse_row,
                             encoding=ENCODING)
    header = _file_header(spec, found)
    serials: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if row.serial in serials:
            raise PackFormatError(f"card {row.serial} is also row {serials[row.serial]}",
                                  row=number)
        serials[row.serial] = number
    return Table(header, rows)


def _perso_row(fields: list[str], number: int, line: int) -> PersoRow:
    return PersoRow(check_serial(fields[0], number, line),
                    _binary("payload", fields[1], number, line, limit=MAX_PAYLOAD),
                    check_text("user name", fields[2], MAX_NAME, row=number, line=line),
                    check_text("user address", fields[3], MAX_ADDRESS, lines=True, row=number,
                               line=line),
                    _binary("user public key", fields[4], number, line,
                            exact=USER_PUBLIC_KEY_LENGTH))


def _mailing_row(fields: list[str], number: int, line: int) -> MailingRow:
    return MailingRow(check_serial(fields[0], number, line),
                      check_text("user name", fields[1], MAX_NAME, row=number, line=line),
                      check_text("postal address", fields[2], MAX_ADDRESS, lines=True,
                                 row=number, line=line),
                      _binary("mailer data", fields[3], number, line, limit=MAX_MAILER_DATA))


def _result_row(fields: list[str], number: int, line: int) -> ResultRow:
    try:
        status = Status(fields[1])
    except ValueError:
        raise PackFormatError(f"status {fields[1][:32]!r}: personalized or failed",
                              row=number, line=line) from None
    return ResultRow(check_serial(fields[0], number, line), status,
                     check_text("reason", fields[2], MAX_REASON, empty=True, row=number,
                                line=line))


def read_perso(data: bytes) -> Table:
    """A personalization file: header and ``PersoRow``s (PackFormatError otherwise)."""
    return _read(PERSO, data, _perso_row)


def read_mailing(data: bytes) -> Table:
    return _read(MAILING, data, _mailing_row)


def read_results(data: bytes) -> Table:
    """A bureau's result file: header and ``ResultRow``s, no serial twice."""
    return _read(RESULTS, data, _result_row)


def _shipping_row(fields: list[str], number: int, line: int) -> ShippingRow:
    return ShippingRow(check_serial(fields[0], number, line),
                       check_text("user name", fields[1], MAX_NAME, row=number, line=line),
                       check_text("postal address", fields[2], MAX_ADDRESS, lines=True,
                                  row=number, line=line))


def parse_time(what: str, value: str, *, row: int, line: int) -> datetime:
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise PackFormatError(f"{what} {value[:32]!r}, expected YYYY-MM-DDTHH:MM:SSZ",
                              row=row, line=line) from None


def _dispatch_row(fields: list[str], number: int, line: int) -> DispatchRow:
    return DispatchRow(check_serial(fields[0], number, line),
                       parse_time("dispatched_at", fields[1], row=number, line=line))


def read_shipping(data: bytes) -> Table:
    return _read(SHIPPING, data, _shipping_row)


def read_dispatch(data: bytes) -> Table:
    """A mailing house's dispatch confirmation: header and ``DispatchRow``s."""
    return _read(DISPATCH, data, _dispatch_row)
