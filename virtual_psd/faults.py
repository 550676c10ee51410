"""Fault injection for crash tests.

A :class:`FaultPlan` names APDUs by their number (1-based, counted over the
life of the card object, across power cycles, control messages excluded):

* ``power-loss@K``: the card loses power *before* APDU K: nothing of it
  happens and volatile state (the secure channel) is lost.
* ``tear@K``: the card loses power *during* APDU K, after its changes were
  committed but before the response went out.
* ``kill@K:PID[:SIGNAL]``: send a signal (default TERM) to a process just
  before APDU K (crash tests kill servers at that moment).
* in process, :meth:`FaultPlan.add_hook` calls any function before APDU K.

Text form: the entries above joined by commas, e.g. ``power-loss@5,tear@9``
(the ``--faults`` option and the ``CMS_CARD_FAULTS`` environment variable).
Each fault fires once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

POWER_LOSS: Final = "power-loss"
TEAR: Final = "tear"
KILL: Final = "kill"
HOOK: Final = "hook"

Hook = Callable[[int, bytes], None]


class FaultPlanError(ValueError):
    """A fault plan that does not parse."""


class CardPowerLost(Exception):
    """The card lost power during a transmit (an injected fault).

    ``torn`` is true when the command's changes were committed before the
    power went (a tear); false when nothing of the command happened.
    """

    def __init__(self, apdu_number: int, *, torn: bool) -> None:
        what = "during" if torn else "before"
        super().__init__(f"card lost power {what} APDU {apdu_number}")
        self.apdu_number = apdu_number
        self.torn = torn


@dataclass
class Fault:
    kind: str
    at: int
    pid: int | None = None
    signal: int = signal.SIGTERM
    hook: Hook | None = field(default=None, repr=False)
    fired: bool = False

    def describe(self) -> str:
        if self.kind == KILL:
            return f"{KILL}@{self.at}:{self.pid}:{signal.Signals(self.signal).name[3:]}"
        return f"{self.kind}@{self.at}"


@dataclass
class FaultPlan:
    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> FaultPlan:
        plan = cls()
        for item in (text or "").split(","):
            item = item.strip()
            if not item:
                continue
            kind, sep, rest = item.partition("@")
            if not sep:
                raise FaultPlanError(f"fault {item!r}: expected KIND@APDU")
            at_text, _, extra = rest.partition(":")
            try:
                at = int(at_text)
            except ValueError as exc:
                raise FaultPlanError(f"fault {item!r}: APDU number is not an integer") from exc
            if at < 1:
                raise FaultPlanError(f"fault {item!r}: APDU numbers start at 1")
            if kind in (POWER_LOSS, TEAR):
                if extra:
                    raise FaultPlanError(f"fault {item!r}: {kind} takes no argument")
                plan.faults.append(Fault(kind, at))
            elif kind == KILL:
                pid_text, _, sig_text = extra.partition(":")
                try:
                    pid = int(pid_text)
                    sig = _signal(sig_text or "TERM")
                except ValueError as exc:
                    raise FaultPlanError(f"fault {item!r}: expected kill@K:PID[:SIGNAL]") from exc
                plan.faults.append(Fault(KILL, at, pid=pid, signal=sig))
            else:
                raise FaultPlanError(f"unknown fault kind {kind!r} "
                                     f"(power-loss, tear, kill)")
        return plan

    def describe(self) -> str:
        return ",".join(f.describe() for f in self.faults if f.kind != HOOK)

    def add(self, kind: str, at: int) -> FaultPlan:
        if kind not in (POWER_LOSS, TEAR):
            raise FaultPlanError(f"unknown fault kind {kind!r}")
        self.faults.append(Fault(kind, at))
        return self

    def add_hook(self, at: int, hook: Hook) -> FaultPlan:
        self.faults.append(Fault(HOOK, at, hook=hook))
        return self

    def _take(self, kind: str, n: int) -> list[Fault]:
        out = [f for f in self.faults if f.kind == kind and f.at == n and not f.fired]
        for f in out:
            f.fired = True
        return out

    def run_hooks(self, n: int, apdu: bytes) -> None:
        """Call hooks and send signals due before APDU ``n``."""
        for f in self._take(HOOK, n):
            assert f.hook is not None
            f.hook(n, apdu)
        for f in self._take(KILL, n):
            assert f.pid is not None
            try:
                os.kill(f.pid, f.signal)
            except ProcessLookupError:
                pass

    def power_loss_before(self, n: int) -> bool:
        return bool(self._take(POWER_LOSS, n))

    def tear_during(self, n: int) -> bool:
        return bool(self._take(TEAR, n))

    def pending(self) -> list[Fault]:
        return [f for f in self.faults if not f.fired]


def _signal(text: str) -> int:
    text = text.strip().upper()
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signal.Signals[name])
    except KeyError as exc:
        raise ValueError(text) from exc
