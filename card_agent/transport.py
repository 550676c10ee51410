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

from cardcore.apdu import ApduError, parse_command
from cardcore.processor import apdu_link


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


def relay_transmit(raw: RawTransmit) -> RawTransmit:
    """``transmit`` for a card transport over ``raw``: cardcore's plain processor stack.

    Readers on T=0 (and some cards on T=1) hand out long responses in pieces or
    ask for the right Le; the server's script expects the card's final answer,
    so the transport hides these ISO 7816-4 procedure bytes. The commands are
    the server's, already wrapped for the card: they go in the form they came
    in, never chained or reformatted. A malformed command raises ApduError
    unsent; an answer the stack cannot make sense of (no status word, 61xx
    without end) is a ReaderError, since the card's state is then unknown.
    """
    processor = apdu_link(raw)

    def transmit(apdu: bytes) -> bytes:
        command = parse_command(apdu)
        try:
            return processor.send(command).encode()
        except ApduError as exc:
            raise ReaderError(str(exc)) from None

    return transmit
