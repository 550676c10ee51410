"""The in-process virtual card as a transport and a card source.

For tests, the demo and crash tests (``--virtual STATE``), and for running many
agents in one process (``VirtualTransport(card)``). The virtual card needs
``cryptography`` for its secure channel, so this module is imported only when
a virtual card is asked for: the agent on a user PC never loads it.

A power loss injected by the card's fault plan looks to the agent like a card
pulled out and put back: the command fails with CardRemovedError, and the
source then reports one removal followed by a present card, so a long-running
agent starts a new session just as it would after a real re-insertion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from card_agent.cancel import Cancellation
from card_agent.connection import AgentConfigError
from card_agent.transport import CardRemovedError, ReaderError, relay_transmit

if TYPE_CHECKING:
    from virtual_psd.card import VirtualCard

VIRTUAL_READER = "Virtual PSD (in-process)"
# In --virtual-fault, "kill@K:self" signals the agent process itself.
SELF_PID = "self"


class VirtualTransport:
    """A powered virtual card. Closing powers it off, as a reader resets a released card."""

    def __init__(self, card: VirtualCard, reader_name: str = VIRTUAL_READER):
        self.card = card
        self.reader_name = reader_name
        self.atr = bytes(card.power_on())
        self.power_lost = False
        self._relay = relay_transmit(self._transmit_raw)

    def transmit(self, apdu: bytes) -> bytes:
        return self._relay(apdu)

    def _transmit_raw(self, apdu: bytes) -> bytes:
        from virtual_psd.card import CardNotPowered
        from virtual_psd.faults import CardPowerLost

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
    """Open the card kept in ``state`` with fault plan ``fault``; AgentConfigError if not."""
    try:
        from virtual_psd.card import VirtualCard
        from virtual_psd.faults import FaultPlan, FaultPlanError
        from virtual_psd.state import StateError
    except ImportError as exc:
        raise AgentConfigError(
            f"the virtual card is not available ({exc}); install 'cms[card]'") from None
    if not Path(state).is_file():
        raise AgentConfigError(f"no virtual card state at {state} (create one with "
                               f"'cms card init')")
    try:
        plan = FaultPlan.parse(_fault_plan_text(fault))
    except FaultPlanError as exc:
        raise AgentConfigError(f"--virtual-fault: {exc}") from None
    try:
        return VirtualCard.open(state, faults=plan)
    except (StateError, OSError, ValueError) as exc:
        raise AgentConfigError(f"cannot open virtual card {state}: {exc}") from None


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

    def wait_for_card(self, cancellation: Cancellation) -> bool:
        self._removed = False
        return not cancellation.cancelled

    def wait_for_removal(self, cancellation: Cancellation) -> bool:
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
