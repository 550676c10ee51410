"""Command and response APDUs (ISO/IEC 7816-3 §12.1 and 7816-4 §5.1).

A command is held as its fields with ``ne`` (the expected response length,
``None`` when there is no Le field, 256 or 65536 for a zero Le), never as a
raw Le byte: "Le = 00" means 256 in short form and 65536 in extended form,
and keeping Ne avoids mixing the two. Parsing is strict: every length must
agree with the number of bytes received, so a card can answer ``6700``
instead of guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

SHORT_MAX_DATA: Final = 255
SHORT_MAX_NE: Final = 256
EXTENDED_MAX_DATA: Final = 65535
EXTENDED_MAX_NE: Final = 65536

CLA_CHAINING: Final = 0x10  # ISO 7816-4: "command is not the last of a chain"


class ApduError(ValueError):
    """A malformed APDU: lengths that do not add up, out-of-range fields."""


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ApduError(f"{name} must be one byte, got {value!r}")


@dataclass(frozen=True)
class CommandApdu:
    """One command APDU.

    ``extended`` records that the command was (or must be) sent in extended
    length form; SCP03 MACs cover the Lc field exactly as transmitted, so the
    form is part of the command's identity.
    """

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int | None = None
    extended: bool = False

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            _check_byte(name, getattr(self, name))
        if len(self.data) > EXTENDED_MAX_DATA:
            raise ApduError(f"command data too long ({len(self.data)} bytes)")
        if self.ne is not None and not 1 <= self.ne <= EXTENDED_MAX_NE:
            raise ApduError(f"Ne must be 1..65536, got {self.ne}")
        needs_extended = len(self.data) > SHORT_MAX_DATA or (
            self.ne is not None and self.ne > SHORT_MAX_NE)
        if needs_extended and not self.extended:
            object.__setattr__(self, "extended", True)

    @property
    def header(self) -> bytes:
        return bytes((self.cla, self.ins, self.p1, self.p2))

    @property
    def case(self) -> int:
        """ISO 7816-3 case: 1 (no data, no Le), 2 (Le), 3 (data), 4 (both)."""
        return 1 + (self.ne is not None) + 2 * bool(self.data)

    @property
    def is_chained(self) -> bool:
        """CLA says more commands of the same chain follow (bit b5 of CLA)."""
        return self.cla != 0xFF and bool(self.cla & CLA_CHAINING)

    def encode_lc(self, lc: int | None = None) -> bytes:
        """The Lc field for ``lc`` data bytes (default: this command's), in this form."""
        n = len(self.data) if lc is None else lc
        if n == 0:
            return b""
        if self.extended or n > SHORT_MAX_DATA:
            return b"\x00" + n.to_bytes(2, "big")
        return bytes((n,))

    def encode_le(self) -> bytes:
        if self.ne is None:
            return b""
        if self.extended:
            le = (self.ne & 0xFFFF).to_bytes(2, "big")
            # Without a Lc field the extended Le carries its own 00 marker.
            return le if self.data else b"\x00" + le
        return bytes((self.ne & 0xFF,))

    def encode(self) -> bytes:
        return self.header + self.encode_lc() + self.data + self.encode_le()

    def replace(self, **changes: object) -> CommandApdu:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, raw: bytes) -> CommandApdu:
        return parse_command(raw)

    def __repr__(self) -> str:
        # Header and lengths only: command data may carry protected keys.
        return (f"CommandApdu({self.header.hex().upper()}, lc={len(self.data)}, "
                f"ne={self.ne}, extended={self.extended})")


def parse_command(raw: bytes) -> CommandApdu:
    """Decode a command APDU, enforcing ISO 7816-3 §12.1.3 length rules."""
    raw = bytes(raw)
    n = len(raw)
    if n < 4:
        raise ApduError(f"command APDU too short ({n} bytes)")
    cla, ins, p1, p2 = raw[:4]
    if n == 4:
        return CommandApdu(cla, ins, p1, p2)
    b5 = raw[4]
    if n == 5:
        return CommandApdu(cla, ins, p1, p2, ne=b5 or SHORT_MAX_NE)
    if b5 != 0:
        lc = b5
        if n == 5 + lc:
            return CommandApdu(cla, ins, p1, p2, raw[5:5 + lc])
        if n == 6 + lc:
            return CommandApdu(cla, ins, p1, p2, raw[5:5 + lc], ne=raw[-1] or SHORT_MAX_NE)
        raise ApduError(f"short Lc {lc} does not match APDU length {n}")
    if n < 7:
        raise ApduError(f"extended APDU too short ({n} bytes)")
    if n == 7:
        le = int.from_bytes(raw[5:7], "big")
        return CommandApdu(cla, ins, p1, p2, ne=le or EXTENDED_MAX_NE, extended=True)
    lc = int.from_bytes(raw[5:7], "big")
    if lc == 0:
        raise ApduError("extended Lc of zero")
    if n == 7 + lc:
        return CommandApdu(cla, ins, p1, p2, raw[7:7 + lc], extended=True)
    if n == 9 + lc:
        le = int.from_bytes(raw[-2:], "big")
        return CommandApdu(cla, ins, p1, p2, raw[7:7 + lc], ne=le or EXTENDED_MAX_NE,
                           extended=True)
    raise ApduError(f"extended Lc {lc} does not match APDU length {n}")


def encode_command(cla: int, ins: int, p1: int, p2: int, data: bytes = b"",
                   ne: int | None = None, *, extended: bool = False) -> bytes:
    """Shorthand for ``CommandApdu(...).encode()``."""
    return CommandApdu(cla, ins, p1, p2, bytes(data), ne, extended).encode()


def chain_command(command: CommandApdu, max_data: int = SHORT_MAX_DATA) -> list[CommandApdu]:
    """Split a long command into an ISO 7816-4 command chain of short APDUs.

    Every command but the last has the chaining bit set in CLA and no Le; the
    last one keeps the original Le. A command that fits is returned alone.
    """
    if not 1 <= max_data <= SHORT_MAX_DATA:
        raise ApduError("chunk size must be 1..255")
    if len(command.data) <= max_data and (command.ne or 0) <= SHORT_MAX_NE:
        return [command.replace(extended=False)]
    if command.ne is not None and command.ne > SHORT_MAX_NE:
        raise ApduError("a chained command's Ne must fit a short Le")
    chunks = [command.data[i:i + max_data] for i in range(0, len(command.data), max_data)]
    out = [command.replace(cla=command.cla | CLA_CHAINING, data=c, ne=None, extended=False)
           for c in chunks[:-1]]
    out.append(command.replace(data=chunks[-1], extended=False))
    return out


@dataclass(frozen=True)
class ResponseApdu:
    """A response: data field and status word."""

    data: bytes
    sw: int

    def __post_init__(self) -> None:
        if not 0 <= self.sw <= 0xFFFF:
            raise ApduError(f"status word out of range: {self.sw!r}")

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @classmethod
    def parse(cls, raw: bytes) -> ResponseApdu:
        data, sw = parse_response(raw)
        return cls(data, sw)

    def __repr__(self) -> str:
        return f"ResponseApdu(len={len(self.data)}, sw={self.sw:04X})"


def parse_response(raw: bytes) -> tuple[bytes, int]:
    """Split a response APDU into ``(data, sw)``."""
    raw = bytes(raw)
    if len(raw) < 2:
        raise ApduError(f"response APDU too short ({len(raw)} bytes)")
    return raw[:-2], int.from_bytes(raw[-2:], "big")


def encode_response(data: bytes, sw: int) -> bytes:
    return ResponseApdu(bytes(data), sw).encode()
