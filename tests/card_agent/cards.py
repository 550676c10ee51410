"""A tiny scripted card for tests that need no GlobalPlatform behaviour.

It answers from a table (APDU -> response) or a function, counts what it was
sent, and can be "removed" before the k-th command, so runner and session
tests do not depend on the virtual card's implementation.
"""

from __future__ import annotations

from collections.abc import Callable

from card_agent.transport import CardRemovedError, ReaderError

TEST_ATR = bytes.fromhex("3b8080010101")
TEST_READER = "Test Reader 00"
OK = b"\x90\x00"

Responder = Callable[[bytes], bytes]


class ScriptedCard:
    """A CardTransport whose answers the test decides."""

    def __init__(self, responder: Responder | dict[bytes, bytes] | None = None, *,
                 remove_before: int | None = None, reader_error_before: int | None = None):
        if responder is None:
            self._respond: Responder = lambda apdu: OK
        elif isinstance(responder, dict):
            table = responder
            self._respond = lambda apdu: table.get(apdu, b"\x6d\x00")
        else:
            self._respond = responder
        self.remove_before = remove_before
        self.reader_error_before = reader_error_before
        self.sent: list[bytes] = []
        self.closed = False
        self.atr = TEST_ATR
        self.reader_name = TEST_READER

    def transmit(self, apdu: bytes) -> bytes:
        number = len(self.sent) + 1
        if self.remove_before is not None and number >= self.remove_before:
            raise CardRemovedError("card removed")
        if self.reader_error_before is not None and number >= self.reader_error_before:
            raise ReaderError("reader unplugged")
        self.sent.append(bytes(apdu))
        return self._respond(bytes(apdu))

    def close(self) -> None:
        self.closed = True
