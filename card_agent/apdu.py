"""Command APDU structure and status words, as far as a relay needs them.

The agent never interprets what a command does (its data is protected end to
end), but it must know where the header, Lc, data and Le are: to refuse a
malformed command before it reaches the card, to log a sensitive command
without its data, and to re-send a command with a corrected Le (6Cxx).
Parsing follows ISO/IEC 7816-4 cases 1-4 in short and extended form.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER_LEN = 4
SW_LEN = 2
SW_OK = 0x9000
SW_MAX = 0xFFFF
# A zero mask in an expected status means "compare all 16 bits".
FULL_MASK = 0xFFFF

SHORT_MAX = 256
EXTENDED_MAX = 65536
EXTENDED_MARKER = 0x00

# ISO/IEC 7816-4 response handling: "61xx: xx more bytes available" and
# "6Cxx: wrong Le, xx is the right one" (both mostly seen with T=0).
SW1_MORE_DATA = 0x61
SW1_WRONG_LE = 0x6C
INS_GET_RESPONSE = 0xC0
# A card that keeps answering 61xx must not keep us looping forever.
MAX_GET_RESPONSE_ROUNDS = 256


class ApduFormatError(ValueError):
    """A command that is not a well-formed ISO 7816-4 APDU."""


@dataclass(frozen=True)
class CommandApdu:
    """A parsed command APDU. ``le`` is the number of bytes expected (None: no Le)."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    le: int | None
    extended: bool

    @property
    def header(self) -> bytes:
        return bytes((self.cla, self.ins, self.p1, self.p2))

    def with_le(self, le: int) -> CommandApdu:
        return CommandApdu(self.cla, self.ins, self.p1, self.p2, self.data, le, self.extended)

    def encode(self) -> bytes:
        """The APDU bytes, in the same (short or extended) form it was parsed from."""
        out = bytearray(self.header)
        if self.extended:
            if self.data:
                out += bytes((EXTENDED_MARKER,)) + len(self.data).to_bytes(2, "big") + self.data
            if self.le is not None:
                if not self.data:
                    out.append(EXTENDED_MARKER)
                out += (self.le % EXTENDED_MAX).to_bytes(2, "big")
        else:
            if self.data:
                out += bytes((len(self.data),)) + self.data
            if self.le is not None:
                out.append(self.le % SHORT_MAX)
        return bytes(out)


def parse_command(apdu: bytes) -> CommandApdu:
    """Parse ``apdu``; raise ApduFormatError (without quoting its data) when malformed."""
    n = len(apdu)
    if n < HEADER_LEN:
        raise ApduFormatError(f"APDU of {n} bytes is shorter than its 4-byte header")
    cla, ins, p1, p2 = apdu[:HEADER_LEN]
    body = apdu[HEADER_LEN:]
    if not body:
        return CommandApdu(cla, ins, p1, p2, b"", None, False)
    if len(body) == 1:
        return CommandApdu(cla, ins, p1, p2, b"", body[0] or SHORT_MAX, False)
    if body[0] != EXTENDED_MARKER:
        return _parse_short_with_data(cla, ins, p1, p2, body)
    return _parse_extended(cla, ins, p1, p2, body)


def _parse_short_with_data(cla: int, ins: int, p1: int, p2: int, body: bytes) -> CommandApdu:
    lc = body[0]
    if len(body) == 1 + lc:
        return CommandApdu(cla, ins, p1, p2, bytes(body[1:]), None, False)
    if len(body) == 2 + lc:
        return CommandApdu(cla, ins, p1, p2, bytes(body[1:-1]), body[-1] or SHORT_MAX, False)
    raise ApduFormatError(
        f"Lc says {lc} data bytes but the body after Lc has {len(body) - 1}")


def _parse_extended(cla: int, ins: int, p1: int, p2: int, body: bytes) -> CommandApdu:
    if len(body) < 3:
        raise ApduFormatError(f"extended length field truncated ({len(body)} bytes after header)")
    if len(body) == 3:
        le = int.from_bytes(body[1:3], "big") or EXTENDED_MAX
        return CommandApdu(cla, ins, p1, p2, b"", le, True)
    lc = int.from_bytes(body[1:3], "big")
    if lc == 0:
        raise ApduFormatError("extended Lc of zero followed by more bytes")
    rest = len(body) - 3
    if rest == lc:
        return CommandApdu(cla, ins, p1, p2, bytes(body[3:]), None, True)
    if rest == lc + 2:
        le = int.from_bytes(body[-2:], "big") or EXTENDED_MAX
        return CommandApdu(cla, ins, p1, p2, bytes(body[3:-2]), le, True)
    raise ApduFormatError(f"extended Lc says {lc} data bytes but {rest} bytes follow it")


def split_response(response: bytes) -> tuple[bytes, int]:
    """Split a response APDU into (data, sw); raise ApduFormatError when it has no SW."""
    if len(response) < SW_LEN:
        raise ApduFormatError(f"response of {len(response)} bytes has no status word")
    return bytes(response[:-SW_LEN]), int.from_bytes(response[-SW_LEN:], "big")


def status_matches(sw: int, value: int, mask: int) -> bool:
    """The card channel's rule: ``(sw & mask) == (value & mask)``, a zero mask being 0xFFFF."""
    m = mask or FULL_MASK
    return (sw & m) == (value & m)


def logical_channel(cla: int) -> int:
    """Logical channel number coded in an inter-industry or GP-proprietary CLA."""
    if cla & 0x40:
        return 4 + (cla & 0x0F)
    return cla & 0x03


def get_response_command(cla: int, length: int) -> bytes:
    """GET RESPONSE on the logical channel of ``cla`` (no secure messaging bits)."""
    channel = logical_channel(cla)
    get_cla = channel if channel < 4 else 0x40 | (channel - 4)
    return bytes((get_cla, INS_GET_RESPONSE, 0x00, 0x00, length % SHORT_MAX))


def describe_command(cmd: CommandApdu, *, sensitive: bool) -> str:
    """A log rendering: header and lengths always; the data only when not sensitive."""
    text = f"{cmd.header.hex()} lc={len(cmd.data)}"
    if cmd.le is not None:
        text += f" le={cmd.le}"
    if cmd.data and not sensitive:
        text += f" data={cmd.data.hex()}"
    return text


def describe_response(data: bytes, sw: int, *, sensitive: bool) -> str:
    text = f"sw={sw:04x} len={len(data)}"
    if data and not sensitive:
        text += f" data={data.hex()}"
    return text
