"""Device initialization data: the pack file a provider sends an issuer (seed 004, B2).

A contract between two parties, like the protos: the provider system writes
it (``cms provider init-pack``), the issuer reads it (``cms packs import``),
so its shape lives on the floor and both read the same definition.

The file is CSV (RFC 4180, written and read with the ``csv`` module)::

    format,version,pack_serial,provider_id,card_count,created_at
    cms-device-initialization-data,1,PK-2026-0001,acme-cards,3,2026-12-02T04:30:00Z
    serial,device_public_key,issuer_auth_public_key,device_certificate,issuer_auth_certificate,signed_device_key
    ACME-0000000001,MIIBIjAN...,MFkwEwYH...,MIIC...,MIIB...,MEUCIQ...
    ...

Line 1 names the header fields and line 2 carries them; line 3 names the
columns; each later line is one card. Keys are SubjectPublicKeyInfo DER,
certificates X.509 DER, the signed device key the card's ECDSA signature
(DER) over :func:`cardcore.issuance.device_key_statement`; all in standard
base64. Beside it, ``<file>.p7s`` is a detached CMS SignedData (RFC 5652)
by the provider's root key over the file's exact bytes.

This module checks only the *shape* (columns, sizes, encodings, the count);
signatures, certificates and weak keys are the issuer's checks. Errors name
the card row (1 = the first card) and the file line.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Final, NamedTuple, TypeVar

from cardcore.issuance import SERIAL_PATTERN

FORMAT: Final = "cms-device-initialization-data"
VERSION: Final = "1"
HEADER_FIELDS: Final = ("format", "version", "pack_serial", "provider_id", "card_count",
                        "created_at")
COLUMNS: Final = ("serial", "device_public_key", "issuer_auth_public_key",
                  "device_certificate", "issuer_auth_certificate", "signed_device_key")
SIGNATURE_SUFFIX: Final = ".p7s"
"""The detached CMS signature sits beside the pack as ``<pack>.csv.p7s``."""
ENVELOPE_SUFFIX: Final = ".p7m"
"""An encrypted file (CMS EnvelopedData) is ``<file>.p7m``."""

MAX_FIELD: Final = 4096
"""Characters of one field: a 2048-bit certificate in base64 is about 1,100."""
MAX_CARDS: Final = 100_000
MAX_FILE_BYTES: Final = 512 * 1024 * 1024
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Pack serials and provider ids."""
TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
T = TypeVar("T")


