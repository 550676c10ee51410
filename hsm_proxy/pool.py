"""The frontend's pool of PKCS#11 worker processes: routing, batching, supervision.

The frontend (gRPC, policy, audit, metrics) never loads PKCS#11. It sends
operations to N worker processes (``hsm_proxy.worker``) over pipes:

- routing: a call bound to a handle goes to the worker holding it; any other
  call goes to the least busy worker whose backend is up; the officer worker
  (if configured) takes only the calls sent to it by index (``officer``);
- batching: a batch is split into contiguous chunks, one per worker, so every
  core signs; items bound to handles go to their worker;
- supervision: a reader thread per worker resolves replies and notices a
  crash (pipe EOF); a monitor thread restarts dead workers with backoff, kills
  a worker silent for longer than ``call_timeout`` (a hung module), and pings
  each worker so its backend is probed and reconnected without traffic.

Retries: when a worker dies under an idempotent call that is not bound to a
handle, the call runs once more on another worker; when a worker reports its
backend unavailable, an idempotent call is tried once on another worker whose
backend is up. Otherwise the caller gets UNAVAILABLE; a handle-bound call
whose worker restarted gets "handle expired (backend restarted)".
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cms.runtime.errors import DeadlineExceeded, ServiceError, Unavailable
from cms.runtime.logs import fields
from hsm_proxy import metrics
from hsm_proxy.errors import HandleExpired, from_wire
from hsm_proxy.worker import BATCH, CALL, CONTROL, WorkerSpec, WorkerStatus, worker_main

log = logging.getLogger("hsm_proxy.pool")

START_TIMEOUT_S = 60.0
START_POLL_S = 0.2
"""How often start() looks whether a worker that has not said hello yet has died."""
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
MIN_CHUNK = 16
SHUTDOWN_TIMEOUT_S = 5.0


class _Crashed:
    """Reply value of calls lost with their worker process."""


CRASHED = _Crashed()


class Pending:
    __slots__ = ("event", "ok", "on_done", "op", "sent", "status", "value")

    def __init__(self, op: str, on_done: Callable[[], None] | None = None):
        self.event = threading.Event()
        self.on_done = on_done
        self.ok = False
        self.value: Any = None
        self.status: WorkerStatus | None = None
        self.op = op
        self.sent = time.monotonic()


@dataclass(frozen=True)
class Reply:
    """A successful result and where it came from (for handle bookkeeping)."""

    value: Any
    worker: int
    incarnation: int
    generation: int


class WorkerProc:
    """The frontend's side of one worker process (across its restarts)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.index = spec.index
        self.incarnation = 0
        self.process: Any = None
        self.conn: Any = None
        self.pid: int | None = None
        self.alive = False
        self.status: WorkerStatus | None = None
        self.pending: dict[int, Pending] = {}
        self.send_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.hello = threading.Event()
        self.restart_due = 0.0
        self.crashes = 0
        self.ping_outstanding = False

    @property
    def backend_ok(self) -> bool:
        return self.alive and self.status is not None and self.status.backend_ok

    @property
    def load(self) -> int:
        return len(self.pending)

    def current(self) -> tuple[int, int] | None:
        if not self.alive or self.status is None:
            return None
        return self.incarnation, self.status.generation


