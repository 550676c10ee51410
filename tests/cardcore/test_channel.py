"""Secure channel behaviour beyond the published vectors: pre-wrapped scripts
and resynchronisation, error status words, S16, and a cross-check against
yubikey-manager's independent SCP03 host (yubikit)."""

from __future__ import annotations

import os

import pytest

from cardcore.apdu import parse_command
from cardcore.scp03 import (
    CardChannel,
    HostChannel,
    MacError,
    Scp03Error,
    cmac_prf,
    open_host_channel,
)

ENC, MAC = bytes(range(16)), bytes(range(16, 32))
HOST_CHALLENGE, CARD_CHALLENGE = bytes.fromhex("0102030405060708"), bytes.fromhex(
    "1112131415161718")
GET_DATA = bytes.fromhex("80CA9F7F00")


def _pair(level: int = 0x33, enc: bytes = ENC, mac: bytes = MAC, host_challenge: bytes =
          HOST_CHALLENGE, card_challenge: bytes = CARD_CHALLENGE
          ) -> tuple[HostChannel, CardChannel]:
    card, cryptogram = CardChannel.begin(enc, mac, host_challenge, card_challenge)
    response = (bytes(10) + bytes((0x30, 0x03, 0x60 | (len(card_challenge) == 16)))
                + card_challenge + cryptogram)
    host, ext_auth = open_host_channel(cmac_prf(enc), cmac_prf(mac), host_challenge, response,
                                       key_length=len(enc), security_level=level)
    card.external_authenticate(parse_command(ext_auth))
    return host, card


def _card_run(card: CardChannel, wrapped: bytes, sw: int = 0x9000,
              data: bytes = b"\xAA\xBB") -> bytes:
    cmd = card.unwrap_command(parse_command(wrapped))
    assert cmd.cla & 0x04 == 0
    return card.wrap_response(data if sw == 0x9000 else b"", sw)


@pytest.mark.parametrize("level", [0x01, 0x03, 0x11, 0x13, 0x33])
def test_round_trip_at_each_level(level: int) -> None:
    host, card = _pair(level)
    for payload in (b"", b"\x01", bytes(15), bytes(16), bytes(200)):
        apdu = bytes.fromhex("80E29000") + bytes([len(payload)]) + payload if payload \
            else bytes.fromhex("80F28000")
        wrapped = host.wrap(apdu)
        plain = card.unwrap_command(parse_command(wrapped))
        assert plain.data == payload
        response = card.wrap_response(b"reply" * 3, 0x9000)
        if level & 0x20:
            assert b"reply" not in response
        assert host.unwrap(response) == (b"reply" * 3, 0x9000)


def test_error_status_words_carry_no_r_mac() -> None:
    host, card = _pair(0x33)
    response = _card_run(card, host.wrap(GET_DATA), sw=0x6A88)
    assert response == b"\x6a\x88"
    assert host.unwrap(response) == (b"", 0x6A88)
    # Warnings are protected like 9000.
    response = card.copy().wrap_response(b"", 0x6310)
    assert len(response) == 8 + 2


def test_script_resync_after_the_card_stopped() -> None:
    host, card = _pair(0x33)
    script = host.wrap_script([GET_DATA] * 5)
    # The card answers the first two, fails the third with an error status word
    # (its MAC verified, so its chaining value moved on) and never sees 4 and 5.
    responses = [_card_run(card, script[0][0]), _card_run(card, script[1][0]),
                 _card_run(card, script[2][0], sw=0x6985)]
    results = host.unwrap_script(responses, [cp for _, cp in script])
    assert [sw for _, sw in results] == [0x9000, 0x9000, 0x6985]
    assert results[0][0] == b"\xAA\xBB"
    # The host is now where the card is: a new command verifies.
    assert host.unwrap(_card_run(card, host.wrap(GET_DATA))) == (b"\xAA\xBB", 0x9000)


def test_external_authenticate_is_command_zero_of_a_script() -> None:
    """The EXTERNAL AUTHENTICATE response (never R-MACed) unwraps against the
    checkpoint the channel has when it opens, like any later response."""
    host, card = _pair(0x33)
    opened = host.checkpoint()
    script = host.wrap_script([GET_DATA, GET_DATA])
    responses = [b"\x90\x00", _card_run(card, script[0][0])]
    results = host.unwrap_script(responses, [opened, script[0][1], script[1][1]])
    assert results == [(b"", 0x9000), (b"\xAA\xBB", 0x9000)]
    # A later response without its R-MAC is still refused.
    with pytest.raises(MacError):
        host.unwrap(b"\x90\x00", script[0][1])


def test_without_resync_the_card_refuses() -> None:
    host, card = _pair(0x33)
    script = host.wrap_script([GET_DATA] * 3)
    _card_run(card, script[0][0])
    # The host goes on from the end of its script, the card stopped after 1.
    with pytest.raises(MacError):
        card.unwrap_command(parse_command(host.wrap(GET_DATA)))


