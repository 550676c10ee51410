"""Handles: short-lived names of per-worker state, bound to the identity that made them.

The frontend keeps the authoritative record of every handle: its owner, the
worker (and worker incarnation and backend generation) holding the state, its
kind, token and label (for policy checks), and its expiry. A handle string
encodes its worker (``h<worker>.<random>``) for routing and debugging, but
the record decides.

Lifecycle: ``reserve`` (before the worker creates the state, so quotas hold
under concurrency) -> ``activate`` (worker succeeded) or ``discard`` ->
``release`` (caller) / ``expire`` (TTL) / ``invalidate_worker`` (backend or
worker restarted). Ended handles leave a tombstone for a while so a late
caller learns *why* a handle stopped working.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cms.runtime.errors import NotFound, PermissionDenied, ResourceExhausted
from hsm_proxy.errors import HANDLE_EXPIRED_RESTART, HandleExpired

TOMBSTONES = 100_000
HANDLE_PREFIX = "h"


def new_handle_id(worker: int) -> str:
    return f"{HANDLE_PREFIX}{worker}.{secrets.token_hex(12)}"


@dataclass
class HandleRecord:
    handle: str
    identity: str
    worker: int
    kind: str
    token: str
    label: str
    expires_at: float          # wall clock (time.time), shown to callers
    incarnation: int = 0
    generation: int = 0
    active: bool = False
    tokens: tuple[str, ...] = ()
    ttl: float = 0.0           # seconds this handle lives (its kind's TTL)


class HandleRegistry:
    """The live handles. ``kind_ttl`` gives some kinds their own lifetime."""

    def __init__(self, ttl_seconds: float, max_per_identity: int,
                 clock: Callable[[], float] = time.time,
                 kind_ttl: dict[str, float] | None = None):
        self.ttl = ttl_seconds
        self.kind_ttl = dict(kind_ttl or {})
        self.max_per_identity = max_per_identity
        self.clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, HandleRecord] = {}
        self._per_identity: Counter[str] = Counter()
        self._tombstones: OrderedDict[str, str] = OrderedDict()

    def reserve(self, identity: str, worker: int, kind: str, token: str, label: str,
                tokens: tuple[str, ...] = ()) -> HandleRecord:
        with self._lock:
            if self._per_identity[identity] >= self.max_per_identity:
                raise ResourceExhausted(
                    f"identity {identity!r} holds {self._per_identity[identity]} handles, the "
                    f"maximum; release some (ReleaseHandles) or wait for them to expire")
            ttl = self.kind_ttl.get(kind, self.ttl)
            record = HandleRecord(new_handle_id(worker), identity, worker, kind, token, label,
                                  self.clock() + ttl, tokens=tokens or (token,), ttl=ttl)
            self._records[record.handle] = record
            self._per_identity[identity] += 1
            return record

    def activate(self, record: HandleRecord, incarnation: int, generation: int) -> None:
        with self._lock:
            record.incarnation, record.generation, record.active = incarnation, generation, True

    def discard(self, record: HandleRecord) -> None:
        with self._lock:
            self._remove(record.handle, None)

    def _remove(self, handle: str, reason: str | None) -> HandleRecord | None:
        record = self._records.pop(handle, None)
        if record is not None:
            self._per_identity[record.identity] -= 1
            if self._per_identity[record.identity] <= 0:
                del self._per_identity[record.identity]
            if reason is not None:
                self._tombstones[handle] = reason
                while len(self._tombstones) > TOMBSTONES:
                    self._tombstones.popitem(last=False)
        return record

    def lookup(self, identity: str | None, handle: str, *, worker_state: Callable[
            [int], tuple[int, int] | None] | None = None) -> HandleRecord:
        """The live record of ``handle`` for its owner.

        ``worker_state(worker)`` gives the worker's current (incarnation,
        generation) so a handle whose state died with a restart is refused
        before any call is routed.
        """
        with self._lock:
            record = self._records.get(handle)
            if record is None or not record.active:
                reason = self._tombstones.get(handle)
                if reason == HANDLE_EXPIRED_RESTART:
                    raise HandleExpired(handle)
                if reason is not None:
                    raise NotFound(f"handle {handle} {reason}")
                raise NotFound(f"unknown handle {handle!r}")
            if record.identity != identity:
                raise PermissionDenied(f"handle {handle} belongs to another identity; identity "
                                       f"{identity!r} may not use it")
            if record.expires_at <= self.clock():
                self._remove(handle, f"expired (TTL {record.ttl:g} s)")
                raise NotFound(f"handle {handle} expired (TTL {record.ttl:g} s)")
        if worker_state is not None:
            current = worker_state(record.worker)
            if current is None or current != (record.incarnation, record.generation):
                self.invalidate([record])
                raise HandleExpired(handle)
        return record

    def peek(self, handle: str) -> HandleRecord | None:
        with self._lock:
            return self._records.get(handle)

    def release(self, identity: str, handles: list[str]) -> list[HandleRecord]:
        """Remove the caller's own handles among ``handles``; others are ignored."""
        out = []
        with self._lock:
            for handle in handles:
                record = self._records.get(handle)
                if record is not None and record.identity == identity and record.active:
                    self._remove(handle, "was released")
                    out.append(record)
        return out

    def end(self, record: HandleRecord, reason: str) -> None:
        with self._lock:
            self._remove(record.handle, reason)

    def expire(self) -> list[HandleRecord]:
        now = self.clock()
        with self._lock:
            due = [r for r in self._records.values() if r.active and r.expires_at <= now]
            for r in due:
                self._remove(r.handle, f"expired (TTL {r.ttl:g} s)")
        return due

    def invalidate(self, records: list[HandleRecord]) -> None:
        with self._lock:
            for r in records:
                self._remove(r.handle, HANDLE_EXPIRED_RESTART)

    def invalidate_worker(self, worker: int, keep: tuple[int, int] | None = None
                          ) -> list[HandleRecord]:
        """End the worker's handles except those made at ``keep`` = (incarnation, generation)."""
        with self._lock:
            gone = [r for r in self._records.values()
                    if r.worker == worker and r.active
                    and (keep is None or (r.incarnation, r.generation) != keep)]
            for r in gone:
                self._remove(r.handle, HANDLE_EXPIRED_RESTART)
        return gone

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(r.kind for r in self._records.values() if r.active))

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for r in self._records.values() if r.active)
