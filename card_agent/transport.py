"""The link to one card: what the script runner and the session need, nothing more.

Kept apart from the protocol logic so the same runner and session work over a
PC/SC reader, the in-process virtual card, or a test double. The contract
itself (``CardTransport`` and its two errors) is ``cardcore.link``'s, shared
with the virtual card; it is re-exported here for the agent's modules.
"""

from __future__ import annotations

from collections.abc import Callable

from card_agent.apdu import (
    MAX_GET_RESPONSE_ROUNDS,
    SW1_MORE_DATA,
    SW1_WRONG_LE,
    ApduFormatError,
    get_response_command,
    parse_command,
    split_response,
)
from cardcore.link import (  # noqa: F401  (re-exported: the agent's link contract)
    CardRemovedError,
    CardTransport,
    ReaderError,
    TransportError,
)

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
