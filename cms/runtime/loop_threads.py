"""Threads that run blocking calls for the coroutines of an event loop.

``loop.run_in_executor`` goes through a ``concurrent.futures.Future`` chained
to an asyncio future, and ``ThreadPoolExecutor.submit`` takes a semaphore and
a condition shared with its workers: about 30 us of CPU per call with 32
callers (``bench/loop_threads.py``), several calls per card contact. Here a
call is a queue entry and its result goes straight to the caller's future
through ``call_soon_threadsafe``: about 6 us.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():           # the caller stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LoopThreads:
    """``workers`` threads; ``submit`` from a coroutine, await the future it returns.

    A call that was submitted runs to its end even if its caller stops
    waiting (its result is then dropped), so a caller that must know when a
    call is over can keep the future and await it later.
    """

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in a thread; the future is the running loop's."""
        if self._closed:
            raise RuntimeError("LoopThreads is shut down")
        future = asyncio.get_running_loop().create_future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args = item
            result, error = None, None
            try:
                result = fn(*args)
            except BaseException as exc:     # handed to the caller, whatever it is
                error = exc
            try:
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:             # the loop is closed: nobody waits any more
                pass
            del item, future, result, error

    def shutdown(self, wait: bool = True) -> None:
        """No more calls; the queued ones still run. ``wait``: until every thread ended."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join()
