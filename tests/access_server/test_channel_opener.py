"""ChannelOpener: concurrent contacts' channels share OpenSecureChannelBatch calls.

Unit tests with an in-process stand-in for the proxy's stub (the real batch
RPC is tested against the proxy in tests/hsm_proxy/test_card_keys_service.py,
and the flows run through this opener in every access server test).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from access_server.channel_opener import ChannelOpener, OpenError
from cms.v1 import card_keys_pb2 as kpb
from cms.v1 import hsm_pb2

pytestmark = pytest.mark.timeout(60)


def _request(n: int) -> kpb.OpenSecureChannelRequest:
    return kpb.OpenSecureChannelRequest(kvn=n, predict_responses=True)


class _Stub:
    """Answers each item with its kvn in ``channel``; item kvn 99 fails; may hold calls."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Semaphore(0)
        self.fail_call: grpc.RpcError | None = None

    def OpenSecureChannelBatch(self, request, timeout):
        self.batches.append([item.kvn for item in request.items])
        self.entered.release()
        assert self.hold.wait(30)
        if self.fail_call is not None:
            raise self.fail_call
        reply = kpb.OpenSecureChannelBatchResponse()
        for item in request.items:
            if item.kvn == 99:
                reply.results.add(error=hsm_pb2.ItemError(
                    code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                    message="card cryptogram mismatch"))
            else:
                reply.results.add(opened=kpb.OpenSecureChannelResponse(channel=str(item.kvn)))
        return reply


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "proxy restarting"


def _in_threads(opener: ChannelOpener, kvns: list[int]) -> tuple[list[threading.Thread], dict]:
    outcomes: dict[int, object] = {}

    def one(kvn: int) -> None:
        try:
            outcomes[kvn] = opener.OpenSecureChannel(_request(kvn), timeout=20).channel
        except OpenError as exc:
            outcomes[kvn] = (exc.code(), exc.details())

    threads = [threading.Thread(target=one, args=(k,)) for k in kvns]
    for t in threads:
        t.start()
    return threads, outcomes


def _wait_queued(opener: ChannelOpener, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(opener._queue) < count:
        assert time.monotonic() < deadline, "the requests did not queue"
        time.sleep(0.005)


def test_a_lone_request_goes_at_once() -> None:
    stub = _Stub()
    opener = ChannelOpener(stub)
    assert opener.OpenSecureChannel(_request(7), timeout=5).channel == "7"
    assert stub.batches == [[7]]


def test_requests_arriving_during_a_call_travel_together_in_the_next() -> None:
    stub = _Stub()
    opener = ChannelOpener(stub, max_in_flight=1)
    stub.hold.clear()
    first, first_out = _in_threads(opener, [1])
    assert stub.entered.acquire(timeout=10)             # call 1 is on the wire
    rest, rest_out = _in_threads(opener, [2, 3, 4, 5])
    _wait_queued(opener, 4)
    stub.hold.set()
    for t in first + rest:
        t.join(10)

    assert stub.batches[0] == [1] and sorted(stub.batches[1]) == [2, 3, 4, 5]
    assert len(stub.batches) == 2
    assert {**first_out, **rest_out} == {k: str(k) for k in (1, 2, 3, 4, 5)}
    assert opener._in_flight == 0


def test_batches_are_capped_and_the_slot_passes_on_until_the_queue_is_empty() -> None:
    stub = _Stub()
    opener = ChannelOpener(stub, max_in_flight=1, max_batch=2)
    stub.hold.clear()
    first, _ = _in_threads(opener, [1])
    assert stub.entered.acquire(timeout=10)
    rest, outcomes = _in_threads(opener, [2, 3, 4, 5, 6])
    _wait_queued(opener, 5)
    stub.hold.set()
    for t in first + rest:
        t.join(10)

    assert [len(b) for b in stub.batches] == [1, 2, 2, 1]
    assert outcomes == {k: str(k) for k in (2, 3, 4, 5, 6)}
    assert opener._in_flight == 0 and not opener._queue


def test_a_failed_item_fails_only_its_caller() -> None:
    stub = _Stub()
    opener = ChannelOpener(stub, max_in_flight=1)
    stub.hold.clear()
    first, _ = _in_threads(opener, [1])
    assert stub.entered.acquire(timeout=10)
    rest, outcomes = _in_threads(opener, [2, 99, 3])
    _wait_queued(opener, 3)
    stub.hold.set()
    for t in first + rest:
        t.join(10)

    assert outcomes == {2: "2", 3: "3", 99: (grpc.StatusCode.FAILED_PRECONDITION,
                                              "card cryptogram mismatch")}


def test_a_failed_call_fails_each_of_its_callers_with_its_status() -> None:
    stub = _Stub()
    stub.fail_call = _Unavailable()
    opener = ChannelOpener(stub)
    with pytest.raises(OpenError) as err:
        opener.OpenSecureChannel(_request(1), timeout=5)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE,
                                                       "proxy restarting")
    assert isinstance(err.value, grpc.RpcError)          # what the flows catch
    stub.fail_call = None
    assert opener.OpenSecureChannel(_request(2), timeout=5).channel == "2"


def test_a_request_that_never_got_a_call_gives_up_at_its_deadline() -> None:
    stub = _Stub()
    opener = ChannelOpener(stub, max_in_flight=1)
    stub.hold.clear()
    first, first_out = _in_threads(opener, [1])
    assert stub.entered.acquire(timeout=10)
    with pytest.raises(OpenError) as err:
        opener.OpenSecureChannel(_request(2), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not opener._queue                              # nothing left to send
    stub.hold.set()
    first[0].join(10)
    assert first_out == {1: "1"}
    assert opener.OpenSecureChannel(_request(3), timeout=5).channel == "3"
    assert stub.batches == [[1], [3]]


def test_only_foreseen_channels_are_batched() -> None:
    with pytest.raises(ValueError, match="predict_responses"):
        ChannelOpener(_Stub()).OpenSecureChannel(kpb.OpenSecureChannelRequest(kvn=1),
                                                 timeout=5)
