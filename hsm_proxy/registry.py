"""The worker's operation registry and its per-worker state behind handles.

A worker process executes *operations*: plain functions registered by name
with ``@operation``. The frontend sends ``(operation name, payload)``; the
worker looks the name up here, runs the function with a ``WorkerContext`` and
the payload, and returns its result (anything picklable). Operation modules
are imported by the worker at start-up (``WorkerSpec.operation_modules``), so
adding an operation never touches the worker loop.

Stateful operations keep *state* in the worker that created it, named by a
handle the frontend chose (the handle encodes the worker, so follow-up calls
are routed back to it). A state is any ``State`` subclass: session key objects
(``hsm_ops.KeyState``), a key ceremony in progress, and later a secure channel
with its session keys. The frontend owns the handle's identity binding, TTL and
quota; the worker owns the state and frees it through ``State.close`` when the
handle is released or expires. When the backend restarts, states are dropped
without ``close`` (their objects died with the sessions) and later uses of the
handle answer "handle expired (backend restarted)".

Adding a stateful operation (for example a GlobalPlatform SCP03 channel whose
session keys are CMAC outputs kept in the worker that owns the channel):

1. Worker side, in a module listed in ``hsm_proxy.server.OPERATION_MODULES``::

       class SecureChannel(State):
           kind = "scp03-channel"
           def __init__(self, token, label, s_enc, s_mac, s_rmac): ...
           def close(self, ctx):            # release or TTL expiry
               for key in (self.s_enc, self.s_mac, self.s_rmac):
                   key.destroy()            # session objects in ctx.backend

       @operation("scp03.open", idempotent=False)
       def scp03_open(ctx, payload):
           handle, token, ... = payload     # the frontend chose the handle
           ...                              # derive keys with ctx.backend.session(token)
           ctx.states.put(handle, SecureChannel(...))
           return {...}

       @operation("scp03.wrap", idempotent=False)
       def scp03_wrap(ctx, payload):
           channel = ctx.states.get(payload.handle, SecureChannel)  # HandleExpired if lost
           ...

2. Frontend side, in a servicer method decorated with ``core.rpc``::

       call.authorize(token, label)
       record = core.new_handle(call, "scp03-channel", token, label)
       opened = core.create_state(call, record, "scp03.open", (record.handle, ...),
                                  idempotent=False)   # no handle left if it fails

   and for follow-up calls::

       record = core.handles.lookup(call.identity, handle,
                                    worker_state=core.pool.worker_state)
       call.authorize(record.token, record.label)
       core.pool.call("scp03.wrap", ..., worker=record.worker, idempotent=False, ...)

   Ownership, TTL, quota, ReleaseHandles and expiry after a restart then
   work for the new kind of handle exactly as for session keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from hsm_proxy.errors import HandleExpired

S = TypeVar("S", bound="State")


class WorkerContext(Protocol):
    """What an operation may use inside a worker."""

    backend: Any          # hsm_proxy.backend.Backend
    states: StateStore
    index: int

    def release(self, handles: list[str]) -> int:
        """Free the states of ``handles`` (as the frontend's release message does)."""
        ...


OperationFn = Callable[[WorkerContext, Any], Any]


@dataclass(frozen=True)
class Operation:
    """A named worker operation.

    ``idempotent``: running it twice has the same effect as once, so after a
    backend failure the worker may reconnect and run it again (sign, verify,
    encrypt, decrypt, derive into a session, read attributes, random). Never
    for operations that create or destroy persistent objects or advance state.
    """

    name: str
    fn: OperationFn
    idempotent: bool


OPERATIONS: dict[str, Operation] = {}


def operation(name: str, *, idempotent: bool) -> Callable[[OperationFn], OperationFn]:
    def register(fn: OperationFn) -> OperationFn:
        if name in OPERATIONS and OPERATIONS[name].fn is not fn:
            raise ValueError(f"worker operation {name!r} is registered twice")
        OPERATIONS[name] = Operation(name, fn, idempotent)
        return fn
    return register


class State:
    """Per-worker state named by a handle. Subclasses set ``kind`` and free in ``close``."""

    kind = "state"
    token = ""
    label = ""

    def close(self, ctx: WorkerContext) -> None:
        """Free what the state holds (called on release and expiry, backend alive)."""


class StateStore:
    """States of one worker by handle; emptied when the backend restarts."""

    def __init__(self) -> None:
        self._states: dict[str, State] = {}

    def __len__(self) -> int:
        return len(self._states)

    def put(self, handle: str, state: State) -> None:
        self._states[handle] = state

    def get(self, handle: str, kind: type[S]) -> S:
        state = self._states.get(handle)
        if state is None:
            # The frontend forwards only live handles it knows: a missing state
            # means this worker's backend restarted since the handle was made.
            raise HandleExpired(handle)
        if not isinstance(state, kind):
            from cms.runtime.errors import InvalidArgument

            raise InvalidArgument(f"handle {handle} is a {state.kind} handle, not a "
                                  f"{kind.kind} handle")
        return state

    def pop(self, handle: str) -> State | None:
        return self._states.pop(handle, None)

    def clear(self) -> None:
        self._states.clear()

    def handles(self) -> list[str]:
        return list(self._states)
