"""A TCP relay that delays every byte by a fixed one-way latency.

The kernel on the benchmark machines has no ``netem`` queueing discipline, so
round-trip time between a card agent and the access server is simulated by
putting this relay between them: the agent connects to the relay, the relay
connects to the server, and each chunk read on one side is written to the
other side ``one_way_delay`` seconds after it arrived. Order is kept per
direction and throughput is not limited, like a long but wide link. TLS runs
end to end through it (the relay only sees ciphertext).

Usage as a library::

    with DelayRelay(("127.0.0.1", server_port), one_way_delay=0.025) as relay:
        connect_agent_to(relay.address)     # 50 ms round trip

or from a shell: ``python -m bench.relay --target 127.0.0.1:PORT --rtt-ms 50``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READ_CHUNK = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    """Copy one direction, each chunk released ``delay`` after it was read."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            chunk = await reader.read(READ_CHUNK)
            await queue.put((time.monotonic() + delay, chunk))
            if not chunk:
                break
        await sender
    except (OSError, asyncio.IncompleteReadError):
        sender.cancel()


class DelayRelay:
    """A loopback listener relaying to ``target`` with a one-way delay."""

    def __init__(self, target: tuple[str, int], one_way_delay: float,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        if one_way_delay < 0:
            raise ValueError("the delay cannot be negative")
        self.target = target
        self.delay = one_way_delay
        self._listen = listen
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-relay",
                                        daemon=True)
        self.address: tuple[str, int] = listen

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer, self.delay),
                                 _pump(up_reader, writer, self.delay))
        except asyncio.CancelledError:
            pass                    # the relay is stopping: just close both ends
        finally:
            for w in (writer, up_writer):
                w.close()

    def start(self) -> DelayRelay:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, *self._listen), self._loop)
        self._server = future.result(timeout=5)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Close the listener and every relayed connection, then the loop."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> DelayRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RelayProcess:
    """The same relay in a process of its own.

    A relay thread inside the process it measures competes with it for the
    interpreter lock: each delayed chunk may wait for the other thread's time
    slice (up to 5 ms) before it is written, which the measurement would
    count as latency of the system under test. This runs ``python -m
    bench.relay`` instead and reads the address it listens on.
    """

    def __init__(self, target: tuple[str, int], rtt_seconds: float,
                 start_timeout: float = 10.0) -> None:
        if rtt_seconds < 0:
            raise ValueError("the delay cannot be negative")
        self.target = target
        self.rtt_seconds = rtt_seconds
        self.start_timeout = start_timeout
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> RelayProcess:
        repo = Path(__file__).resolve().parents[1]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.relay", "--target", f"{self.target[0]}:{self.target[1]}",
             "--rtt-ms", f"{self.rtt_seconds * 1000:g}"],
            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self._process.stdout is not None
        ready = select.select([self._process.stdout], [], [], self.start_timeout)[0]
        line = self._process.stdout.readline() if ready else ""
        if not line.startswith("relaying 127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the relay process did not start ({line.strip() or 'no output'})")
        self.address = ("127.0.0.1", int(line.split()[1].rsplit(":", 1)[1]))
        return self

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--listen-port", type=int, default=0)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    relay = DelayRelay((host, int(port)), args.rtt_ms / 2000,
                       ("127.0.0.1", args.listen_port)).start()
    print(f"relaying 127.0.0.1:{relay.address[1]} -> {args.target} "
          f"with {args.rtt_ms:g} ms round trip", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        relay.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