class WorkerPool:
    def __init__(self, specs: Sequence[WorkerSpec], *, call_timeout: float = 30.0,
                 probe_interval: float = 1.0,
                 on_change: Callable[[], None] | None = None,
                 on_reset: Callable[[int, tuple[int, int] | None], None] | None = None,
                 on_tick: Callable[[], None] | None = None):
        self.workers = [WorkerProc(s) for s in specs]
        officers = [w.index for w in self.workers if w.spec.officer]
        self.officer: int | None = officers[0] if officers else None
        self._general = [w for w in self.workers if not w.spec.officer]
        self.call_timeout = call_timeout
        self.probe_interval = probe_interval
        self.on_change = on_change or (lambda: None)
        self.on_reset = on_reset or (lambda worker, keep: None)
        self.on_tick = on_tick or (lambda: None)
        self._ids = itertools.count(1)
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._rr = itertools.count()
        metrics.WORKERS_CONFIGURED.set(len(self.workers))
        # Each reply carries its worker's state count: read at scrape time.
        metrics.WORKER_STATES.set_function(self._worker_states)

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every worker and wait until each has tried its first connection."""
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            while not w.hello.wait(min(START_POLL_S, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"HSM worker {w.index} did not start within "
                                       f"{timeout:.0f}s")
                if not w.alive:
                    # SoftHSM can abort a process in C_Initialize while another one
                    # reads the same token store (an assertion in its slot manager):
                    # start it again rather than wait out the deadline for a hello
                    # that cannot come.
                    log.warning("worker died before its first connection; starting it "
                                "again", extra=fields(worker=w.index, pid=w.pid))
                    self._spawn(w)
        self._monitor = threading.Thread(target=self._monitor_loop, name="hsm-pool-monitor",
                                         daemon=True)
        self._monitor.start()
        self._update_gauges()

    def _spawn(self, w: WorkerProc) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_main, args=(w.spec, child),
                                    name=f"hsm-worker-{w.index}", daemon=True)
        process.start()
        child.close()
        with w.state_lock:
            w.incarnation += 1
            w.process, w.conn, w.alive, w.status = process, parent, True, None
            w.pid = process.pid
            w.hello.clear()
            w.ping_outstanding = False
        reader = threading.Thread(target=self._reader, args=(w, parent, w.incarnation),
                                  name=f"hsm-worker-{w.index}-reader", daemon=True)
        reader.start()
        log.info("worker started", extra=fields(worker=w.index, pid=process.pid,
                                                incarnation=w.incarnation))

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=timeout)
        for w in self.workers:
            if w.alive:
                try:
                    self._submit(w, CONTROL, "shutdown", None)
                except Unavailable:
                    pass
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.process is not None:
                w.process.join(max(0.1, deadline - time.monotonic()))
                if w.process.is_alive():
                    log.warning("worker did not stop; killing", extra=fields(worker=w.index))
                    w.process.kill()
                    w.process.join(1)
        metrics.WORKERS_UP.set(0)
        metrics.WORKERS_ALIVE.set(0)
        metrics.SESSIONS.set(0)

    # -- reader and monitor ----------------------------------------------------------
    def _reader(self, w: WorkerProc, conn: Any, incarnation: int) -> None:
        while True:
            try:
                req_id, ok, value, status = conn.recv()
            except (EOFError, OSError):
                break
            if req_id == 0:
                w.pid = value
                self._set_status(w, incarnation, status)
                w.hello.set()
                continue
            pending = w.pending.pop(req_id, None)
            self._set_status(w, incarnation, status)
            if pending is not None:
                pending.ok, pending.value, pending.status = ok, value, status
                metrics.WORKER_SECONDS.labels(pending.op).observe(time.monotonic() - pending.sent)
                pending.event.set()
                if pending.on_done is not None:
                    pending.on_done()
        self._lost(w, incarnation)

    def _set_status(self, w: WorkerProc, incarnation: int, status: WorkerStatus) -> None:
        changed = False
        reset_keep: tuple[int, int] | None = None
        with w.state_lock:
            if incarnation != w.incarnation or self._stopping.is_set():
                return
            old = w.status
            w.status = status
            if old is None or old.backend_ok != status.backend_ok:
                changed = True
            if old is not None and old.generation != status.generation:
                reset_keep = (incarnation, status.generation)
            if old is not None and old.backend_ok and not status.backend_ok:
                metrics.BACKEND_FAILURES.labels(str(w.index)).inc()
                log.warning("worker backend down", extra=fields(worker=w.index,
                                                                reason=status.reason))
            elif old is not None and not old.backend_ok and status.backend_ok:
                log.info("worker backend up", extra=fields(worker=w.index,
                                                           generation=status.generation))
        if reset_keep is not None:
            self.on_reset(w.index, reset_keep)
        if changed:
            self._update_gauges()
            self.on_change()

    def _lost(self, w: WorkerProc, incarnation: int) -> None:
        # Holding the send lock too: a call is either already pending (and is
        # failed below) or sees the worker dead; none can slip in unanswered.
        with w.send_lock, w.state_lock:
            if incarnation != w.incarnation:
                return
            w.alive = False
            lost = list(w.pending.values())
            w.pending.clear()
            stopping = self._stopping.is_set()
            if not stopping:
                w.crashes += 1
                delay = RESTART_BACKOFF_S[min(w.crashes - 1, len(RESTART_BACKOFF_S) - 1)]
                w.restart_due = time.monotonic() + delay
        for p in lost:
            p.ok, p.value = False, CRASHED
            p.event.set()
        if not stopping:
            log.error("worker process lost", extra=fields(worker=w.index, pid=w.pid,
                                                          lost_calls=len(lost)))
            self.on_reset(w.index, None)
        self._update_gauges()
        self.on_change()

    def _monitor_loop(self) -> None:
        while not self._stopping.wait(self.probe_interval):
            now = time.monotonic()
            for w in self.workers:
                if self._stopping.is_set():
                    return
                if not w.alive:
                    if now >= w.restart_due:
                        metrics.WORKER_RESTARTS.labels(str(w.index)).inc()
                        try:
                            self._spawn(w)
                        except OSError as exc:
                            log.error("cannot restart worker", extra=fields(
                                worker=w.index, error=str(exc)))
                    continue
                oldest = min((p.sent for p in list(w.pending.values())), default=now)
                if now - oldest > self.call_timeout:
                    log.error("worker silent past the call timeout; killing it", extra=fields(
                        worker=w.index, pid=w.pid, seconds=round(now - oldest, 1)))
                    self._kill(w)
                    continue
                if not w.ping_outstanding:
                    self._ping(w)
            try:
                self.on_tick()
            except Exception as exc:  # the monitor must survive its callbacks
                log.error("monitor tick failed", extra=fields(error=type(exc).__name__))

    def _ping(self, w: WorkerProc) -> None:
        """Ask a worker to probe its backend (and reconnect it); the reply updates status."""

        def done() -> None:
            w.ping_outstanding = False

        w.ping_outstanding = True
        try:
            self._submit(w, CONTROL, "ping", None, on_done=done)
        except Unavailable:
            w.ping_outstanding = False

    def _kill(self, w: WorkerProc) -> None:
        if w.pid is not None:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _update_gauges(self) -> None:
        alive = [w for w in self.workers if w.alive]
        metrics.WORKERS_ALIVE.set(len(alive))
        metrics.WORKERS_UP.set(sum(1 for w in alive if w.backend_ok))
        metrics.SESSIONS.set(sum(w.status.sessions for w in alive if w.status is not None))

    def _worker_states(self) -> int:
        return sum(w.status.states for w in self.workers
                   if w.alive and w.status is not None)

    # -- state --------------------------------------------------------------------------
    @property
    def any_backend_ok(self) -> bool:
        return any(w.backend_ok for w in self._general)

    def require_officer(self) -> int:
        if self.officer is None:
            raise Unavailable("this proxy runs no officer worker (ceremonies and transport "
                              "keys need one)")
        return self.officer

    def worker_state(self, index: int) -> tuple[int, int] | None:
        return self.workers[index].current()

    def pids(self) -> list[int | None]:
        return [w.pid if w.alive else None for w in self.workers]

    # -- sending ---------------------------------------------------------------------
    def _submit(self, w: WorkerProc, kind: str, op: str, payload: Any,
                on_done: Callable[[], None] | None = None) -> Pending:
        pending = Pending(op, on_done)
        req_id = next(self._ids)
        with w.send_lock:
            if not w.alive:
                raise Unavailable(f"HSM worker {w.index} is restarting")
            w.pending[req_id] = pending
            try:
                w.conn.send((req_id, kind, op, payload))
            except (OSError, ValueError):
                w.pending.pop(req_id, None)
                raise Unavailable(f"HSM worker {w.index} is restarting") from None
        return pending

    def _wait(self, pending: Pending, timeout: float | None) -> None:
        limit = self.call_timeout + 5.0
        wait = limit if timeout is None else max(0.0, min(timeout, limit))
        if not pending.event.wait(wait):
            raise DeadlineExceeded(f"the HSM did not answer {pending.op} in time")

    def choose(self, exclude: frozenset[int] | set[int] = frozenset()) -> WorkerProc:
        """The least busy live worker, preferring those whose backend is up."""
        candidates = [w for w in self._general if w.alive and w.index not in exclude]
        if not candidates:
            raise Unavailable("no HSM worker is running (restarting); retry shortly")
        up = [w for w in candidates if w.backend_ok] or candidates
        # One reading of each load: other threads change them meanwhile, and
        # reading twice could leave no worker at the minimum.
        loads = [(w.load, w) for w in up]
        least = min(load for load, _ in loads)
        best = [w for load, w in loads if load == least]
        return best[next(self._rr) % len(best)]

    def call(self, op: str, payload: Any, *, worker: int | None = None, idempotent: bool,
             timeout: float | None = None) -> Reply:
        """Run one operation; ``worker`` pins it (a handle's worker)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: set[int] = set()
        target = self.workers[worker] if worker is not None else self.choose()
        for attempt in (1, 2):
            if worker is not None and not target.alive:
                raise HandleExpired(None)
            incarnation = target.incarnation
            pending = self._submit(target, CALL, op, payload)
            self._wait(pending, None if deadline is None else deadline - time.monotonic())
            if pending.ok:
                assert pending.status is not None
                return Reply(pending.value, target.index, incarnation, pending.status.generation)
            tried.add(target.index)
            if pending.value is CRASHED:
                if worker is not None:
                    raise HandleExpired(None)
                if not idempotent:
                    raise Unavailable(f"the HSM worker process failed during {op}; not retried "
                                      f"because {op} is not idempotent: check before repeating")
                if attempt == 2:
                    raise Unavailable(f"the HSM worker process failed during {op}, twice")
                target = self.choose()
                continue
            error = from_wire(pending.value)
            if (isinstance(error, Unavailable) and idempotent and worker is None and attempt == 1
                    and any(w.backend_ok and w.index not in tried for w in self._general)):
                target = self.choose(exclude=tried)
                continue
            raise error
        raise AssertionError("unreachable")

    def batch(self, op: str, items: Sequence[Any], *, affinity: Sequence[int | None] | None = None,
              idempotent: bool, timeout: float | None = None,
              min_chunk: int = MIN_CHUNK) -> list[Any]:
        """Run ``op`` on every item across the workers; results in item order.

        Free items are split over the workers in chunks of at least
        ``min_chunk``: signatures are cheap next to a message, while an item
        that costs milliseconds of HSM work is worth a worker of its own.

        Item failures come back as ``worker.Failure`` tuples; a worker that
        crashes or whose backend is down fails the call (after one retry of the
        chunk elsewhere when the operation is idempotent and not handle-bound).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[Any] = [None] * len(items)
        chunks: list[tuple[WorkerProc, list[int], bool]] = []
        pinned: dict[int, list[int]] = {}
        free: list[int] = []
        for i in range(len(items)):
            a = affinity[i] if affinity is not None else None
            if a is None:
                free.append(i)
            else:
                pinned.setdefault(a, []).append(i)
        for index, idx in pinned.items():
            w = self.workers[index]
            if not w.alive:
                raise HandleExpired(None)
            chunks.append((w, idx, True))
        if free:
            workers = [w for w in self._general if w.alive]
            if not workers:
                raise Unavailable("no HSM worker is running (restarting); retry shortly")
            up = [w for w in workers if w.backend_ok] or workers
            up.sort(key=lambda w: w.load)
            n = max(1, min(len(up), len(free) // max(1, min_chunk)))
            size = -(-len(free) // n)
            for k in range(n):
                part = free[k * size:(k + 1) * size]
                if part:
                    chunks.append((up[k], part, False))
        submitted = []
        for w, idx, bound in chunks:
            submitted.append((w, idx, bound, self._submit(w, BATCH, op, [items[i] for i in idx])))
        errors: list[ServiceError] = []
        for w, idx, bound, pending in submitted:
            self._wait(pending, None if deadline is None else deadline - time.monotonic())
            if not pending.ok:
                retry = idempotent and not bound
                error: ServiceError = (Unavailable(f"the HSM worker process failed during {op}")
                                       if pending.value is CRASHED else from_wire(pending.value))
                if bound and pending.value is CRASHED:
                    error = HandleExpired(None)
                if retry and isinstance(error, Unavailable):
                    try:
                        other = self.choose(exclude={w.index})
                        if other.backend_ok or pending.value is CRASHED:
                            again = self._submit(other, BATCH, op, [items[i] for i in idx])
                            self._wait(again, None if deadline is None
                                       else deadline - time.monotonic())
                            if again.ok:
                                for i, r in zip(idx, again.value, strict=True):
                                    results[i] = r
                                continue
                    except Unavailable:
                        pass
                errors.append(error)
                continue
            for i, r in zip(idx, pending.value, strict=True):
                results[i] = r
        if errors:
            raise errors[0]
        return results

    def broadcast(self, name: str, payload: Any, *, timeout: float = 5.0) -> None:
        """Send a control message to every live worker and wait for each reply."""
        waiting = []
        for w in self.workers:
            if w.alive:
                try:
                    waiting.append(self._submit(w, CONTROL, name, payload))
                except Unavailable:
                    continue
        for pending in waiting:
            pending.event.wait(timeout)

    def control(self, index: int, name: str, payload: Any, *, timeout: float | None = None
                ) -> Any:
        """A control message to one worker, waiting for its reply (None if it is gone)."""
        w = self.workers[index]
        try:
            pending = self._submit(w, CONTROL, name, payload)
        except Unavailable:
            return None
        pending.event.wait(5.0 if timeout is None else min(timeout, 5.0))
        return pending.value if pending.ok else None

    def send_control(self, index: int, name: str, payload: Any) -> None:
        """Fire-and-forget control message to one worker (release of expired handles)."""
        w = self.workers[index]
        if w.alive:
            try:
                self._submit(w, CONTROL, name, payload)
            except Unavailable:
                pass
