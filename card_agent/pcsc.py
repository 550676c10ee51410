"""PC/SC readers through pyscard: the transport for real cards and the reader watch.

Uses pyscard's thin ``smartcard.scard`` layer so that every PC/SC return code
is seen and mapped: the card channel must tell "the card went away" from "the
reader failed", and pyscard's higher layers fold both into generic exceptions.
"""

from __future__ import annotations

import logging

from smartcard import scard

from card_agent.cancel import Cancellation
from card_agent.transport import CardRemovedError, ReaderError, relay_transmit
from cms.runtime.logs import fields

log = logging.getLogger("card_agent.pcsc")

# How often a wait for a card re-checks for a stop request.
STATUS_POLL_MS = 500

# Return codes meaning the card (not the reader) is gone or was reset by someone.
CARD_GONE_CODES = frozenset({
    scard.SCARD_W_REMOVED_CARD,
    scard.SCARD_E_NO_SMARTCARD,
    scard.SCARD_W_RESET_CARD,
    scard.SCARD_W_UNPOWERED_CARD,
})
NO_READERS_CODES = frozenset({
    scard.SCARD_E_NO_READERS_AVAILABLE,
    scard.SCARD_E_READER_UNAVAILABLE,
})


def _message(hresult: int) -> str:
    try:
        return f"{scard.SCardGetErrorMessage(hresult)} (0x{hresult & 0xFFFFFFFF:08X})"
    except Exception:  # an unknown code has no message on some platforms
        return f"PC/SC error 0x{hresult & 0xFFFFFFFF:08X}"


def _check(hresult: int, what: str) -> None:
    if hresult == scard.SCARD_S_SUCCESS:
        return
    if hresult in CARD_GONE_CODES:
        raise CardRemovedError(f"{what}: {_message(hresult)}")
    raise ReaderError(f"{what}: {_message(hresult)}")


class PcscContext:
    """A PC/SC resource manager context (one per thread that waits or transmits)."""

    def __init__(self) -> None:
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            raise ReaderError(f"no smart card service: {_message(hresult)}")
        self.handle = context

    def list_readers(self) -> list[str]:
        hresult, readers = scard.SCardListReaders(self.handle, [])
        if hresult in NO_READERS_CODES:
            return []
        _check(hresult, "listing readers")
        return list(readers)

    def close(self) -> None:
        if self.handle is not None:
            scard.SCardReleaseContext(self.handle)
            self.handle = None

    def __enter__(self) -> PcscContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_readers() -> list[str]:
    """Names of the PC/SC readers present now."""
    with PcscContext() as context:
        return context.list_readers()


def choose_reader(readers: list[str], wanted: str | None) -> str:
    """The first reader whose name contains ``wanted`` (any case), or the first one."""
    if not readers:
        raise ReaderError("no PC/SC reader found")
    if not wanted:
        return readers[0]
    for name in readers:
        if wanted.lower() in name.lower():
            return name
    raise ReaderError(f"no reader matching {wanted!r} (readers: {', '.join(readers)})")


class PcscTransport:
    """A card in a PC/SC reader, connected exclusively with T=1 or T=0.

    Exclusive: a key replacement runs a secure channel over several scripts,
    and another application's command in between would break it. On close the
    card is reset, so no selected application or open channel outlives us.
    """

    def __init__(self, context: PcscContext, reader: str):
        self.reader_name = reader
        self._context = context
        hresult, card, protocol = scard.SCardConnect(
            context.handle, reader, scard.SCARD_SHARE_EXCLUSIVE,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        if hresult == scard.SCARD_E_SHARING_VIOLATION:
            raise ReaderError(f"reader {reader!r} is in use by another application")
        _check(hresult, f"connecting to the card in {reader!r}")
        self._card = card
        self.protocol = protocol
        hresult, _reader, _state, _protocol, atr = scard.SCardStatus(card)
        _check(hresult, "reading the ATR")
        self.atr = bytes(atr)
        self._relay = relay_transmit(self._transmit_raw)

    @property
    def protocol_name(self) -> str:
        return "T=1" if self.protocol == scard.SCARD_PROTOCOL_T1 else "T=0"

    def transmit(self, apdu: bytes) -> bytes:
        return self._relay(apdu)

    def _transmit_raw(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise ReaderError("transport closed")
        hresult, response = scard.SCardTransmit(self._card, self.protocol, list(apdu))
        _check(hresult, "transmit")
        return bytes(response)

    def close(self) -> None:
        if self._card is not None:
            scard.SCardDisconnect(self._card, scard.SCARD_RESET_CARD)
            self._card = None


class PcscCardSource:
    """One reader, watched for card insertion and removal (SCardGetStatusChange)."""

    def __init__(self, reader_filter: str | None = None):
        self._context = PcscContext()
        try:
            self.reader = choose_reader(self._context.list_readers(), reader_filter)
        except ReaderError:
            self._context.close()
            raise
        self._state = scard.SCARD_STATE_UNAWARE

    def reopen(self) -> None:
        """A fresh PC/SC context (the old one dies with a restarted pcscd); same reader."""
        self._context.close()
        self._context = PcscContext()
        self._state = scard.SCARD_STATE_UNAWARE
        readers = self._context.list_readers()
        if self.reader not in readers:
            raise ReaderError(f"reader {self.reader!r} is not back yet")

    @property
    def description(self) -> str:
        return self.reader

    def card_present(self) -> bool:
        return self._poll(0)

    def wait_for_card(self, cancellation: Cancellation) -> bool:
        """Block until a card is in the reader; False when stopped first."""
        return self._wait(cancellation, present=True)

    def wait_for_removal(self, cancellation: Cancellation) -> bool:
        """Block until the reader is empty; False when stopped first."""
        return self._wait(cancellation, present=False)

    def connect(self) -> PcscTransport:
        return PcscTransport(self._context, self.reader)

    def close(self) -> None:
        self._context.close()

    def _wait(self, cancellation: Cancellation, *, present: bool) -> bool:
        while not cancellation.cancelled:
            if self._poll(STATUS_POLL_MS) == present:
                return True
        return False

    def _poll(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for a change; return whether a usable card is present."""
        if self._context.handle is None:
            raise ReaderError("no PC/SC context (the smart card service was unavailable)")
        hresult, states = scard.SCardGetStatusChange(
            self._context.handle, timeout_ms, [(self.reader, self._state)])
        if hresult == scard.SCARD_E_TIMEOUT:
            return self._present(self._state)
        if hresult != scard.SCARD_S_SUCCESS:
            raise ReaderError(f"watching reader {self.reader!r}: {_message(hresult)}")
        _name, event_state, _atr = states[0]
        if event_state & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE):
            raise ReaderError(f"reader {self.reader!r} is gone")
        changed = (event_state ^ self._state) & scard.SCARD_STATE_PRESENT
        self._state = event_state & ~scard.SCARD_STATE_CHANGED
        if changed:
            log.info("card inserted" if self._present(event_state) else "card removed",
                     extra=fields(reader=self.reader))
        return self._present(event_state)

    @staticmethod
    def _present(state: int) -> bool:
        return bool(state & scard.SCARD_STATE_PRESENT) and not state & scard.SCARD_STATE_MUTE
