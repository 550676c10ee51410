"""CPU per blocking call handed from an event loop to a thread and back.

Prints one JSON object: microseconds of this process's CPU (and wall time)
per call for ``loop.run_in_executor`` on a ``ThreadPoolExecutor``,
``asyncio.wrap_future(executor.submit(...))`` and
``cms.runtime.loop_threads.LoopThreads``, with ``--callers`` coroutines
calling at once (the access server hands each step of a card contact to a
thread this way).

Usage: .venv/bin/python bench/loop_threads.py [--calls 40000] [--callers 32] [--threads 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cms.runtime.loop_threads import LoopThreads


def _step(value: int) -> int:
    return value + 1


async def _measure(call: Callable[[], Awaitable[int]], calls: int, callers: int
                   ) -> dict[str, float]:
    async def caller() -> None:
        for _ in range(calls // callers):
            await call()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    done = (calls // callers) * callers
    return {"cpu_us_per_call": round((time.process_time() - cpu) / done * 1e6, 1),
            "wall_us_per_call": round((time.perf_counter() - wall) / done * 1e6, 1)}


async def _run(calls: int, callers: int, threads: int) -> dict[str, dict[str, float]]:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(threads)
    pool = LoopThreads(threads, "bench")
    ways: dict[str, Callable[[], Awaitable[int]]] = {
        "run_in_executor": lambda: loop.run_in_executor(executor, _step, 1),
        "wrap_future": lambda: asyncio.wrap_future(executor.submit(_step, 1)),
        "loop_threads": lambda: pool.submit(_step, 1),
    }
    results = {}
    try:
        for name, call in ways.items():
            await _measure(call, calls // 10, callers)         # warm-up
            results[name] = await _measure(call, calls, callers)
    finally:
        executor.shutdown()
        pool.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40_000)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args(argv)
    if min(args.calls, args.callers, args.threads) < 1 or args.calls < args.callers:
        parser.error("--calls, --callers and --threads must be at least 1, --calls >= --callers")
    results = asyncio.run(_run(args.calls, args.callers, args.threads))
    print(json.dumps({"calls": args.calls, "callers": args.callers, "threads": args.threads,
                      **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
