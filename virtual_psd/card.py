"""The virtual card: power, ATR, and a container of applets.

The card selects applets by AID (SELECT by name) and routes every other
command to the selected one; the issuer security domain is one applet among
them (:mod:`virtual_psd.isd`), selected at power on. Each applet keeps its
persistent data in its own section of the card's state
(:mod:`virtual_psd.state`) and works on a *copy* of it
(:meth:`CommandContext.section`); the card commits the sections a command
changed (one atomic write of the state file) only when the command completes
with a success or warning status, save what an applet writes ahead on
purpose (:meth:`CommandContext.commit_now`: a retry counter before the PIN
is compared). Volatile state (the selected applet, the
secure channel) lives in :class:`Session` and is lost on power off, reset,
or an injected power loss.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Final

from cardcore.apdu import ApduError, CommandApdu, encode_response, parse_command
from cardcore.ins import Ins
from cardcore.psd import ISD_AID
from cardcore.sw import SW
from virtual_psd.applet import Applet, CommandContext, Session, StatusError
from virtual_psd.faults import CardPowerLost, FaultPlan
from virtual_psd.isd import IssuerSecurityDomain
from virtual_psd.issuance import IssuanceApplet
from virtual_psd.state import CardState, load_state, save_state

log = logging.getLogger("virtual_psd")

# T=1 only, extended length announced in the historical bytes' card capabilities.
_HISTORICAL: Final = bytes.fromhex("8073000040") + b"CMSPSD"


def _make_atr() -> bytes:
    body = bytes((0x80 | len(_HISTORICAL), 0x80, 0x01)) + _HISTORICAL
    tck = 0
    for b in body:
        tck ^= b
    return b"\x3B" + body + bytes((tck,))


ATR: Final = _make_atr()


class CardNotPowered(Exception):
    """A transmit to a card that is not powered."""


class VirtualCard:
    """A GlobalPlatform card in a Python object.

    ``state_path`` None keeps the state in memory only (unit tests). The ISD
    and the issuance applet are registered at construction; more applets can be registered by AID,
    each reading its section of the state as it is registered (StateError if
    it is malformed).
    """

    def __init__(self, state: CardState, state_path: str | os.PathLike[str] | None = None,
                 *, faults: FaultPlan | None = None) -> None:
        self.state = state
        self.state_path = state_path
        self.faults = faults or FaultPlan()
        self.apdu_count = 0
        self.powered = False
        self.session = Session()
        self.applets: dict[bytes, Applet] = {}
        self._lock = threading.Lock()
        self.register(IssuerSecurityDomain())
        self.register(IssuanceApplet())
        self.default_aid = ISD_AID

    @classmethod
    def open(cls, state_path: str | os.PathLike[str], *,
             faults: FaultPlan | None = None) -> VirtualCard:
        return cls(load_state(state_path), state_path, faults=faults)

    def register(self, app: Applet) -> None:
        app.read_section(self.state)
        self.applets[bytes(app.aid)] = app

    @property
    def atr(self) -> bytes:
        return ATR

    # power ---------------------------------------------------------------------

    def power_on(self) -> bytes:
        """Power the card up (a no-op when already powered); returns the ATR."""
        with self._lock:
            if not self.powered:
                self.powered = True
                self.session = Session(selected=self.default_aid)
            return ATR

    def power_off(self) -> None:
        with self._lock:
            self._drop_volatile()

    def reset(self) -> bytes:
        with self._lock:
            self._drop_volatile()
            self.powered = True
            self.session = Session(selected=self.default_aid)
            return ATR

    def _drop_volatile(self) -> None:
        self.powered = False
        self.session = Session()

    def reload(self) -> None:
        """Re-read the persistent state from the file (after a power loss)."""
        with self._lock:
            if self.state_path is not None:
                self.state = self._read_state(self.state_path)

    def _read_state(self, path: str | os.PathLike[str]) -> CardState:
        state = load_state(path)
        for app in self.applets.values():
            app.read_section(state)
        return state

    # commands ------------------------------------------------------------------

    def transmit(self, apdu: bytes) -> bytes:
        """Process one command APDU and return the response APDU.

        Raises :class:`CardNotPowered` when off, and :class:`CardPowerLost`
        for an injected power loss (the card is then off).
        """
        apdu = bytes(apdu)
        with self._lock:
            if not self.powered:
                raise CardNotPowered("card is not powered")
            self.apdu_count += 1
            n = self.apdu_count
            self.faults.run_hooks(n, apdu)
            if self.faults.power_loss_before(n):
                self._lose_power()
                raise CardPowerLost(n, torn=False)
            response = self._process(apdu, n)
            if self.faults.tear_during(n):
                self._lose_power()
                raise CardPowerLost(n, torn=True)
            return response

    def _lose_power(self) -> None:
        self._drop_volatile()
        if self.state_path is not None:
            self.state = self._read_state(self.state_path)

    def _process(self, raw: bytes, n: int) -> bytes:
        ctx = CommandContext(self.state, self.session, n, self.applets, commit=self._commit)
        try:
            command = parse_command(raw)
        except ApduError:
            return encode_response(b"", SW.WRONG_LENGTH)
        try:
            response = self._dispatch(ctx, command)
        except StatusError as exc:
            response = encode_response(b"", exc.sw)
        except Exception:  # a card never crashes on input: log and answer 6F00
            log.exception("unexpected error processing %r", command)
            return encode_response(b"", SW.NO_PRECISE_DIAGNOSIS)
        sw = int.from_bytes(response[-2:], "big")
        if SW.is_success(sw) or SW.is_warning(sw):
            after = ctx.outcome()
            if after is not None:
                self._commit(after)
        return response

    def _commit(self, after: CardState) -> None:
        if self.state_path is not None:
            save_state(self.state_path, after)
        self.state = after

    def _dispatch(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        cla = command.cla
        family = cla & 0xE0
        if family in (0x40, 0x60):  # further interindustry: logical channels 4..19
            raise StatusError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
        if family not in (0x00, 0x80):
            raise StatusError(SW.CLA_NOT_SUPPORTED)
        if cla & 0x10:
            raise StatusError(SW.CHAINING_NOT_SUPPORTED)
        if cla & 0x03:
            raise StatusError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
        if cla & 0x80 == 0 and command.ins == Ins.SELECT:
            if cla & 0x0C:
                raise StatusError(SW.SECURE_MESSAGING_NOT_SUPPORTED)
            return self._select(ctx, command)
        selected = ctx.session.selected
        app = self.applets.get(selected) if selected is not None else None
        if app is None:
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "no applet selected")
        data, sw = app.process(ctx, command)
        return encode_response(data, sw)

    def _select(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        if command.p1 != 0x04:
            raise StatusError(SW.INCORRECT_P1P2, "only SELECT by name")
        if command.p2 not in (0x00, 0x0C):
            raise StatusError(SW.INCORRECT_P1P2)
        target: bytes | None
        if not command.data:
            target = self.default_aid
        else:
            if len(command.data) > 16:
                raise StatusError(SW.WRONG_DATA)
            target = next((aid for aid in self.applets
                           if aid.startswith(command.data)), None)
        if target is None:
            raise StatusError(SW.FILE_NOT_FOUND)
        current = ctx.session.selected
        if current is not None and current in self.applets:
            self.applets[current].deselect(ctx)
        ctx.session.selected = target
        fci = self.applets[target].select(ctx, command)
        return encode_response(b"" if command.p2 == 0x0C else fci, SW.OK)