class PackFormatError(ValueError):
    """A pack file of the wrong shape.

    ``row`` is the card row (1: the first card; 0: the header), ``line`` the file's line.
    """

    def __init__(self, reason: str, *, row: int | None = None, line: int | None = None) -> None:
        where = []
        if row is not None:
            where.append("header" if row == 0 else f"row {row}")
        if line is not None:
            where.append(f"line {line}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)
        self.reason = reason
        self.row = row
        self.line = line


class PackHeader(NamedTuple):
    pack_serial: str
    provider_id: str
    card_count: int
    created_at: datetime


class PackRow(NamedTuple):
    """One card of a pack, its fields decoded from base64 (shape only, nothing verified)."""

    serial: str
    device_public_key: bytes
    issuer_auth_public_key: bytes
    device_certificate: bytes
    issuer_auth_certificate: bytes
    signed_device_key: bytes


class Pack(NamedTuple):
    header: PackHeader
    rows: list[PackRow]


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise PackFormatError(f"{what} {value!r}: 1-64 of letters, digits, '.', '_' and '-'",
                              row=0)
    return value


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def write_pack(header: PackHeader, rows: Iterable[PackRow]) -> bytes:
    """The pack file's bytes (CRLF line ends, as RFC 4180 and the csv module write them)."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(HEADER_FIELDS)
    writer.writerow((FORMAT, VERSION, check_name("pack serial", header.pack_serial),
                     check_name("provider id", header.provider_id), str(header.card_count),
                     format_time(header.created_at)))
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        count += 1
        writer.writerow((row.serial, *(base64.b64encode(v).decode("ascii") for v in row[1:])))
    if count != header.card_count:
        raise PackFormatError(f"header says {header.card_count} cards, {count} written")
    return out.getvalue().encode("ascii")


def csv_lines(data: bytes, encoding: str = "ascii") -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a CSV file of two header lines, a column line and rows
    (``cms.perso_format``'s files have the same shape, in UTF-8 for users' names)."""
    if len(data) > MAX_FILE_BYTES:
        raise PackFormatError(f"file of {len(data)} bytes, more than {MAX_FILE_BYTES}")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise PackFormatError(f"not {encoding.upper()} text (byte {exc.start})") from None
    # A field larger than the limit is refused by the csv module itself.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = reader.line_num
            row = line - 3 if line > 3 else (0 if line <= 2 else None)
            raise PackFormatError(f"not CSV: {exc}", row=row, line=line) from None
        yield reader.line_num, fields


def decode_base64(name: str, value: str, row: int, line: int) -> bytes:
    if not value:
        raise PackFormatError(f"{name} is empty", row=row, line=line)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PackFormatError(f"{name} is not base64", row=row, line=line) from None


class HeaderFields(NamedTuple):
    """A file's two header lines, the fields every file has checked."""

    fields: dict[str, str]
    card_count: int
    created_at: datetime
    line: int
    """The line of the values, for errors about them."""


def read_header_fields(lines: Iterator[tuple[int, list[str]]], names: tuple[str, ...],
                       file_format: str) -> HeaderFields:
    """The header lines of a file of ``file_format``: field names, format, version, card
    count and creation time checked; the other fields are the caller's to check."""
    try:
        line, found = next(lines)
        line2, values = next(lines)
    except StopIteration:
        raise PackFormatError("no header: the file starts with two header lines",
                              row=0) from None
    if tuple(found) != names:
        raise PackFormatError(f"header fields {','.join(found)[:200]!r}, expected "
                              f"{','.join(names)}", row=0, line=line)
    if len(values) != len(names):
        raise PackFormatError(f"{len(values)} header values, expected {len(names)}",
                              row=0, line=line2)
    fields = dict(zip(names, values, strict=True))
    if fields["format"] != file_format:
        raise PackFormatError(f"format {fields['format'][:64]!r}, expected {file_format}",
                              row=0, line=line2)
    if fields["version"] != VERSION:
        raise PackFormatError(f"version {fields['version'][:16]!r}, this reader reads "
                              f"{VERSION}", row=0, line=line2)
    count_text = fields["card_count"]
    if not count_text.isdigit() or not 0 < int(count_text) <= MAX_CARDS:
        raise PackFormatError(f"card count {count_text[:16]!r}: 1 to {MAX_CARDS}",
                              row=0, line=line2)
    try:
        created = datetime.strptime(fields["created_at"], TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise PackFormatError(f"creation time {fields['created_at'][:32]!r}, expected "
                              "YYYY-MM-DDTHH:MM:SSZ", row=0, line=line2) from None
    return HeaderFields(fields, int(count_text), created, line2)


RowParser = Callable[[list[str], int, int], T]
"""(fields, card row, file line) -> one row; PackFormatError naming them otherwise."""


def read_table(data: bytes, names: tuple[str, ...], file_format: str,
               columns: tuple[str, ...], parse_row: RowParser[T], *,
               encoding: str = "ascii") -> tuple[HeaderFields, list[T]]:
    """A file of two header lines, a column line and ``card_count`` rows of ``columns``:
    the shape this module's packs and ``cms.perso_format``'s files share."""
    lines = csv_lines(data, encoding)
    previous = csv.field_size_limit(MAX_FIELD)
    try:
        try:
            header = read_header_fields(lines, names, file_format)
            try:
                line, found = next(lines)
            except StopIteration:
                raise PackFormatError("no column line after the header", line=3) from None
            if tuple(found) != columns:
                raise PackFormatError(f"columns {','.join(found)[:200]!r}, expected "
                                      f"{','.join(columns)}", line=line)
            rows: list[T] = []
            for line, fields in lines:
                number = len(rows) + 1
                if number > header.card_count:
                    raise PackFormatError(f"more cards than the header's {header.card_count}",
                                          row=number, line=line)
                if len(fields) != len(columns):
                    raise PackFormatError(f"{len(fields)} columns, expected {len(columns)}",
                                          row=number, line=line)
                rows.append(parse_row(fields, number, line))
        except csv.Error as exc:  # raised lazily by the reader, e.g. an oversized field
            raise PackFormatError(f"not CSV: {exc}") from None
    finally:
        csv.field_size_limit(previous)
    if len(rows) != header.card_count:
        raise PackFormatError(f"header says {header.card_count} cards, the file has {len(rows)}")
    return header, rows


def check_serial(value: str, row: int | None = None, line: int | None = None) -> str:
    if not SERIAL_PATTERN.match(value):
        raise PackFormatError(f"serial {value[:40]!r} is malformed", row=row, line=line)
    return value


def _pack_row(fields: list[str], number: int, line: int) -> PackRow:
    return PackRow(check_serial(fields[0], number, line), *(
        decode_base64(name, value, number, line)
        for name, value in zip(COLUMNS[1:], fields[1:], strict=True)))


def read_pack(data: bytes) -> Pack:
    """Parse a pack file and check its shape (PackFormatError with the row and line)."""
    header, rows = read_table(data, HEADER_FIELDS, FORMAT, COLUMNS, _pack_row)
    return Pack(PackHeader(check_name("pack serial", header.fields["pack_serial"]),
                           check_name("provider id", header.fields["provider_id"]),
                           header.card_count, header.created_at), rows)
