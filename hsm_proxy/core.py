"""What every RPC of the proxy goes through: identity, policy, handles, audit, metrics.

``ProxyCore`` holds the shared pieces (policy, audit log, handle registry,
worker pool, limits). ``@rpc`` wraps a servicer method: it reads the caller's
identity from its certificate, refuses unknown identities before any work,
gives the method a ``Call`` to authorize and record what it touches, and
afterwards writes exactly one audit record and the metrics, whatever the
outcome. A servicer for another contract served by the proxy (for example the
CardKeys service with its secure channels) uses the same pieces: ``@rpc``,
``call.authorize``, ``core.key_target``, ``core.new_handle`` and
``core.pool``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from cms.runtime.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unavailable,
)
from cms.runtime.logs import fields
from cms.runtime.tls import peer_identity
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc
from hsm_proxy import messages as m
from hsm_proxy import metrics
from hsm_proxy.audit import AuditLog
from hsm_proxy.ceremonies import CeremonyRegistry
from hsm_proxy.config import LimitsConfig
from hsm_proxy.errors import HandleExpired, Internal
from hsm_proxy.handles import HandleRecord, HandleRegistry
from hsm_proxy.policy import Policy
from hsm_proxy.pool import Reply, WorkerPool

log = logging.getLogger("hsm_proxy.core")

F = TypeVar("F", bound=Callable[..., Any])

MAX_LABEL_CHARS = 256
LABEL_STRIPES = 64
ANY_KNOWN_IDENTITY = frozenset({"ReleaseHandles"})
"""Operations every identity the policy knows may call: giving up one's own handles."""


@dataclass(frozen=True)
class Target:
    """A key reference after authorization: what to send, and to which worker."""

    ref: m.KeyRef
    worker: int | None
    token: str
    label: str
    record: HandleRecord | None = None


class Call:
    """One RPC: its caller, and the tokens, keys and handles it touched (for the audit)."""

    def __init__(self, core: ProxyCore, operation: str, identity: str | None,
                 context: grpc.ServicerContext):
        self.core = core
        self.operation = operation
        self.identity = identity
        self.context = context
        self.tokens: list[str] = []
        self.keys: set[str] = set()
        self.handles: set[str] = set()
        self.items: int | None = None
        self.detail: str | None = None

    def touch(self, token: str | None, key: str | None = None,
              handle: str | None = None) -> None:
        if token and token not in self.tokens:
            self.tokens.append(token)
        if key:
            self.keys.add(key)
        if handle:
            self.handles.add(handle)

    def authorize(self, token: str | None, key: str | None = None, *,
                  operation: str | None = None) -> None:
        """Policy check of this caller for ``token``/``key`` (recorded for the audit first)."""
        self.touch(token, key)
        self.core.policy.check(self.identity, operation or self.operation, token, key)

    def timeout(self) -> float | None:
        remaining = self.context.time_remaining()
        return None if remaining is None else max(0.0, remaining)


