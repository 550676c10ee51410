"""What an applet on the virtual card is, and what it may touch.

The card (:mod:`virtual_psd.card`) is a container: it selects applets by AID
and routes each command to the selected one. This module holds the contract
between the two, so that an applet module needs nothing from the card's own
module and the card can import its applets without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cardcore.apdu import CommandApdu
from cardcore.sw import SW
from virtual_psd.state import AppletState, CardState, StateError

S = TypeVar("S", bound=AppletState)


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
    """What an applet may touch while processing one command.

    ``state`` is the card's state as committed before this command: an applet
    reads the card's own data there and changes only its section, through
    :meth:`section`, whose working copy the card commits when the command
    succeeds. A command copies only the sections it uses.
    """

    state: CardState
    session: Session
    apdu_number: int
    # The card's applets by AID, for the ISD's registry (GET STATUS).
    applets: Mapping[bytes, Applet]
    # Working copies of the sections this command used, by AID.
    taken: dict[bytes, AppletState] = field(default_factory=dict)
    # Writes a state to the card's memory now (the card's commit), for commit_now.
    commit: Callable[[CardState], None] | None = None

    def section(self, aid: bytes, kind: type[S], new: Callable[[], S] | None = None) -> S:
        """This command's working copy of applet ``aid``'s section.

        ``new`` makes the section of an applet the card did not hold yet (one
        added to a card made before it); without it, a missing section is a
        StateError.
        """
        held = self.taken.get(aid)
        if held is None:
            if new is not None and aid not in self.state.sections:
                held = new()
            else:
                held = self.state.section(aid, kind).copy()
            self.taken[aid] = held
        return _as_kind(aid, held, kind)

    def peek(self, aid: bytes, kind: type[S], new: Callable[[], S]) -> S:
        """Applet ``aid``'s section as this command sees it, without taking a copy.

        For reads: a section not taken is not written, so a read of an applet
        whose section the card does not hold yet (``new()``) writes nothing.
        """
        held = self.taken.get(aid)
        if held is None:
            return self.state.section(aid, kind) if aid in self.state.sections else new()
        return _as_kind(aid, held, kind)

    def put(self, aid: bytes, section: AppletState) -> None:
        """Set this command's new value of applet ``aid``'s section (immutable sections)."""
        self.taken[aid] = section

    def commit_now(self) -> None:
        """Write what this command changed so far, before it goes on, whatever it answers.

        For what must hold even if the command then fails or the power goes:
        a retry counter is decremented and written before the PIN is
        compared, as a card's ``OwnerPIN.check`` does outside any
        transaction, so cutting the power after a wrong guess cannot undo it.
        """
        after = self.outcome()
        if after is None:
            return
        if self.commit is None:
            raise StateError("this command context cannot write the card's memory")
        self.commit(after)
        self.state = after

    def outcome(self) -> CardState | None:
        """The card's state after this command, or None when it changed no section."""
        changed = {aid: s for aid, s in self.taken.items() if self.state.sections.get(aid) != s}
        return self.state.with_sections(changed) if changed else None


def _as_kind(aid: bytes, held: AppletState, kind: type[S]) -> S:
    if not isinstance(held, kind):
        raise StateError(f"section of applet {aid.hex().upper()} taken as "
                         f"{type(held).__name__}, not {kind.__name__}")
    return held


class Applet(Protocol):
    """An on-card applet, selected by AID."""

    aid: bytes

    def read_section(self, state: CardState) -> None:
        """Decode this applet's section of a state just read from the file.

        Called when the card opens or reloads its state, so a malformed
        section is refused then (StateError), not at the applet's first command.
        """
        ...

    def select(self, ctx: CommandContext, command: CommandApdu) -> bytes: ...

    def deselect(self, ctx: CommandContext) -> None: ...

    def process(self, ctx: CommandContext, command: CommandApdu) -> tuple[bytes, int]: ...
