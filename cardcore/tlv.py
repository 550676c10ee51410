"""BER-TLV (ISO/IEC 7816-4 §5.2, ITU-T X.690 subset) as used by GlobalPlatform.

Tags are ``int`` values of their encoded bytes (``0x9F7F``), up to 4 bytes.
Lengths are definite, 1 to 5 bytes. Parsing is strict by default: a length
that runs past the data (truncation), a non-minimal ("overlong") length or
tag, an indefinite length or trailing garbage raise :class:`TlvError`, so a
card answers ``6A80`` instead of acting on data it misread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

MAX_TAG_BYTES: Final = 4
MAX_LENGTH_BYTES: Final = 4


class TlvError(ValueError):
    """Malformed BER-TLV data."""


def encode_tag(tag: int) -> bytes:
    """The bytes of ``tag`` (its int value is its big-endian encoding)."""
    if tag <= 0:
        raise TlvError(f"invalid tag {tag!r}")
    raw = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
    if len(raw) > MAX_TAG_BYTES:
        raise TlvError(f"tag 0x{tag:X} longer than {MAX_TAG_BYTES} bytes")
    multi = raw[0] & 0x1F == 0x1F
    if multi != (len(raw) > 1):
        raise TlvError(f"0x{tag:X} is not a valid BER tag")
    if multi:
        for i, b in enumerate(raw[1:], start=1):
            last = i == len(raw) - 1
            if bool(b & 0x80) == last:
                raise TlvError(f"0x{tag:X} is not a valid BER tag")
    return raw


def encode_length(length: int) -> bytes:
    """Minimal definite-length encoding."""
    if length < 0:
        raise TlvError("negative length")
    if length < 0x80:
        return bytes((length,))
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    if len(raw) > MAX_LENGTH_BYTES:
        raise TlvError(f"length {length} too large")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, value: bytes | Iterable[bytes] = b"") -> bytes:
    """Encode one TLV; ``value`` may be a sequence of already encoded children."""
    body = value if isinstance(value, bytes | bytearray) else b"".join(value)
    return encode_tag(tag) + encode_length(len(body)) + bytes(body)


def is_constructed(tag: int) -> bool:
    first = tag.to_bytes((tag.bit_length() + 7) // 8 or 1, "big")[0]
    return bool(first & 0x20)


@dataclass(frozen=True)
class Tlv:
    """One decoded TLV."""

    tag: int
    value: bytes

    @property
    def constructed(self) -> bool:
        return is_constructed(self.tag)

    def encode(self) -> bytes:
        return tlv(self.tag, self.value)

    def children(self, *, strict: bool = True) -> list[Tlv]:
        """The TLVs inside a constructed value."""
        return parse_tlvs(self.value, strict=strict)

    def __repr__(self) -> str:
        return f"Tlv(0x{self.tag:X}, len={len(self.value)})"


def read_tlv(data: bytes, offset: int = 0, *, strict: bool = True) -> tuple[Tlv, int]:
    """Decode the TLV at ``offset``; returns it and the offset just after it."""
    n = len(data)
    start = offset
    if offset >= n:
        raise TlvError("no tag: data ends")
    first = data[offset]
    if strict and first in (0x00, 0xFF):
        raise TlvError(f"invalid tag byte {first:02X} at offset {offset}")
    tag = first
    offset += 1
    if first & 0x1F == 0x1F:
        count = 1
        while True:
            if offset >= n:
                raise TlvError("truncated tag")
            b = data[offset]
            if strict and count == 1 and b == 0x80:
                raise TlvError("non-minimal tag encoding")
            tag = (tag << 8) | b
            offset += 1
            count += 1
            if count > MAX_TAG_BYTES:
                raise TlvError("tag too long")
            if not b & 0x80:
                break
    if offset >= n:
        raise TlvError(f"truncated length for tag 0x{tag:X}")
    lb = data[offset]
    offset += 1
    if lb < 0x80:
        length = lb
    elif lb == 0x80:
        raise TlvError("indefinite length not supported")
    else:
        nbytes = lb & 0x7F
        if nbytes > MAX_LENGTH_BYTES:
            raise TlvError(f"length field of {nbytes} bytes")
        if offset + nbytes > n:
            raise TlvError(f"truncated length for tag 0x{tag:X}")
        length = int.from_bytes(data[offset:offset + nbytes], "big")
        offset += nbytes
        if strict and (length < 0x80 or length < (1 << (8 * (nbytes - 1)))):
            raise TlvError(f"overlong length encoding for tag 0x{tag:X}")
    end = offset + length
    if end > n:
        raise TlvError(
            f"tag 0x{tag:X} at offset {start} declares {length} bytes, {n - offset} present")
    return Tlv(tag, bytes(data[offset:end])), end


def iter_tlvs(data: bytes, *, strict: bool = True) -> Iterator[Tlv]:
    offset = 0
    while offset < len(data):
        item, offset = read_tlv(data, offset, strict=strict)
        yield item


def parse_tlvs(data: bytes, *, strict: bool = True) -> list[Tlv]:
    """Decode a sequence of TLVs that must fill ``data`` exactly."""
    return list(iter_tlvs(bytes(data), strict=strict))


def parse_single(data: bytes, tag: int | None = None, *, strict: bool = True) -> Tlv:
    """Decode exactly one TLV (optionally of a given tag) filling ``data``."""
    item, end = read_tlv(bytes(data), 0, strict=strict)
    if end != len(data):
        raise TlvError(f"{len(data) - end} trailing bytes after tag 0x{item.tag:X}")
    if tag is not None and item.tag != tag:
        raise TlvError(f"expected tag 0x{tag:X}, got 0x{item.tag:X}")
    return item


def find(items: Iterable[Tlv], tag: int) -> Tlv | None:
    """First item with ``tag``, or ``None``."""
    for item in items:
        if item.tag == tag:
            return item
    return None


def find_all(items: Iterable[Tlv], tag: int) -> list[Tlv]:
    return [item for item in items if item.tag == tag]