class ProxyCore:
    def __init__(self, *, policy: Policy, audit: AuditLog, handles: HandleRegistry,
                 pool: WorkerPool, limits: LimitsConfig, tokens: tuple[str, ...],
                 ceremonies: CeremonyRegistry | None = None):
        self.policy = policy
        self.audit = audit
        self.handles = handles
        self.ceremonies = ceremonies if ceremonies is not None else CeremonyRegistry(3600)
        self.pool = pool
        self.limits = limits
        self.tokens = tokens
        self.audit_failed = False
        self._label_locks = [threading.Lock() for _ in range(LABEL_STRIPES)]

    # -- names -------------------------------------------------------------------
    def require_token(self, token: str, what: str = "token") -> str:
        if not token:
            raise InvalidArgument(f"{what}: required")
        if token not in self.tokens:
            raise NotFound(f"unknown token {token!r} (the proxy fronts: "
                           f"{', '.join(self.tokens)})")
        return token

    def key_target(self, call: Call, ref: pb.KeyRef, what: str = "key", *,
                   operation: str | None = None) -> Target:
        """Authorize and resolve a KeyRef: a label on a token, or the caller's own handle."""
        kind = ref.WhichOneof("ref")
        if kind == "label":
            if not ref.label:
                raise InvalidArgument(f"{what}.label: empty")
            call.authorize(ref.token or None, ref.label, operation=operation)
            self.require_token(ref.token, f"{what}.token")
            return Target(m.LabelRef(ref.token, ref.label), None, ref.token, ref.label)
        if kind == "handle":
            call.touch(None, handle=ref.handle)
            record = self.handles.lookup(call.identity, ref.handle,
                                         worker_state=self.pool.worker_state)
            call.authorize(record.token, record.label, operation=operation)
            return Target(m.HandleRef(ref.handle), record.worker, record.token, record.label,
                          record)
        raise InvalidArgument(f"{what}: give a label (with its token) or a handle")

    def template(self, tpl: pb.KeyTemplate, what: str = "template") -> m.Template:
        """An operator key's template: the label must be an operator label, the usages one
        group of the class; extractable and CKA_ID are the proxy's, never the caller's."""
        if not tpl.label:
            raise InvalidArgument(f"{what}.label: required (policy patterns apply to it)")
        kc.require_role(tpl.label, {pb.OPERATOR_KEY}, f"{what}.label")
        if tpl.extractable:
            raise kc.KeyClassError(f"{what}.extractable: this service makes no extractable key; "
                                   f"key blocks leave an HSM only through KeyBlocks, wrapped "
                                   f"under a trusted transport key")
        if tpl.id:
            raise InvalidArgument(f"{what}.id: the proxy writes CKA_ID (the key's class and "
                                  f"origin); leave it empty")
        if len(tpl.label) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"{what}.label: longer than {MAX_LABEL_CHARS} characters")
        usages = frozenset(tpl.usages)
        if not usages:
            raise InvalidArgument(f"{what}.usages: at least one usage is required")
        unknown = [u for u in usages if u not in pb.KeyUsage.values() or u == 0]
        if unknown:
            raise InvalidArgument(f"{what}.usages: unknown value(s) {sorted(unknown)}")
        return m.Template(tpl.label, usages, tpl.extractable, tpl.session, bytes(tpl.id))

    def visible_keys(self, call: Call, token: str, pattern: str, key_class: int = 0
                     ) -> list[pb.KeyInfo]:
        """Persistent keys on ``token`` matching ``pattern`` that the caller's rules for
        this RPC cover (ListKeys, ListBlocks): a label it may not use is not shown."""
        call.authorize(token or None)
        self.require_token(token)
        raw = self.pool.call("list_keys", m.ListKeys(token, pattern, key_class),
                             idempotent=True, timeout=call.timeout()).value
        assert call.identity is not None
        infos = [pb.KeyInfo.FromString(item) for item in raw]
        shown = [info for info in infos
                 if self.policy.allowed(call.identity, call.operation, token, info.label)]
        call.detail = f"pattern {pattern or '*'}"
        return shown

    def token_pair(self, source: str, target: str) -> tuple[str, str]:
        """Two distinct configured tokens: where keys leave from, and where they land."""
        self.require_token(source, "source_token")
        self.require_token(target, "target_token")
        if source == target:
            raise InvalidArgument("source_token and target_token are the same token")
        return source, target

    def data(self, value: bytes, what: str = "data", *, allow_empty: bool = True) -> bytes:
        if len(value) > self.limits.max_data_bytes:
            raise InvalidArgument(f"{what} is {len(value)} bytes; the limit is "
                                  f"{self.limits.max_data_bytes}")
        if not value and not allow_empty:
            raise InvalidArgument(f"{what}: required")
        return value

    def batch_size(self, n: int) -> int:
        if n == 0:
            raise InvalidArgument("items: the batch is empty")
        if n > self.limits.max_batch_items:
            from cms.runtime.errors import ResourceExhausted

            raise ResourceExhausted(f"the batch has {n} items; the limit is "
                                    f"{self.limits.max_batch_items}")
        return n

    # -- handles -----------------------------------------------------------------
    def new_handle(self, call: Call, kind: str, token: str, label: str, *,
                   worker: int | None = None, tokens: tuple[str, ...] = ()) -> HandleRecord:
        """Reserve a handle for state a worker is about to create.

        ``worker``: where the state must live (beside a handle it derives from);
        by default the least busy worker. Then ``create_state`` sends the
        creating call (``record.handle`` in its payload) to that worker.
        """
        assert call.identity is not None
        if worker is None:
            worker = self.pool.choose().index
        record = self.handles.reserve(call.identity, worker, kind, token, label, tokens)
        call.touch(None, handle=record.handle)
        return record

    def create_state(self, call: Call, record: HandleRecord, op: str, payload: Any, *,
                     idempotent: bool) -> Any:
        """Run ``op``, which makes the state of a reserved handle, and return its value.

        The handle becomes usable only once its worker answered, stamped with
        that worker's incarnation (a restart since then expires it); if the
        call fails the reservation is given back, so a failed creation leaves
        no handle and counts nothing against the caller's quota.
        """
        try:
            reply = self.pool.call(op, payload, worker=record.worker, idempotent=idempotent,
                                   timeout=call.timeout())
        except ServiceError as exc:
            self.handles.discard(record)
            raise creation_failed(exc) from None
        self.activate(record, reply)
        return reply.value

    def activate(self, record: HandleRecord, reply: Reply) -> None:
        self.handles.activate(record, reply.incarnation, reply.generation)
        self.update_handle_gauge()

    def update_handle_gauge(self) -> None:
        counts = self.handles.counts()
        for kind in {"key", *counts}:
            metrics.HANDLES.labels(kind).set(counts.get(kind, 0))

    @contextmanager
    def creating(self, pairs: list[tuple[str, str]]) -> Iterator[None]:
        """Serialize creation of the same (token, label) across workers (duplicate check)."""
        stripes = sorted({zlib.crc32(f"{t}\0{lbl}".encode()) % LABEL_STRIPES for t, lbl in pairs})
        locks = [self._label_locks[i] for i in stripes]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def expire_handles(self) -> None:
        """Monitor tick: end handles and ceremonies past their TTL and free their state."""
        due = self.handles.expire()
        by_worker: dict[int, list[str]] = {}
        for record in due:
            by_worker.setdefault(record.worker, []).append(record.handle)
        for ceremony in self.ceremonies.expire():
            by_worker.setdefault(ceremony.worker, []).append(ceremony.ceremony_id)
        for worker, handles in by_worker.items():
            self.pool.send_control(worker, "release", handles)
        if due:
            log.info("handles expired", extra=fields(count=len(due)))
        self.update_handle_gauge()

    def worker_reset(self, worker: int, keep: tuple[int, int] | None) -> None:
        ceremonies = self.ceremonies.invalidate_worker(worker, keep)
        if ceremonies:
            log.warning("ceremonies lost with a worker restart",
                        extra=fields(worker=worker, count=len(ceremonies)))
        gone = self.handles.invalidate_worker(worker, keep)
        if gone:
            log.warning("handles lost with a backend restart",
                        extra=fields(worker=worker, count=len(gone)))
        self.update_handle_gauge()

    # -- audit -------------------------------------------------------------------
    def write_audit(self, call: Call, outcome: str, code: grpc.StatusCode) -> None:
        token: str | list[str] | None
        token = call.tokens[0] if len(call.tokens) == 1 else (sorted(call.tokens) or None)
        try:
            self.audit.record(identity=call.identity, operation=call.operation,
                              outcome=outcome, code=code.name, token=token, keys=call.keys,
                              handles=call.handles, items=call.items, detail=call.detail)
            metrics.AUDIT_RECORDS.labels(outcome).inc()
        except Exception as exc:
            # Fail closed: no further operation runs without its audit record.
            self.audit_failed = True
            log.critical("audit write failed; refusing further operations",
                         extra=fields(error=type(exc).__name__))


