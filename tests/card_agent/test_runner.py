"""The script runner on a scripted card: status rules, stopping, bad scripts, failures."""

from __future__ import annotations

import logging

import pytest

from card_agent.runner import run_script
from cms.v1 import card_channel_pb2 as pb
from tests.card_agent.cards import ScriptedCard
from tests.card_agent.scripts import command, script

SELECT = bytes.fromhex("00a4040008a000000151000000")
GET_DATA = bytes.fromhex("80ca9f7f00")
PUT_KEY = bytes.fromhex("80d8010110") + bytes(range(16))


def test_all_expected_completes_with_data_and_sw() -> None:
    card = ScriptedCard({SELECT: bytes.fromhex("6f10") + b"\x90\x00",
                         GET_DATA: bytes.fromhex("9f7f2a0102") + b"\x90\x00"})
    result = run_script(card, script(7, command(SELECT), command(GET_DATA)))
    assert result.script_id == 7
    assert result.outcome == pb.SCRIPT_COMPLETED
    assert [(r.data.hex(), r.sw) for r in result.responses] == [
        ("6f10", 0x9000), ("9f7f2a0102", 0x9000)]
    assert card.sent == [SELECT, GET_DATA]


def test_empty_expect_means_exactly_9000() -> None:
    card = ScriptedCard(lambda apdu: b"\x90\x01")
    result = run_script(card, script(1, command(GET_DATA)))
    assert result.outcome == pb.SCRIPT_UNEXPECTED_STATUS
    assert result.responses[0].sw == 0x9001


def test_listed_status_words_and_masks() -> None:
    answers = iter([b"\x6a\x82", b"\x63\xc2", b"\x90\x00"])
    card = ScriptedCard(lambda apdu: next(answers))
    result = run_script(card, script(
        2,
        command(SELECT, 0x9000, 0x6A82),             # "not found" accepted here
        command(GET_DATA, (0x6300, 0xFF00)),          # any 63xx
        command(GET_DATA, (0x9000, 0)),               # zero mask = all bits
    ))
    assert result.outcome == pb.SCRIPT_COMPLETED
    assert [r.sw for r in result.responses] == [0x6A82, 0x63C2, 0x9000]


def test_zero_mask_compares_all_bits() -> None:
    card = ScriptedCard(lambda apdu: b"\x6a\x83")
    result = run_script(card, script(3, command(SELECT, (0x6A82, 0))))
    assert result.outcome == pb.SCRIPT_UNEXPECTED_STATUS


def test_stops_at_first_unexpected_status() -> None:
    answers = iter([b"\x90\x00", b"\x6a\x80", b"\x90\x00"])
    card = ScriptedCard(lambda apdu: next(answers))
    result = run_script(card, script(
        4, command(SELECT), command(PUT_KEY, sensitive=True), command(GET_DATA)))
    assert result.outcome == pb.SCRIPT_UNEXPECTED_STATUS
    assert result.stopped_at == 1
    assert [r.sw for r in result.responses] == [0x9000, 0x6A80]
    assert card.sent == [SELECT, PUT_KEY]  # the third command never ran
    assert "6a80" in result.message


@pytest.mark.parametrize("bad", [
    bytes.fromhex("80ca9f"),                  # shorter than a header
    bytes.fromhex("80d8010110") + bytes(8),   # Lc says 16, 8 follow
    b"",
])
def test_bad_command_sends_nothing(bad: bytes) -> None:
    card = ScriptedCard()
    result = run_script(card, script(5, command(SELECT), command(bad), command(GET_DATA)))
    assert result.outcome == pb.SCRIPT_BAD_SCRIPT
    assert result.stopped_at == 1
    assert len(result.responses) == 0
    assert card.sent == []  # not even the valid first command


def test_expected_status_beyond_16_bits_is_a_bad_script() -> None:
    card = ScriptedCard()
    result = run_script(card, script(6, command(SELECT, 0x19000)))
    assert result.outcome == pb.SCRIPT_BAD_SCRIPT
    assert card.sent == []


def test_card_removed_mid_script() -> None:
    card = ScriptedCard(remove_before=3)
    result = run_script(card, script(
        8, command(SELECT), command(GET_DATA), command(PUT_KEY), command(GET_DATA)))
    assert result.outcome == pb.SCRIPT_CARD_REMOVED
    assert result.stopped_at == 2
    assert len(result.responses) == 2


def test_reader_failure() -> None:
    card = ScriptedCard(reader_error_before=2)
    result = run_script(card, script(9, command(SELECT), command(GET_DATA)))
    assert result.outcome == pb.SCRIPT_READER_ERROR
    assert result.stopped_at == 1
    assert "reader unplugged" in result.message


def test_transport_bug_is_a_reader_error_without_its_message() -> None:
    def explode(apdu: bytes) -> bytes:
        raise ValueError("secret-bytes-" + apdu.hex())

    result = run_script(ScriptedCard(explode), script(10, command(PUT_KEY, sensitive=True)))
    assert result.outcome == pb.SCRIPT_READER_ERROR
    assert "ValueError" in result.message
    assert "secret-bytes" not in result.message


def test_response_without_status_word_is_a_reader_error() -> None:
    result = run_script(ScriptedCard(lambda apdu: b"\x90"), script(11, command(SELECT)))
    assert result.outcome == pb.SCRIPT_READER_ERROR


def test_empty_script_completes() -> None:
    result = run_script(ScriptedCard(), script(12))
    assert result.outcome == pb.SCRIPT_COMPLETED
    assert len(result.responses) == 0


def test_sensitive_data_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    key_block = bytes.fromhex("5ec2e7000000000000000000000000aa")
    put_key = bytes.fromhex("80d8010110") + key_block
    secret_reply = bytes.fromhex("c0ffee0000000000000000000000bb")
    public_reply = bytes.fromhex("9f7f2a11223344")

    def respond(apdu: bytes) -> bytes:
        return (secret_reply if apdu == put_key else public_reply) + b"\x90\x00"

    caplog.set_level(logging.DEBUG, logger="card_agent")
    result = run_script(ScriptedCard(respond), script(
        13, command(GET_DATA), command(put_key, sensitive=True)))
    assert result.outcome == pb.SCRIPT_COMPLETED
    text = "\n".join(str(getattr(r, "fields", "")) + r.getMessage() for r in caplog.records)
    assert key_block.hex() not in text
    assert secret_reply.hex() not in text
    assert "80d80101" in text          # the sensitive command's header is there
    assert public_reply.hex() in text  # non-sensitive data is logged
    assert GET_DATA[:4].hex() in text
