"""The worker pool's choice of worker, in process (no worker is started)."""

from __future__ import annotations

from hsm_proxy.pool import WorkerPool
from hsm_proxy.worker import WorkerSpec, WorkerStatus


class _ChangingPending(dict):
    """A pending-call table whose size changes at every reading, as under load."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.size = start

    def __len__(self) -> int:
        self.size += 1
        return self.size


def test_choose_reads_each_load_once_while_other_threads_change_them() -> None:
    pool = WorkerPool([WorkerSpec(index=i, module="none", tokens=(), env={}) for i in range(2)])
    for worker, start in zip(pool.workers, (0, 1), strict=True):
        worker.alive = True
        worker.status = WorkerStatus(1, True, "", 0, 0)
        worker.pending = _ChangingPending(start)     # type: ignore[assignment]

    chosen = [pool.choose() for _ in range(20)]

    # Reading a load twice would find no worker at the minimum it had just seen
    # (ZeroDivisionError before the fix); each choice is a live worker.
    assert all(w in pool.workers for w in chosen)


def test_choose_prefers_the_least_busy_worker_whose_backend_is_up() -> None:
    pool = WorkerPool([WorkerSpec(index=i, module="none", tokens=(), env={}) for i in range(3)])
    for worker, (ok, busy) in zip(pool.workers, ((True, 2), (False, 0), (True, 1)), strict=True):
        worker.alive = True
        worker.status = WorkerStatus(1, ok, "", 0, 0)
        worker.pending = {i: None for i in range(busy)}  # type: ignore[misc]

    assert {pool.choose().index for _ in range(4)} == {2}
    assert pool.choose(exclude={2}).index == 0
