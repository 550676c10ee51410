"""Key ceremonies in progress: who began each, who entered which component, until when.

A ceremony's running sum lives in the officer worker (``key_blocks_ops``);
this is the frontend's record of it, which decides who may add what. Unlike
a handle, a ceremony is not bound to one identity: it is begun by one (key
management) and fed by others (custodians). The rules that make a ceremony
worth having are kept here:

- the identity that began it may not add a component;
- every component comes from a different identity;
- the policy decides which identities may add components at all
  (operation AddComponent on the ceremony's tokens and label).

So a transport key is known to no single identity, the proxy's callers
included: key management, whose certificate a thief might hold, never sees
a component.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cms.runtime.errors import FailedPrecondition, NotFound, PermissionDenied
from cms.v1 import key_blocks_pb2 as kpb

AWAITING = kpb.COMPONENT_CEREMONY_AWAITING
COMPLETED = kpb.COMPONENT_CEREMONY_COMPLETED
CANCELLED = kpb.COMPONENT_CEREMONY_CANCELLED
EXPIRED = kpb.COMPONENT_CEREMONY_EXPIRED
FAILED = kpb.COMPONENT_CEREMONY_FAILED
ENDED_KEPT = 10_000
"""Ended ceremonies kept so their outcome can still be read."""


@dataclass
class CeremonyRecord:
    ceremony_id: str
    role: int
    label: str
    algorithm: int
    source: str
    target: str
    needed: int
    started_by: str
    expires_at: float
    worker: int
    incarnation: int = 0
    generation: int = 0
    state: int = AWAITING
    contributors: list[str] = field(default_factory=list)
    kcvs: dict[str, bytes] = field(default_factory=dict)
    problem: str = ""
    # False until the officer worker holds its state: a worker reset meanwhile (its
    # backend reconnecting under that very call) must not end it.
    active: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.source, self.target) if t)

    def message(self) -> kpb.ComponentCeremony:
        out = kpb.ComponentCeremony(
            ceremony_id=self.ceremony_id, role=self.role, label=self.label, state=self.state,
            received=len(self.contributors), needed=self.needed, started_by=self.started_by,
            contributors=list(self.contributors), problem=self.problem,
            kcvs=[kpb.TokenCheckValue(token=t, kcv=v) for t, v in sorted(self.kcvs.items())])
        out.expires.FromNanoseconds(int(self.expires_at * 1e9))
        return out


class CeremonyRegistry:
    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.time):
        self.ttl = ttl_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, CeremonyRecord] = {}
        self._ended: OrderedDict[str, CeremonyRecord] = OrderedDict()

    def new(self, *, role: int, label: str, algorithm: int, source: str, target: str,
            needed: int, started_by: str, worker: int) -> CeremonyRecord:
        record = CeremonyRecord(f"c{secrets.token_hex(12)}", role, label, algorithm, source,
                                target, needed, started_by, self.clock() + self.ttl, worker)
        with self._lock:
            self._live[record.ceremony_id] = record
        return record

    def get(self, ceremony_id: str) -> CeremonyRecord:
        with self._lock:
            record = self._live.get(ceremony_id) or self._ended.get(ceremony_id)
        if record is None:
            raise NotFound(f"no ceremony {ceremony_id!r} in this proxy (ceremonies end with the "
                           f"proxy process)")
        if record.state == AWAITING and record.expires_at <= self.clock():
            self.end(record, EXPIRED, f"expired (TTL {self.ttl:g} s) before all components "
                                      f"arrived")
        return record

    def live(self, ceremony_id: str) -> CeremonyRecord:
        record = self.get(ceremony_id)
        if record.state != AWAITING:
            state = kpb.ComponentCeremonyState.Name(record.state).removeprefix(
                "COMPONENT_CEREMONY_").lower()
            detail = f": {record.problem}" if record.problem else ""
            raise FailedPrecondition(f"ceremony {ceremony_id} is {state}{detail}")
        return record

    @staticmethod
    def check_contributor(record: CeremonyRecord, identity: str) -> None:
        """The ceremony rules on who may add a component (see the module docstring)."""
        if identity == record.started_by:
            raise PermissionDenied(f"identity {identity!r} began ceremony {record.ceremony_id}; "
                                   f"the identity that begins a ceremony may not enter its "
                                   f"components")
        if identity in record.contributors:
            raise PermissionDenied(f"identity {identity!r} already entered a component of "
                                   f"ceremony {record.ceremony_id}; each component comes from "
                                   f"a different custodian")

    def end(self, record: CeremonyRecord, state: int, problem: str = "") -> None:
        with self._lock:
            if record.state != AWAITING:
                return
            record.state, record.problem = state, problem
            self._live.pop(record.ceremony_id, None)
            self._ended[record.ceremony_id] = record
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)

    def expire(self) -> list[CeremonyRecord]:
        now = self.clock()
        with self._lock:
            due = [r for r in self._live.values() if r.expires_at <= now]
        for record in due:
            self.end(record, EXPIRED, f"expired (TTL {self.ttl:g} s) before all components "
                                      f"arrived")
        return due

    def activate(self, record: CeremonyRecord, incarnation: int, generation: int) -> None:
        """The officer worker holds the ceremony at (incarnation, generation)."""
        with self._lock:
            record.incarnation, record.generation, record.active = incarnation, generation, True

    def invalidate_worker(self, worker: int, keep: tuple[int, int] | None) -> list[CeremonyRecord]:
        with self._lock:
            gone = [r for r in self._live.values() if r.worker == worker and r.active
                    and (keep is None or (r.incarnation, r.generation) != keep)]
        for record in gone:
            self.end(record, EXPIRED, "the proxy worker holding it restarted; its components "
                                      "are gone, begin a new ceremony")
        return gone

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)
