"""The in-process virtual card as a card agent's transport and card source.

For tests, the demo and crash tests (``cms card-agent --virtual STATE``), and
for running many agents in one process (``VirtualTransport(card)``). It fits
the agent's link contract (``cardcore.link``) and card source shape without
importing the agent: the agent finds this module by name only when a virtual
card is asked for, so the agent on a user PC never loads it, nor the
``cryptography`` the card's secure channel needs.

A power loss injected by the card's fault plan looks to the agent like a card
pulled out and put back: the command fails with CardRemovedError, and the
source then reports one removal followed by a present card, so a long-running
agent starts a new session just as it would after a real re-insertion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from cardcore.link import CardRemovedError, ReaderError
from virtual_psd.card import CardNotPowered, VirtualCard
from virtual_psd.faults import CardPowerLost, FaultPlan, FaultPlanError
from virtual_psd.state import StateError

VIRTUAL_READER = "Virtual PSD (in-process)"
# In --virtual-fault, "kill@K:self" signals the agent process itself.
SELF_PID = "self"


class VirtualCardError(Exception):
    """A virtual card that cannot be opened as asked (the agent reports it as one line)."""


class Stop(Protocol):
    """What a card source waits on: the agent's stop request (its ``Cancellation``)."""

    @property
    def cancelled(self) -> bool: ...

    def sleep(self, seconds: float) -> bool: ...


class VirtualTransport:
    """A powered virtual card. Closing powers it off, as a reader resets a released card.

    Commands go to the card as they are: it answers each one whole, never with
    61xx or 6Cxx, so there is no GET RESPONSE for a reader's transport to run.
    """

    def __init__(self, card: VirtualCard, reader_name: str = VIRTUAL_READER):
        self.card = card
        self.reader_name = reader_name
        self.atr = bytes(card.power_on())
        self.power_lost = False

    def transmit(self, apdu: bytes) -> bytes:
        try:
            return self.card.transmit(apdu)
        except CardPowerLost as exc:
            self.power_lost = True
            raise CardRemovedError(str(exc)) from None
        except CardNotPowered as exc:
            raise CardRemovedError(str(exc)) from None

    def close(self) -> None:
        self.card.power_off()


def _fault_plan_text(spec: str | None) -> str | None:
    if not spec:
        return spec
    parts = []
    for item in spec.split(","):
        kind, _, rest = item.strip().partition("@")
        fields = rest.split(":")
        if len(fields) > 1 and fields[1] == SELF_PID:
            fields[1] = str(os.getpid())
        parts.append(f"{kind}@{':'.join(fields)}" if rest else item)
    return ",".join(parts)


def open_virtual_card(state: Path, fault: str | None = None) -> VirtualCard:
    """Open the card kept in ``state`` with fault plan ``fault``; VirtualCardError if not."""
    if not Path(state).is_file():
        raise VirtualCardError(f"no virtual card state at {state} (create one with "
                               f"'cms card init')")
    try:
        plan = FaultPlan.parse(_fault_plan_text(fault))
    except FaultPlanError as exc:
        raise VirtualCardError(f"--virtual-fault: {exc}") from None
    try:
        return VirtualCard.open(state, faults=plan)
    except (StateError, OSError, ValueError) as exc:
        raise VirtualCardError(f"cannot open virtual card {state}: {exc}") from None


class VirtualCardSource:
    """A virtual card that is always inserted (a power loss counts as pull and re-insert)."""

    def __init__(self, state: Path | None = None, fault: str | None = None, *,
                 card: VirtualCard | None = None):
        if card is None:
            if state is None:
                raise ValueError("a state file or a card is needed")
            card = open_virtual_card(state, fault)
        self.card = card
        self._label = f"virtual card {state}" if state is not None else VIRTUAL_READER
        self._transport: VirtualTransport | None = None
        self._removed = False

    @property
    def description(self) -> str:
        return self._label

    def card_present(self) -> bool:
        self._note_power_loss()
        return not self._removed

    def wait_for_card(self, cancellation: Stop) -> bool:
        self._removed = False
        return not cancellation.cancelled

    def wait_for_removal(self, cancellation: Stop) -> bool:
        self._note_power_loss()
        if self._removed:
            return True
        while not cancellation.sleep(3600):
            pass  # an in-process card is never pulled out: wait for the stop
        return False

    def connect(self) -> VirtualTransport:
        self._note_power_loss()
        if self._removed:
            raise CardRemovedError("virtual card lost power")
        try:
            self._transport = VirtualTransport(self.card)
        except Exception as exc:
            raise ReaderError(f"virtual card: {type(exc).__name__}: {exc}") from None
        return self._transport

    def reopen(self) -> None:
        """Nothing to re-establish for an in-process card."""

    def close(self) -> None:
        self.card.power_off()

    def _note_power_loss(self) -> None:
        if self._transport is not None and self._transport.power_lost:
            self._transport.power_lost = False
            self._removed = True
