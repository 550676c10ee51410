"""LoopThreads: blocking calls from coroutines, their results and failures, and shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cms.runtime.loop_threads import LoopThreads


def test_calls_run_in_the_threads_and_answer_their_callers() -> None:
    threads = LoopThreads(4, "test")

    async def scenario() -> None:
        names = await asyncio.gather(*(threads.submit(lambda: threading.current_thread().name)
                                       for _ in range(20)))
        assert {n.rsplit("_", 1)[0] for n in names} == {"test"}
        assert await threads.submit(pow, 2, 10) == 1024

    try:
        asyncio.run(scenario())
    finally:
        threads.shutdown()


def test_a_failure_reaches_the_caller_as_it_was_raised() -> None:
    threads = LoopThreads(1, "test")

    def fail() -> None:
        raise LookupError("no such card")

    async def scenario() -> None:
        with pytest.raises(LookupError, match="no such card"):
            await threads.submit(fail)
        assert await threads.submit(len, "abc") == 3        # the thread lives on

    try:
        asyncio.run(scenario())
    finally:
        threads.shutdown()


def test_a_call_whose_caller_stopped_waiting_still_runs_to_its_end() -> None:
    threads = LoopThreads(1, "test")
    release, ran = threading.Event(), threading.Event()

    def step() -> str:
        release.wait(10)
        ran.set()
        return "done"

    async def scenario() -> None:
        call = threads.submit(step)
        waiter = asyncio.ensure_future(asyncio.shield(call))
        await asyncio.sleep(0)
        waiter.cancel()
        release.set()
        assert await call == "done"

    try:
        asyncio.run(scenario())
    finally:
        threads.shutdown()
    assert ran.is_set()


def test_after_shutdown_no_call_is_taken() -> None:
    threads = LoopThreads(2, "test")
    threads.shutdown()

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="shut down"):
            threads.submit(len, "x")

    asyncio.run(scenario())
