"""How a batch RPC of the proxy runs: each item checked alone, the valid ones across the workers.

Every batch form (``Hsm.SignBatch``, ``DeriveKeyBatch``, ``EncryptBatch``,
``CardKeys.OpenSecureChannelBatch``) keeps one contract, written here once so
that a new batch form only says how to check one item and how to answer it:

- each item is checked and authorized as its unary RPC checks it; a denied
  item (PERMISSION_DENIED) fails the whole call, so the denial is audited
  and counted as one, while any other problem of an item is answered in
  that item, with the status it would have had alone, and the rest still
  run;
- the valid items go to the workers in one ``WorkerPool.batch`` (an item
  that uses a handle runs in the worker holding it), and the answers come
  back in item order.

An item may also create something that outlives the call. A session object
lives under a handle reserved for the item once its checks pass (a handle
that cannot be reserved, over the caller's quota, fails the call as the
unary RPC would) and activated only when its item succeeded; every
reservation is given back if the call fails. Persistent keys are made under
their labels' locks, all by one worker so that duplicate labels inside the
batch are caught in order, and such a batch is never run twice after a
worker failure: that could make a key twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf.message import Message

from cms.runtime.errors import ServiceError, Unavailable
from cms.v1 import hsm_pb2 as pb
from hsm_proxy.core import Call, ProxyCore
from hsm_proxy.errors import failure_item_error, item_error
from hsm_proxy.handles import HandleRecord
from hsm_proxy.pool import MIN_CHUNK
from hsm_proxy.worker import Failure

R = TypeVar("R")
M = TypeVar("M", bound=Message)


class BatchItem(NamedTuple):
    """A checked item: what its worker runs, and where."""

    payload: Any
    worker: int | None = None                # the worker holding a handle the item uses
    creates: tuple[str, str] | None = None   # (token, label) of a persistent key it makes


class HandleItem(NamedTuple):
    """A checked item whose result stays in a worker under a new handle of the caller's."""

    kind: str
    token: str
    label: str
    payload: Callable[[str], Any]            # the payload naming the reserved handle
    worker: int | None = None                # beside a handle it derives from; None: any


Answer = Callable[[Any, Any, HandleRecord | None], Any]


def run_batch(core: ProxyCore, call: Call, items: Sequence[R],
              check: Callable[[R], BatchItem | HandleItem], op: str, out: M, field: str, *,
              idempotent: bool = True, min_chunk: int = MIN_CHUNK,
              answer: Answer | None = None) -> M:
    """Check every item, run the valid ones with ``op``, and fill ``out.results`` in order.

    ``check`` turns a request item into what a worker runs, or raises the
    ServiceError the unary RPC would answer. A success is set as ``field``
    of its result, the worker's value as it is or what ``answer(item,
    value, handle record)`` makes of it; a failure as ``error``.
    ``min_chunk``: how few free items are worth a worker of their own.
    """
    n = core.batch_size(len(items))
    call.items = n
    results: list[Any] = [None] * n
    work: list[int] = []
    payloads: list[Any] = []
    affinity: list[int | None] = []
    records: dict[int, HandleRecord] = {}
    creates: list[tuple[str, str]] = []
    creator: int | None = None
    raw: list[Any] = []
    try:
        for i, req in enumerate(items):
            try:
                checked = check(req)
            except ServiceError as exc:
                if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                    raise
                results[i] = item_error(exc)
                continue
            if isinstance(checked, HandleItem):
                record = core.new_handle(call, checked.kind, checked.token, checked.label,
                                         worker=checked.worker)
                records[i] = record
                payload, worker = checked.payload(record.handle), record.worker
            else:
                payload, worker = checked.payload, checked.worker
                if checked.creates is not None:
                    creates.append(checked.creates)
                    if worker is None:
                        if creator is None:
                            creator = core.pool.choose().index
                        worker = creator
            work.append(i)
            payloads.append(payload)
            affinity.append(worker)
        if work:
            with core.creating(creates):
                raw = core.pool.batch(op, payloads, affinity=affinity,
                                      idempotent=idempotent and not creates,
                                      timeout=call.timeout(), min_chunk=min_chunk)
    except BaseException:
        for record in records.values():
            core.handles.discard(record)
        raise
    for i, value in zip(work, raw, strict=True):
        record = records.get(i)
        if isinstance(value, Failure):
            if record is not None:
                core.handles.discard(record)
            results[i] = failure_item_error(value)
        elif record is not None and not _activated(core, record):
            results[i] = item_error(Unavailable("the HSM worker restarted; retry"))
        else:
            results[i] = value if answer is None else answer(items[i], value, record)
    if records:
        core.update_handle_gauge()
    add = out.results.add  # type: ignore[attr-defined]
    for result in results:
        if isinstance(result, pb.ItemError):
            add(error=result)
        else:
            add(**{field: result})
    return out


def _activated(core: ProxyCore, record: HandleRecord) -> bool:
    """Activate the handle of an item that succeeded, unless its worker restarted meanwhile
    (the state died with it: the reservation is given back)."""
    state = core.pool.worker_state(record.worker)
    if state is None:
        core.handles.discard(record)
        return False
    core.handles.activate(record, *state)
    return True
