"""A stop request that reaches whatever the agent is blocked on.

SIGTERM must end the agent promptly whether it sleeps in a backoff, waits for
a card or waits for the server's next message. Sleeping is an Event wait; a
gRPC call is cancelled through a callback registered while the call runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Cancellation:
    """Set once; wakes sleepers and runs the cancel callbacks of calls in flight."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._next_id = 0

    def cancel(self) -> None:
        """Request a stop (safe from a signal handler: only Event and lock operations)."""
        self._event.set()
        with self._lock:
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when woken by a stop request."""
        return self._event.wait(max(0.0, seconds))

    def register(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Run ``callback`` on cancel (at once if already cancelled); returns the unregister."""
        with self._lock:
            key = self._next_id
            self._next_id += 1
            self._callbacks[key] = callback
        if self._event.is_set():
            callback()

        def unregister() -> None:
            with self._lock:
                self._callbacks.pop(key, None)

        return unregister