def target_hint(request: Any) -> tuple[str | None, str | None]:
    """Token and key a request names, for the denial message of an unknown identity."""
    for name in ("key", "base_key"):
        if request.DESCRIPTOR.fields_by_name.get(name) is not None and request.HasField(name) \
                and isinstance(getattr(request, name), pb.KeyRef):
            ref = getattr(request, name)
            return ref.token or None, ref.label or ref.handle or None
    token = getattr(request, "token", None) or None
    if isinstance(token, str):
        label = None
        if request.DESCRIPTOR.fields_by_name.get("template") is not None:
            label = request.template.label or None
        return token, label or getattr(request, "label", None) or None
    items = getattr(request, "items", None)
    if items:
        return target_hint(items[0])
    for name in ("source_token", "target_token"):
        token = getattr(request, name, None)
        if token:
            return token, getattr(request, "label", None) or getattr(
                request, "transport_label", None) or None
    return None, None


def rpc(fn: F) -> F:
    """Identity, policy pre-check, errors to status codes, one audit record, metrics."""
    operation = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        core: ProxyCore = self.core
        started = time.perf_counter()
        call = Call(core, operation, peer_identity(context), context)
        code = grpc.StatusCode.OK
        message = ""
        try:
            if core.audit_failed:
                raise Unavailable("the audit log cannot be written; the proxy refuses "
                                  "operations until an operator fixes it")
            if not core.policy.knows(call.identity):
                token, key = target_hint(request)
                call.touch(token, key)
                core.policy.check(call.identity, operation, token, key)
            if operation not in ANY_KNOWN_IDENTITY and not core.policy.grants_operation(
                    call.identity, operation):
                # Before any handle or ceremony is looked up: an identity with no
                # rule for this purpose learns nothing about what exists.
                token, key = target_hint(request)
                call.touch(token, key)
                asked = ", ".join(f"{what} {value!r}" for what, value in (("token", token),
                                                                          ("key", key)) if value)
                raise PermissionDenied(f"identity {call.identity!r} is not allowed operation "
                                       f"{operation} on any token or key"
                                       + (f" (asked for {asked})" if asked else ""))
            response = fn(self, request, context, call)
        except ServiceError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:
            log.error("internal error", extra=fields(operation=operation,
                                                     error=type(exc).__name__))
            err = Internal(f"internal error ({type(exc).__name__})")
            code, message = err.code, err.message
        outcome = ("ok" if code == grpc.StatusCode.OK
                   else "denied" if code == grpc.StatusCode.PERMISSION_DENIED else "error")
        if outcome != "ok":
            call.detail = message
        core.write_audit(call, outcome, code)
        metrics.OPERATIONS.labels(operation, code.name).inc()
        metrics.LATENCY.labels(operation).observe(time.perf_counter() - started)
        if call.items is not None:
            metrics.BATCH_ITEMS.labels(operation).inc(call.items)
        if outcome != "ok":
            metrics.ERRORS.labels(operation, code.name).inc()
            if outcome == "denied":
                metrics.DENIED.labels(str(call.identity), operation).inc()
                log.warning("denied", extra=fields(identity=call.identity, operation=operation,
                                                   reason=message))
            context.abort(code, message)
        return response

    return wrapper  # type: ignore[return-value]


def creation_failed(exc: ServiceError) -> ServiceError:
    """A pinned creation call whose worker died is unavailable, not an expired handle."""
    if isinstance(exc, HandleExpired):
        return Unavailable("the HSM worker failed while creating the key; retry")
    return exc

