"""The APDU processors, each on its own and stacked as the host driver stacks them."""

from __future__ import annotations

import pytest

from cardcore import host
from cardcore.apdu import ApduError, CommandApdu, ResponseApdu, parse_command
from cardcore.diversify import StaticKeySet
from cardcore.processor import (
    ApduFormatter,
    ApduProcessor,
    CommandChaining,
    ResponseChaining,
    ResponseChainingError,
    SecureMessaging,
    apdu_link,
    get_response_command,
)
from cardcore.scp03 import MacError
from tests.cardcore.test_scp03_vectors import (
    CASES,
    EXCHANGES,
    GET_EID,
    GET_EID_PLAIN_RESPONSE,
    Exchange,
    _open,
)

h = bytes.fromhex


class RawCard:
    """A card at the procedure-byte level: answers in order, records what it was sent."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = list(answers)
        self.sent: list[bytes] = []

    def __call__(self, apdu: bytes) -> bytes:
        self.sent.append(bytes(apdu))
        return self.answers.pop(0)


class Recorder(ApduProcessor):
    """The layer below a processor under test: records commands, answers from a list."""

    def __init__(self, answers: list[ResponseApdu]) -> None:
        self.answers = list(answers)
        self.sent: list[CommandApdu] = []

    def send(self, command: CommandApdu) -> ResponseApdu:
        self.sent.append(command)
        return self.answers.pop(0)


OK = ResponseApdu(b"", 0x9000)


# formatting ----------------------------------------------------------------

def test_formatter_sends_each_command_in_the_form_it_carries() -> None:
    card = RawCard([b"\x90\x00"] * 3)
    link = ApduFormatter(card)
    assert link.send(CommandApdu(0x80, 0xCA, 0x9F, 0x7F, ne=256)) == OK
    link.send(CommandApdu(0x80, 0xE2, 0x90, 0x00, bytes(300)))
    link.send(CommandApdu(0x80, 0xE2, 0x90, 0x00, b"\x01", extended=True))
    assert card.sent[0] == h("80CA9F7F00")
    assert card.sent[1][4:7] == h("00012C") and len(card.sent[1]) == 307
    assert card.sent[2] == h("80E2900000000101")


def test_short_formatter_refuses_extended_commands_unsent() -> None:
    card = RawCard([b"\x90\x00"])
    link = ApduFormatter(card, extended_length=False)
    for command in (CommandApdu(0x80, 0xE2, 0x90, 0x00, bytes(256)),
                    CommandApdu(0x80, 0xCA, 0x9F, 0x7F, ne=65536),
                    CommandApdu(0x80, 0xE2, 0x90, 0x00, b"\x01", extended=True)):
        with pytest.raises(ApduError, match="extended length"):
            link.send(command)
    assert card.sent == []
    assert link.send(CommandApdu(0x80, 0xE2, 0x90, 0x00, bytes(255), ne=256)) == OK
    assert card.sent[0][4] == 0xFF and len(card.sent[0]) == 4 + 1 + 255 + 1


def test_formatter_refuses_an_answer_without_status_word() -> None:
    with pytest.raises(ApduError):
        ApduFormatter(RawCard([b"\x90"])).send(CommandApdu(0x80, 0xCA, 0x9F, 0x7F))


def test_transmit_takes_and_gives_bytes_and_refuses_malformed_commands() -> None:
    card = RawCard([h("01029000")])
    link = apdu_link(card)
    assert link.transmit(h("80CA9F7F00")) == h("01029000")
    with pytest.raises(ApduError):
        link.transmit(h("80CA9F"))
    assert card.sent == [h("80CA9F7F00")]


# response chaining ---------------------------------------------------------

def test_61xx_is_completed_with_get_response_on_the_same_channel() -> None:
    card = RawCard([b"\x61\x04", h("01020304") + b"\x61\x02", h("0506") + b"\x90\x00"])
    response = apdu_link(card).transmit(h("81CA9F7F00"))
    assert response == h("010203040506") + b"\x90\x00"
    # GET RESPONSE goes to logical channel 1 (CLA 81 -> 01) with Le = SW2.
    assert card.sent[1:] == [h("01C0000004"), h("01C0000002")]


def test_61xx_keeps_the_last_status_word_and_61_00_asks_for_256() -> None:
    card = RawCard([h("AA6100"), bytes(256) + h("6283")])
    response = apdu_link(card).send(CommandApdu(0x00, 0xB0, 0, 0, ne=256))
    assert response == ResponseApdu(b"\xAA" + bytes(256), 0x6283)
    assert card.sent[1] == h("00C0000000")


def test_get_response_keeps_the_logical_channel_of_any_cla() -> None:
    assert get_response_command(0x84, 0x10).encode() == h("00C0000010")  # SM bits dropped
    assert get_response_command(0x83, 1).cla == 0x03
    assert get_response_command(0x45, 1).cla == 0x45  # further channel 9
    assert get_response_command(0xE0, 1).cla == 0x40  # GP proprietary, channel 4


def test_6cxx_resends_with_the_le_the_card_asked_for() -> None:
    card = RawCard([b"\x6c\x2d", bytes(0x2D) + b"\x90\x00"])
    response = apdu_link(card).transmit(h("80CA9F7F00"))
    assert response == bytes(0x2D) + b"\x90\x00"
    assert card.sent == [h("80CA9F7F00"), h("80CA9F7F2D")]


def test_6cxx_then_61xx_are_both_handled() -> None:
    below = Recorder([ResponseApdu(b"", 0x6C00), ResponseApdu(b"\x01", 0x6101),
                      ResponseApdu(b"\x02", 0x9000)])
    command = CommandApdu(0x80, 0xCA, 0x9F, 0x7F, ne=4)
    assert ResponseChaining(below).send(command) == ResponseApdu(b"\x01\x02", 0x9000)
    assert below.sent[1] == command.replace(ne=256)
    assert below.sent[2] == CommandApdu(0x00, 0xC0, 0, 0, ne=1)


def test_endless_61xx_stops() -> None:
    def card(apdu: bytes) -> bytes:
        return b"\x00\x61\x01"

    with pytest.raises(ResponseChainingError, match="61xx"):
        apdu_link(card).transmit(h("80CA9F7F00"))


def test_other_status_words_pass_unchanged() -> None:
    card = RawCard([h("6A82")])
    assert apdu_link(card).transmit(h("00A4040000")) == h("6A82")
    assert len(card.sent) == 1


# command chaining ----------------------------------------------------------

def test_long_command_goes_as_a_chain_of_short_apdus() -> None:
    data = bytes(range(256)) * 2
    card = RawCard([b"\x90\x00", b"\x90\x00", h("AB9000")])
    stack = CommandChaining(apdu_link(card, extended_length=False))
    response = stack.send(CommandApdu(0x80, 0xE2, 0x90, 0x00, data, ne=256))
    assert response == ResponseApdu(b"\xAB", 0x9000)
    sent = [parse_command(apdu) for apdu in card.sent]
    assert [len(c.data) for c in sent] == [255, 255, 2]
    assert [c.cla for c in sent] == [0x90, 0x90, 0x80]
    assert [c.ne for c in sent] == [None, None, 256]
    assert not any(c.extended for c in sent)
    assert b"".join(c.data for c in sent) == data


def test_a_refused_link_ends_the_chain_with_its_answer() -> None:
    card = RawCard([h("6884")])
    stack = CommandChaining(apdu_link(card, extended_length=False), max_data=100)
    assert stack.send(CommandApdu(0x80, 0xE2, 0, 0, bytes(250))) == ResponseApdu(b"", 0x6884)
    assert len(card.sent) == 1


def test_commands_that_fit_go_down_unchanged() -> None:
    below = Recorder([OK, OK])
    stack = CommandChaining(below)
    extended = CommandApdu(0x80, 0xE2, 0, 0, bytes(10), extended=True)
    stack.send(extended)
    stack.send(CommandApdu(0x80, 0xE2, 0, 0, bytes(255)))
    assert below.sent[0] is extended and len(below.sent) == 2


def test_a_chain_whose_le_does_not_fit_a_short_apdu_is_refused() -> None:
    with pytest.raises(ApduError):
        CommandChaining(Recorder([])).send(CommandApdu(0x80, 0xE2, 0, 0, bytes(300), ne=1000))


# secure messaging -------------------------------------------------------------

class ReplayCard:
    """Checks each command against a recorded exchange and answers as the card did."""

    def __init__(self, exchange: list[tuple[bytes, bytes]]) -> None:
        self.exchange = list(exchange)

    def __call__(self, apdu: bytes) -> bytes:
        expected, answer = self.exchange.pop(0)
        assert apdu == expected
        return answer


@pytest.mark.parametrize("ex", EXCHANGES, ids=lambda e: e.name)
def test_secure_messaging_reproduces_the_recorded_exchange(ex: Exchange) -> None:
    channel, _ = _open(ex)
    card = ReplayCard([(h(ex.get_eid), h(ex.get_eid_rsp) + b"\x90\x00")]
                      + [(h(wrapped), b"\x6a\x88") for wrapped in ex.cases])
    stack = SecureMessaging(apdu_link(card), channel)
    assert stack.transmit(GET_EID) == GET_EID_PLAIN_RESPONSE + b"\x90\x00"
    # The MAC chain and counter run on; error status words come back bare.
    for plain in CASES:
        assert stack.send(parse_command(plain)) == ResponseApdu(b"", 0x6A88)
    assert card.exchange == []


def test_secure_messaging_refuses_an_altered_answer() -> None:
    ex = EXCHANGES[2]
    channel, _ = _open(ex)
    answer = bytearray(h(ex.get_eid_rsp))
    answer[0] ^= 1
    stack = SecureMessaging(apdu_link(ReplayCard([(h(ex.get_eid), bytes(answer) + b"\x90\x00")])),
                            channel)
    with pytest.raises(MacError):
        stack.transmit(GET_EID)


def test_secure_messaging_joins_61xx_pieces_below_the_r_mac() -> None:
    ex = EXCHANGES[2]  # AES128-33: R-MAC and R-ENCRYPTION over the whole answer
    channel, _ = _open(ex)
    answer = h(ex.get_eid_rsp)
    card = ReplayCard([(h(ex.get_eid), answer[:20] + bytes((0x61, len(answer) - 20))),
                       (bytes((0x00, 0xC0, 0, 0, len(answer) - 20)), answer[20:] + b"\x90\x00")])
    stack = SecureMessaging(apdu_link(card), channel)
    assert stack.send(parse_command(GET_EID)) == ResponseApdu(GET_EID_PLAIN_RESPONSE, 0x9000)


# the host driver's stack ----------------------------------------------------

def test_a_session_over_a_short_link_chains_each_link_wrapped() -> None:
    from cardcore.scp03 import CardChannel

    keys = StaticKeySet(bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48)))
    host_challenge = bytes(8)
    card_channel, cryptogram = CardChannel.begin(keys.enc, keys.mac, host_challenge,
                                                 b"\x11" * 8)
    iu = bytes(10) + b"\x30\x03\x60" + b"\x11" * 8 + cryptogram
    received: list[CommandApdu] = []

    def card(apdu: bytes) -> bytes:
        command = parse_command(apdu)
        assert len(apdu) <= 261 and not command.extended
        if command.ins == 0x50:
            return iu + b"\x90\x00"
        if command.ins == 0x82:
            card_channel.external_authenticate(command)
            return b"\x90\x00"
        received.append(card_channel.unwrap_command(command))
        return card_channel.wrap_response(b"", 0x9000)

    session = host.open_session(card, kvn=0x30, keys=keys, host_challenge=host_challenge,
                                select=False, extended_length=False)
    data = bytes(range(256)) * 3
    assert session.send(CommandApdu(0x80, 0xE2, 0x90, 0x00, data)) == (b"", 0x9000)
    assert [len(c.data) for c in received] == [239, 239, 239, 51]
    assert all(c.is_chained for c in received[:-1]) and not received[-1].is_chained
    assert b"".join(c.data for c in received) == data
