"""Concurrent contacts' secure channels opened in shared proxy calls.

Every card contact opens one secure channel in the HSM proxy. As a unary
call each costs the proxy's frontend about a millisecond of CPU before any
HSM work (TLS, HTTP/2, the audit record, the hop to a worker process), and
the HSM work of a channel is only about four. So the contacts of a fleet
campaign share calls: ``ChannelOpener.OpenSecureChannel`` is a drop-in for
the CardKeys stub's method, and behind it concurrent requests travel
together in ``OpenSecureChannelBatch``.

The rule is group commit, with no timer: a request that finds a free slot
(fewer than ``max_in_flight`` calls on the wire) goes at once, taking along
whatever is queued; otherwise it queues, and when a call comes back the
first queued request is sent next, with those behind it. A lone contact
therefore waits for nothing; under load the batches grow by themselves to
what arrives during one proxy call.

A failed item, or a failed call, reaches each of its callers as the
``grpc.RpcError`` a unary call would have raised (``code()``,
``details()``), so the flows handle both alike.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import grpc
from prometheus_client import Histogram

from cms.runtime.errors import status_from_number
from cms.v1 import card_keys_pb2 as kpb

DEFAULT_MAX_IN_FLIGHT = 2
"""Batch calls on the wire at once: one being computed while the next one fills."""

DEFAULT_MAX_BATCH = 32
"""Requests per call; what the proxy allows per batch is larger."""


BATCH_ITEMS = Histogram(
    "cms_access_channel_batch_items", "Secure channels per OpenSecureChannelBatch call",
    buckets=(1, 2, 4, 8, 16, 32, 64))


class OpenError(grpc.RpcError):
    """One request's failure: the status a unary OpenSecureChannel would have ended with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Waiting:
    """One caller's request, and what came of it."""

    __slots__ = ("error", "request", "response", "sends", "wake")

    def __init__(self, request: kpb.OpenSecureChannelRequest) -> None:
        self.request = request
        self.wake = threading.Event()
        self.sends = False              # this caller sends the next call
        self.response: kpb.OpenSecureChannelResponse | None = None
        self.error: OpenError | None = None

    @property
    def answered(self) -> bool:
        return self.response is not None or self.error is not None


class ChannelOpener:
    """OpenSecureChannel for many threads, sent as OpenSecureChannelBatch calls."""

    def __init__(self, stub: Any, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self._stub = stub
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: deque[_Waiting] = deque()
        self._in_flight = 0

    def OpenSecureChannel(self, request: kpb.OpenSecureChannelRequest, *,
                          timeout: float) -> kpb.OpenSecureChannelResponse:
        """What the unary call returns, or raises; ``request.predict_responses`` is required."""
        if not request.predict_responses:
            raise ValueError("only channels with predict_responses are opened in batches")
        me = _Waiting(request)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._queue.append(me)
            if self._in_flight < self._max_in_flight:
                self._in_flight += 1
                me.sends = True
        while not me.answered:
            if me.sends:
                self._send(deadline)
                continue
            if not me.wake.wait(max(0.0, deadline - time.monotonic())):
                with self._lock:
                    if me in self._queue and not me.sends:     # never sent: give up
                        self._queue.remove(me)
                        raise OpenError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "no proxy call was free before the deadline")
                if not me.sends:
                    # Sent meanwhile: its call has a deadline of its own.
                    me.wake.wait()
            me.wake.clear()
        if me.error is not None:
            raise me.error
        assert me.response is not None
        return me.response

    def _send(self, deadline: float) -> None:
        with self._lock:
            batch = [self._queue.popleft()
                     for _ in range(min(self._max_batch, len(self._queue)))]
        BATCH_ITEMS.observe(len(batch))
        try:
            self._answer(batch, deadline)
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is not None:
                    successor.sends = True      # the slot passes on
                else:
                    self._in_flight -= 1
            if successor is not None:
                successor.wake.set()
            for waiting in batch:
                if not waiting.answered:
                    waiting.error = OpenError(grpc.StatusCode.INTERNAL,
                                              "the batch call ended without an answer")
                waiting.sends = False
                waiting.wake.set()

    def _answer(self, batch: list[_Waiting], deadline: float) -> None:
        request = kpb.OpenSecureChannelBatchRequest(items=[w.request for w in batch])
        try:
            reply = self._stub.OpenSecureChannelBatch(
                request, timeout=max(0.001, deadline - time.monotonic()))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            for waiting in batch:
                waiting.error = OpenError(code, details or "")
            return
        if len(reply.results) != len(batch):
            for waiting in batch:
                waiting.error = OpenError(grpc.StatusCode.INTERNAL,
                                          f"the proxy answered {len(reply.results)} items "
                                          f"for {len(batch)}")
            return
        for waiting, result in zip(batch, reply.results, strict=True):
            if result.HasField("opened"):
                waiting.response = result.opened
            else:
                waiting.error = OpenError(status_from_number(result.error.code)
                                          or grpc.StatusCode.UNKNOWN, result.error.message)
