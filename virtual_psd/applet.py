"""What an applet on the virtual card is, and what it may touch.

The card (:mod:`virtual_psd.card`) is a container: it selects applets by AID
and routes each command to the selected one. This module holds the contract
between the two, so that an applet module needs nothing from the card's own
module and the card can import its applets without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cardcore import sw as SW
from cardcore.apdu import CommandApdu
from virtual_psd.state import CardState


class StatusError(Exception):
    """Raised by command handlers: answer with this status word and change nothing."""

    def __init__(self, sw: int, message: str = "") -> None:
        super().__init__(message or SW.describe(sw))
        self.sw = sw


@dataclass
class Session:
    """Volatile card state: lost on power off, reset and power loss."""

    selected: bytes | None = None
    # Per-applet volatile data (the ISD keeps its secure channel here).
    app_data: dict[bytes, Any] = field(default_factory=dict)


@dataclass
class CommandContext:
    """What an applet may touch while processing one command."""

    state: CardState  # the working copy
    session: Session
    apdu_number: int
    # The card's applets by AID, for the ISD's registry (GET STATUS).
    applets: Mapping[bytes, Applet]


class Applet(Protocol):
    """An on-card applet, selected by AID."""

    aid: bytes

    def select(self, ctx: CommandContext, command: CommandApdu) -> bytes: ...

    def deselect(self, ctx: CommandContext) -> None: ...

    def process(self, ctx: CommandContext, command: CommandApdu) -> tuple[bytes, int]: ...
