"""APDU parsing as the agent uses it (cardcore's model) and the transport's 61xx / 6Cxx handling."""

from __future__ import annotations

import pytest

from card_agent.backoff import Backoff
from card_agent.runner import status_matches
from card_agent.transport import ReaderError, relay_transmit
from cardcore.apdu import ApduError, parse_command


@pytest.mark.parametrize(("hex_apdu", "data", "ne", "extended"), [
    ("80ca9f7f", "", None, False),                       # case 1
    ("80ca9f7f00", "", 256, False),                      # case 2 short, Le=00 -> 256
    ("00a4040005a000000151", "a000000151", None, False),  # case 3 short
    ("00a4040005a00000015100", "a000000151", 256, False),  # case 4 short
    ("80ca9f7f000000", "", 65536, True),                 # case 2 extended
    ("80e20000000003010203", "010203", None, True),      # case 3 extended
])
def test_parse_cases(hex_apdu: str, data: str, ne: int | None, extended: bool) -> None:
    cmd = parse_command(bytes.fromhex(hex_apdu))
    assert cmd.data.hex() == data
    assert cmd.ne == ne
    assert cmd.extended is extended
    assert cmd.encode() == bytes.fromhex(hex_apdu)


def test_parse_extended_with_data_and_le() -> None:
    apdu = bytes.fromhex("80e20000") + b"\x00\x01\x00" + bytes(256) + b"\x00\x00"
    cmd = parse_command(apdu)
    assert len(cmd.data) == 256 and cmd.ne == 65536 and cmd.extended
    assert cmd.encode() == apdu


@pytest.mark.parametrize("hex_apdu", [
    "",            # nothing
    "80ca9f",      # shorter than a header
    "00a4040005a0000001",   # Lc 5, only 4 bytes
    "00a4040002a0000001",   # Lc 2, 4 bytes (neither case 3 nor case 4)
    "80ca9f7f0000",         # extended marker with a truncated length
    "80e2000000000001",     # extended Lc of zero followed by a byte
    "80e2000000000301020300",  # extended Lc 3 with a one-byte Le
])
def test_parse_rejects_malformed(hex_apdu: str) -> None:
    with pytest.raises(ApduError):
        parse_command(bytes.fromhex(hex_apdu))


def test_status_mask_rules() -> None:
    assert status_matches(0x63C2, 0x6300, 0xFF00)
    assert not status_matches(0x6A80, 0x6300, 0xFF00)
    assert status_matches(0x6A82, 0x6A82, 0)        # zero mask: all 16 bits
    assert not status_matches(0x6A83, 0x6A82, 0)


class RawCard:
    """A raw (procedure-byte level) card for the response handling tests."""

    def __init__(self, answers: list[bytes]):
        self.answers = list(answers)
        self.sent: list[bytes] = []

    def __call__(self, apdu: bytes) -> bytes:
        self.sent.append(apdu)
        return self.answers.pop(0)


def test_61xx_is_completed_with_get_response_on_the_same_channel() -> None:
    raw = RawCard([b"\x61\x04", b"\x01\x02\x03\x04\x61\x02", b"\x05\x06\x90\x00"])
    response = relay_transmit(raw)(bytes.fromhex("81ca9f7f00"))
    assert response == bytes.fromhex("010203040506") + b"\x90\x00"
    # GET RESPONSE goes to logical channel 1 (CLA 81 -> 01) with Le = SW2.
    assert raw.sent[1:] == [bytes.fromhex("01c0000004"), bytes.fromhex("01c0000002")]


def test_6cxx_resends_with_the_right_le() -> None:
    raw = RawCard([b"\x6c\x2d", bytes(0x2D) + b"\x90\x00"])
    response = relay_transmit(raw)(bytes.fromhex("80ca9f7f00"))
    assert response == bytes(0x2D) + b"\x90\x00"
    assert raw.sent[1] == bytes.fromhex("80ca9f7f2d")


def test_endless_61xx_is_a_reader_error() -> None:
    def raw(apdu: bytes) -> bytes:
        return b"\x00\x61\x01"

    with pytest.raises(ReaderError):
        relay_transmit(raw)(bytes.fromhex("80ca9f7f00"))


def test_response_without_status_word_is_a_reader_error() -> None:
    with pytest.raises(ReaderError):
        relay_transmit(lambda apdu: b"\x90")(bytes.fromhex("80ca9f7f00"))


def test_relay_sends_the_servers_bytes_unchanged_and_refuses_malformed_ones() -> None:
    extended_short_data = bytes.fromhex("84e20000000003010203")
    raw = RawCard([b"\x90\x00"])
    assert relay_transmit(raw)(extended_short_data) == b"\x90\x00"
    assert raw.sent == [extended_short_data]
    with pytest.raises(ApduError):
        relay_transmit(raw)(bytes.fromhex("80ca9f"))
    assert len(raw.sent) == 1


def test_backoff_grows_caps_and_resets() -> None:
    backoff = Backoff(initial_s=1.0, max_s=8.0, factor=2.0, uniform=lambda lo, hi: hi)
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0
    low = Backoff(initial_s=1.0, max_s=8.0, uniform=lambda lo, hi: lo)
    assert low.next_delay() == 0.5  # jitter reaches down to half the step
    for _ in range(10_000):
        low.next_delay()  # a long outage must not overflow the exponent
