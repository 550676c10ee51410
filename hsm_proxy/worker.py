"""A PKCS#11 worker process: loads the module once and executes operations serially.

The frontend starts N of these with multiprocessing's *spawn* method (a fresh
interpreter: no PKCS#11 state, lock or thread inherited from the frontend) and
talks to each over a pipe. Messages are tuples:

    frontend -> worker: (request id, kind, operation name, payload)
        kind "call": one operation; "batch": payload is a list of items, each
        run by the operation, failures reported per item; "control": ping,
        release, invalidate, shutdown.
    worker -> frontend: (request id, ok, value, status)
        value: the result, or (code name, message) when not ok; for a batch a
        list whose failed items are ``Failure`` tuples. ``status`` is
        ``WorkerStatus`` (backend generation, up or down, reason, sessions,
        states), sent with every reply so the frontend's view never goes stale.

Only this process calls the module, from one thread: the module was
initialized without locking flags and is not thread safe.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cms.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unimplemented,
)
from cms.runtime.logs import fields, setup_logging
from hsm_proxy.config import TokenConfig
from hsm_proxy.errors import BackendUnavailable, Internal, to_wire
from hsm_proxy.registry import OPERATIONS, Operation, StateStore

log = logging.getLogger("hsm_proxy.worker")

DEFAULT_OPERATION_MODULES = ("hsm_proxy.hsm_ops",)
CALL, BATCH, CONTROL = "call", "batch", "control"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable (PINs are read by the worker itself)."""

    index: int
    module: str
    tokens: tuple[TokenConfig, ...]
    env: dict[str, str]
    max_backoff: float = 2.0
    log_level: str = "info"
    log_file: str | None = None
    operation_modules: tuple[str, ...] = DEFAULT_OPERATION_MODULES
    # The officer worker: no standing login; runs the steps that need the
    # security officer (key ceremonies, transport keys). See backend.py.
    officer: bool = False


class WorkerStatus(NamedTuple):
    generation: int
    backend_ok: bool
    reason: str
    sessions: int
    states: int


class Failure(NamedTuple):
    """A failed batch item: gRPC status code name and message."""

    code: str
    message: str


def map_pkcs11_error(exc: Exception, op: str) -> ServiceError:
    """A caller-facing error for a PKCS#11 error that is not a backend failure."""
    import pkcs11

    name = type(exc).__name__
    if isinstance(exc, pkcs11.MechanismInvalid | pkcs11.MechanismParamInvalid):
        return InvalidArgument(f"{op}: the HSM does not support this mechanism or its "
                               f"parameters for this key ({name})")
    if isinstance(exc, pkcs11.KeyTypeInconsistent | pkcs11.WrappingKeyTypeInconsistent
                  | pkcs11.UnwrappingKeyTypeInconsistent):
        return FailedPrecondition(f"{op}: the key's type does not fit the mechanism ({name})")
    if isinstance(exc, pkcs11.KeyUnextractable | pkcs11.KeyNotWrappable):
        return FailedPrecondition(f"{op}: the key may not be wrapped ({name})")
    if isinstance(exc, pkcs11.DataLenRange | pkcs11.DataInvalid | pkcs11.EncryptedDataInvalid
                  | pkcs11.EncryptedDataLenRange):
        return InvalidArgument(f"{op}: the HSM rejected the data: wrong length or format "
                               f"({name})")
    if isinstance(exc, pkcs11.WrappedKeyInvalid | pkcs11.WrappedKeyLenRange):
        return InvalidArgument(f"{op}: the HSM rejected the wrapped key: wrong key, mechanism "
                               f"or data ({name})")
    if isinstance(exc, pkcs11.KeySizeRange | pkcs11.WrappingKeySizeRange
                  | pkcs11.UnwrappingKeySizeRange | pkcs11.DomainParamsInvalid
                  | pkcs11.PublicKeyInvalid):
        return InvalidArgument(f"{op}: the HSM rejected the key or its size ({name})")
    if isinstance(exc, pkcs11.TemplateInconsistent | pkcs11.TemplateIncomplete
                  | pkcs11.AttributeValueInvalid | pkcs11.AttributeReadOnly
                  | pkcs11.AttributeTypeInvalid):
        return InvalidArgument(f"{op}: the HSM rejected the key template ({name})")
    if isinstance(exc, pkcs11.AttributeSensitive):
        return FailedPrecondition(f"{op}: the attribute is sensitive and cannot be read")
    if isinstance(exc, pkcs11.TokenWriteProtected | pkcs11.SessionReadOnly):
        return FailedPrecondition(f"{op}: the token is write-protected")
    if isinstance(exc, pkcs11.DeviceMemory | pkcs11.HostMemory):
        return ResourceExhausted(f"{op}: the HSM is out of memory ({name})")
    if isinstance(exc, pkcs11.FunctionNotSupported):
        return Unimplemented(f"{op}: the HSM does not implement this function")
    if "0x68" in str(exc):  # CKR_KEY_FUNCTION_NOT_PERMITTED, unnamed in python-pkcs11
        return FailedPrecondition(f"{op}: the key's attributes do not permit this operation")
    return Internal(f"{op}: HSM error {name}")


