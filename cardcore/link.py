"""The link to one card, as both of its ends see it.

A card agent talks to a card through a transport; the transports come from
below the agent (a PC/SC reader) or from beside it (the in-process virtual
card, which is part of ``virtual_psd``). Both ends need the same contract, so
it lives here, below both, rather than in the agent: the virtual card then
plugs into the agent without either importing the other.

Every transport maps its own failures onto two exception types, because the
card channel reports exactly two kinds of link failure to the server: the
card went away (its state is whatever the last completed command left), or
the reader / PC/SC layer failed (the state is unknown).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
