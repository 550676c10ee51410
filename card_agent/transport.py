"""The link to one card: what the script runner and the session need, nothing more.

Kept apart from the protocol logic so the same runner and session work over a
PC/SC reader, the in-process virtual card, or a test double. Every transport
maps its own failures onto two exception types, because the card channel
reports exactly two kinds of link failure to the server: the card went away
(its state is whatever the last completed command left), or the reader /
PC/SC layer failed (the state is unknown).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from card_agent.apdu import (
    MAX_GET_RESPONSE_ROUNDS,
    SW1_MORE_DATA,
    SW1_WRONG_LE,
    ApduFormatError,
    get_response_command,
    parse_command,
    split_response,
)


class TransportError(Exception):
    """A failure of the link to the card (not a status word the card sent)."""


class CardRemovedError(TransportError):
    """The card was removed, reset or powered off while we were talking to it."""


class ReaderError(TransportError):
    """The reader or the smart card service failed; the card's state is unknown."""


@runtime_checkable
class CardTransport(Protocol):
    """A connected card. ``transmit`` returns the response data followed by SW1 SW2."""

    @property
    def atr(self) -> bytes: ...

    @property
    def reader_name(self) -> str: ...

    def transmit(self, apdu: bytes) -> bytes: ...

    def close(self) -> None: ...


RawTransmit = Callable[[bytes], bytes]


def transmit_with_response_handling(raw: RawTransmit, apdu: bytes) -> bytes:
    """Send ``apdu`` through ``raw``, completing 61xx with GET RESPONSE and 6Cxx with a re-send.

    Readers on T=0 (and some cards on T=1) hand out long responses in pieces or
    ask for the right Le; the server's script expects the card's final answer,
    so the transport hides these ISO 7816-4 procedure bytes.
    """
    response = raw(apdu)
    data, sw = _split(response)
    if sw >> 8 == SW1_WRONG_LE:
        try:
            command = parse_command(apdu)
        except ApduFormatError:
            return response
        response = raw(command.with_le(sw & 0xFF or 256).encode())
        data, sw = _split(response)
    if sw >> 8 != SW1_MORE_DATA:
        return response
    collected = bytearray(data)
    cla = apdu[0]
    for _ in range(MAX_GET_RESPONSE_ROUNDS):
        response = raw(get_response_command(cla, sw & 0xFF))
        data, sw = _split(response)
        collected += data
        if sw >> 8 != SW1_MORE_DATA:
            return bytes(collected) + sw.to_bytes(2, "big")
    raise ReaderError(f"card still answering 61xx after {MAX_GET_RESPONSE_ROUNDS} GET RESPONSEs")


def _split(response: bytes) -> tuple[bytes, int]:
    try:
        return split_response(response)
    except ApduFormatError as exc:
        raise ReaderError(str(exc)) from None
