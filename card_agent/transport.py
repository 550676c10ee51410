"""The link to one card: what the script runner and the session need, nothing more.

Kept apart from the protocol logic so the same runner and session work over a
PC/SC reader, the in-process virtual card, or a test double. The contract
itself (``CardTransport`` and its two errors) is ``cardcore.link``'s, shared
with the virtual card; it is re-exported here for the agent's modules.
"""

from __future__ import annotations

from collections.abc import Callable

from cardcore.apdu import ApduError, parse_command
from cardcore.link import (  # noqa: F401  (re-exported: the agent's link contract)
    CardRemovedError,
    CardTransport,
    ReaderError,
    TransportError,
)
from cardcore.processor import apdu_link

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
