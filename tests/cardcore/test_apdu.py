"""Command/response APDU encoding and strict parsing (ISO/IEC 7816-3 §12.1, 7816-4 §5.1)."""

from __future__ import annotations

import pytest

from cardcore.apdu import (
    ApduError,
    CommandApdu,
    ResponseApdu,
    chain_command,
    encode_command,
    parse_command,
    parse_response,
)

h = bytes.fromhex


@pytest.mark.parametrize("raw, case, ne, data, extended", [
    ("80F22002", 1, None, "", False),
    ("80CA9F7F00", 2, 256, "", False),
    ("80CA9F7F10", 2, 16, "", False),
    ("80E2900003010203", 3, None, "010203", False),
    ("80E290000301020300", 4, 256, "010203", False),
    ("80CA9F7F000000", 2, 65536, "", True),
    ("80CA9F7F000102", 2, 258, "", True),
    ("80E29000000003010203", 3, None, "010203", True),
    ("80E29000000003010203" + "0000", 4, 65536, "010203", True),
])
def test_parse_cases(raw: str, case: int, ne: int | None, data: str, extended: bool) -> None:
    cmd = parse_command(h(raw))
    assert (cmd.case, cmd.ne, cmd.data, cmd.extended) == (case, ne, h(data), extended)
    assert cmd.encode() == h(raw)  # round trip keeps the form


@pytest.mark.parametrize("raw", [
    "", "80", "80CA9F",            # shorter than a header
    "80E2900005010203",            # Lc says 5, 3 present
    "80E290000301020300AA",        # one byte too many
    "80E290000000",                # 6 bytes: neither short nor extended
    "80E2900000000000",            # extended Lc of zero
    "80E2900000000301",            # extended Lc 3, 1 byte present
    "80E2900000000301020300",      # extended case 4 needs a 2-byte Le
])
def test_malformed_commands_raise(raw: str) -> None:
    with pytest.raises(ApduError):
        parse_command(h(raw))


def test_long_data_switches_to_extended_length() -> None:
    data = bytes(300)
    raw = encode_command(0x80, 0xE2, 0x90, 0x00, data, ne=256)
    assert raw[4:7] == b"\x00\x01\x2C" and raw[-2:] == b"\x01\x00"
    assert parse_command(raw).data == data


def test_ne_limits() -> None:
    assert CommandApdu(0, 0xB0, 0, 0, ne=256).encode() == h("00B0000000")
    assert CommandApdu(0, 0xB0, 0, 0, ne=65536).encode() == h("00B00000000000")
    with pytest.raises(ApduError):
        CommandApdu(0, 0xB0, 0, 0, ne=65537)
    with pytest.raises(ApduError):
        CommandApdu(0x100, 0xB0, 0, 0)


def test_command_chaining_split() -> None:
    cmd = CommandApdu(0x80, 0xE2, 0x90, 0x00, bytes(range(256)) * 2, ne=256)
    parts = chain_command(cmd)
    assert [len(p.data) for p in parts] == [255, 255, 2]
    assert all(p.cla == 0x90 and p.ne is None and p.is_chained for p in parts[:-1])
    assert parts[-1].cla == 0x80 and parts[-1].ne == 256 and not parts[-1].is_chained
    assert b"".join(p.data for p in parts) == cmd.data
    assert all(len(p.encode()) <= 261 for p in parts)
    assert chain_command(CommandApdu(0x80, 0xCA, 0, 0x66, ne=256)) == [
        CommandApdu(0x80, 0xCA, 0, 0x66, ne=256)]


def test_response_split() -> None:
    assert parse_response(h("01029000")) == (h("0102"), 0x9000)
    assert ResponseApdu.parse(h("6A88")).sw1 == 0x6A
    with pytest.raises(ApduError):
        parse_response(b"\x90")


def test_repr_hides_command_data() -> None:
    secret = bytes.fromhex("DEADBEEFDEADBEEF")
    assert secret.hex() not in repr(CommandApdu(0x80, 0xD8, 0, 0x81, secret)).lower()
