"""BER-TLV: multi-byte tags, long-form lengths, strict parsing."""

from __future__ import annotations

import pytest

from cardcore.tlv import (
    Tlv,
    TlvError,
    encode_length,
    encode_tag,
    parse_single,
    parse_tlvs,
    read_tlv,
    tlv,
)

h = bytes.fromhex


def test_multi_byte_tags_and_lengths_round_trip() -> None:
    value = bytes(300)
    raw = tlv(0x9F7F, value)
    assert raw[:5] == h("9F7F82012C")
    item = parse_single(raw, 0x9F7F)
    assert item.value == value and item.encode() == raw
    assert tlv(0x5F2D, b"en") == h("5F2D02656E")
    assert encode_tag(0xBF3E) == h("BF3E")
    assert encode_tag(0x7F8101) == h("7F8101")
    assert parse_single(h("7F810100")).tag == 0x7F8101


@pytest.mark.parametrize("n, encoded", [
    (0, "00"), (0x7F, "7F"), (0x80, "8180"), (0xFF, "81FF"), (0x100, "820100"),
    (0x10000, "83010000"),
])
def test_length_encoding_is_minimal(n: int, encoded: str) -> None:
    assert encode_length(n) == h(encoded)


def test_nested_templates() -> None:
    raw = tlv(0xE3, [tlv(0x4F, h("A000000151000000")), tlv(0x9F70, b"\x0F")])
    outer = parse_single(raw)
    assert outer.constructed
    assert [c.tag for c in outer.children()] == [0x4F, 0x9F70]


@pytest.mark.parametrize("raw, why", [
    ("5A0501020304", "value truncated"),
    ("5A", "length missing"),
    ("9F", "tag truncated"),
    ("5A8105" + "00" * 5, "overlong one-byte long form"),
    ("5A820005" + "00" * 5, "overlong two-byte long form"),
    ("5A8201", "length bytes truncated"),
    ("5A80000000", "indefinite length"),
    ("5A850000000001" + "00", "five length bytes"),
    ("9F807F00", "non-minimal multi-byte tag"),
    ("5A0100" + "FF", "trailing padding byte"),
])
def test_strict_parse_rejects(raw: str, why: str) -> None:
    with pytest.raises(TlvError):
        parse_tlvs(h(raw))


def test_lenient_parse_accepts_overlong_length() -> None:
    items = parse_tlvs(h("5A8102AABB"), strict=False)
    assert items == [Tlv(0x5A, h("AABB"))]


def test_parse_single_rejects_trailing_data_and_wrong_tag() -> None:
    with pytest.raises(TlvError):
        parse_single(h("5A01AA5A01BB"))
    with pytest.raises(TlvError):
        parse_single(h("5A01AA"), 0x5B)


def test_read_tlv_offsets() -> None:
    data = h("5A01AA" "9F7F02BBCC")
    first, off = read_tlv(data)
    second, end = read_tlv(data, off)
    assert (first.value, second.tag, end) == (h("AA"), 0x9F7F, len(data))


def test_invalid_tag_values() -> None:
    for bad in (0, 0x1F, 0x9F80, 0x0102):
        with pytest.raises(TlvError):
            encode_tag(bad)