class Worker:
    """Executes operations against one Backend; the ``WorkerContext`` of operations."""

    def __init__(self, spec: WorkerSpec):
        from hsm_proxy.backend import Backend

        self.index = spec.index
        self.spec = spec
        self.states = StateStore()
        self.backend = Backend(spec.module, spec.tokens, max_backoff=spec.max_backoff,
                               on_reset=self.states.clear, officer=spec.officer)

    # -- status -------------------------------------------------------------------
    def status(self) -> WorkerStatus:
        b = self.backend
        return WorkerStatus(b.generation, b.ok, b.reason, b.open_sessions, len(self.states))

    # -- execution ----------------------------------------------------------------
    def attempt(self, op: Operation, payload: Any) -> Any:
        """Run ``op`` with the recovery rules of the module docstring of backend.py."""
        import pkcs11

        from hsm_proxy.backend import failure_name, is_backend_failure

        for attempt in (1, 2):
            try:
                self.backend.ensure()
                return op.fn(self, payload)
            except (pkcs11.ObjectHandleInvalid, pkcs11.KeyHandleInvalid,
                    pkcs11.WrappingKeyHandleInvalid, pkcs11.UnwrappingKeyHandleInvalid):
                # A cached object went away (destroyed elsewhere): nothing ran, so
                # look the label up again once.
                self.backend.forget()
                if attempt == 2:
                    raise NotFound(f"{op.name}: the key no longer exists") from None
            except ServiceError:
                raise
            except pkcs11.PKCS11Error as exc:
                if not is_backend_failure(exc):
                    raise map_pkcs11_error(exc, op.name) from None
                name = failure_name(exc)
                self.backend.fail(exc)
                if not op.idempotent:
                    raise BackendUnavailable(
                        f"HSM backend failed during {op.name} ({name}); not retried because "
                        f"{op.name} is not idempotent: check the result before repeating it"
                    ) from None
                if attempt == 2:
                    raise BackendUnavailable(f"HSM backend failed during {op.name} ({name}), "
                                             f"again after reconnecting") from None
        raise AssertionError("unreachable")

    def run_call(self, name: str, payload: Any) -> Any:
        return self.attempt(self._op(name), payload)

    def run_batch(self, name: str, items: list[Any]) -> list[Any]:
        """Run ``name`` per item. Item errors are reported per item; a backend that
        stays down fails the whole chunk (UNAVAILABLE) so the caller can retry it."""
        op = self._op(name)
        results: list[Any] = []
        for item in items:
            try:
                results.append(self.attempt(op, item))
            except BackendUnavailable:
                raise
            except ServiceError as exc:
                results.append(Failure(*to_wire(exc)))
        return results

    def _op(self, name: str) -> Operation:
        op = OPERATIONS.get(name)
        if op is None:
            raise Unimplemented(f"worker operation {name!r} is not registered")
        return op

    # -- control ------------------------------------------------------------------
    def control(self, name: str, payload: Any) -> Any:
        if name == "ping":
            try:
                self.backend.probe()
            except BackendUnavailable:
                pass
            return None
        if name == "release":
            return self.release(payload)
        if name == "invalidate":
            for token, label in payload:
                self.backend.forget(token, label)
            return None
        raise Unimplemented(f"unknown control message {name!r}")

    def release(self, handles: list[str]) -> int:
        """Free the states of ``handles``; objects are destroyed while the backend is up."""
        import pkcs11

        from hsm_proxy.backend import is_backend_failure

        released = 0
        for handle in handles:
            state = self.states.pop(handle)
            if state is None:
                continue
            released += 1
            if not self.backend.ok:
                continue
            try:
                state.close(self)
            except pkcs11.PKCS11Error as exc:
                if is_backend_failure(exc):
                    self.backend.fail(exc)
        return released


def worker_main(spec: WorkerSpec, conn: Any) -> None:
    """Entry point of a worker process (multiprocessing target)."""
    # The frontend decides when workers stop (after in-flight calls drain), so
    # terminal signals aimed at the process group are ignored here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(spec.env)
    setup_logging(f"hsm-proxy/worker-{spec.index}", spec.log_level,
                  None if spec.log_file is None else Path(spec.log_file))
    for module in spec.operation_modules:
        importlib.import_module(module)
    worker = Worker(spec)
    try:
        worker.backend.connect()
    except BackendUnavailable as exc:
        log.warning("backend not available at start", extra=fields(reason=exc.message))
    conn.send((0, True, os.getpid(), worker.status()))
    _serve(worker, conn)


def _serve(worker: Worker, conn: Any) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the frontend is gone
        req_id, kind, name, payload = message
        if kind == CONTROL and name == "shutdown":
            worker.backend.close()
            conn.send((req_id, True, None, worker.status()))
            break
        started = time.perf_counter()
        try:
            if kind == BATCH:
                value: Any = worker.run_batch(name, payload)
            elif kind == CONTROL:
                value = worker.control(name, payload)
            else:
                value = worker.run_call(name, payload)
            reply = (req_id, True, value, worker.status())
        except ServiceError as exc:
            reply = (req_id, False, to_wire(exc), worker.status())
        except Exception as exc:
            log.error("operation failed", extra=fields(operation=name, error=type(exc).__name__))
            reply = (req_id, False, to_wire(Internal(
                f"{name}: internal error in the worker ({type(exc).__name__})")), worker.status())
        if kind != CONTROL:
            elapsed = time.perf_counter() - started
            if elapsed > 1.0:
                log.info("slow operation", extra=fields(operation=name, seconds=round(elapsed, 3)))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