def test_copy_and_checkpoint_are_independent() -> None:
    host, _card = _pair(0x13)
    fork = host.copy()
    first = host.wrap(GET_DATA)
    assert fork.wrap(GET_DATA) == first  # same state, same output
    assert host.wrap(GET_DATA) != first  # the chaining value moved on
    cp = host.checkpoint()
    host.wrap(GET_DATA)
    host.resync(cp)
    assert host.checkpoint() == cp


def test_replayed_and_altered_commands_fail() -> None:
    host, card = _pair(0x03)
    wrapped = host.wrap(bytes.fromhex("80E2900003010203"))
    card.unwrap_command(parse_command(wrapped))
    with pytest.raises(MacError):
        card.unwrap_command(parse_command(wrapped))  # replay
    host2, card2 = _pair(0x03)
    bad = bytearray(host2.wrap(bytes.fromhex("80E2900003010203")))
    bad[3] ^= 0x01  # P2
    with pytest.raises(MacError):
        card2.unwrap_command(parse_command(bytes(bad)))


def test_s16_mode() -> None:
    host, card = _pair(0x33, host_challenge=bytes(range(16)),
                       card_challenge=bytes(range(16, 32)))
    assert host.mac_length == 16 and card.mac_length == 16
    wrapped = host.wrap(GET_DATA)
    assert card.unwrap_command(parse_command(wrapped)).ins == 0xCA
    assert host.unwrap(card.wrap_response(b"x", 0x9000)) == (b"x", 0x9000)


def test_invalid_levels_and_challenges() -> None:
    with pytest.raises(Scp03Error):
        _pair(0x02)
    with pytest.raises(Scp03Error):
        _pair(0x33, host_challenge=bytes(8), card_challenge=bytes(16))


def test_yubikit_host_against_our_card_channel() -> None:
    """yubikit's own SCP03 host implementation talks to cardcore's card side."""
    from yubikit.core.smartcard import ScpProcessor, ShortApduFormatter
    from yubikit.core.smartcard.scp import KeyRef, Scp03KeyParams, ScpState, StaticKeys

    dek = bytes(range(32, 48))
    state: dict[str, CardChannel] = {}

    def send_init(cla: int, ins: int, p1: int, p2: int, data: bytes) -> bytes:
        card_challenge = os.urandom(8)
        card, cryptogram = CardChannel.begin(ENC, MAC, data, card_challenge)
        state["card"] = card
        return bytes(10) + bytes((p1, 0x03, 0x70)) + card_challenge + cryptogram

    params = Scp03KeyParams(KeyRef(0x01, 0x30), StaticKeys(ENC, MAC, dek))
    scp, host_cryptogram = ScpState.scp03_init(send_init, params)
    card = state["card"]
    seen: list[bytes] = []

    class Delegate:
        def send_apdu(self, cla, ins, p1, p2, data, le):
            apdu = ShortApduFormatter().format_apdu(cla, ins, p1, p2, data, le)
            seen.append(apdu)
            cmd = parse_command(apdu)
            if ins == 0x82:
                card.external_authenticate(cmd)
                return b"", 0x9000
            plain = card.unwrap_command(cmd)
            assert (plain.ins, plain.p1, plain.p2) == (0xCA, 0x9F, 0x7F)
            raw = card.wrap_response(b"\x9f\x7f\x01\x42", 0x9000)
            return raw[:-2], 0x9000

    processor = ScpProcessor(Delegate(), ShortApduFormatter(), scp)
    processor.send_apdu(0x84, 0x82, 0x33, 0x00, host_cryptogram, 0, encrypt=False)
    for _ in range(3):
        data, sw = processor.send_apdu(0x80, 0xCA, 0x9F, 0x7F, b"", 0)
        assert (data, sw) == (b"\x9f\x7f\x01\x42", 0x9000)
    assert all(a[0] == 0x84 for a in seen)


@pytest.mark.parametrize("level", [0x01, 0x03, 0x11, 0x13, 0x33])
def test_the_host_foresees_the_cards_exact_answers(level: int) -> None:
    """expected_response at a command's checkpoint is byte for byte what the card
    sends: the answers of a pre-wrapped script can be checked by comparison."""
    host, card = _pair(level)
    opened = host.checkpoint()
    script = host.wrap_script([GET_DATA, GET_DATA, GET_DATA])
    assert host.expected_response(b"", 0x9000, opened) == b"\x90\x00"   # EXTERNAL AUTHENTICATE
    for (wrapped, checkpoint), data in zip(script, (b"\x00", bytes(16), b""), strict=True):
        answer = _card_run(card, wrapped, data=data)
        assert host.expected_response(data, 0x9000, checkpoint) == answer
        assert host.unwrap(answer, checkpoint) == (data, 0x9000)
        # Other data (a PUT KEY's other KCVs) gives other bytes.
        assert host.expected_response(data + b"\x01", 0x9000, checkpoint) != answer
    # An error status word is foreseen bare, as the card sends it.
    assert host.expected_response(b"", 0x6A88, script[0][1]) == b"\x6a\x88"
