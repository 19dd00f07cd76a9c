"""The wait queue (:mod:`pgpool_async._loop.waiting`), with no server: deadlines in
order, waiters with one timeout kept out of the heap, a hand-off left behind."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

from pgpool_async._loop.ledger import Ledger, Slot
from pgpool_async._loop.waiting import WaitQueue
from pgpool_async.errors import PoolTimeout

pytestmark = pytest.mark.single_io("the wait queue alone: no statements on a pool")


@pytest.mark.anyio
async def test_wait_queue_enforces_deadlines_in_order() -> None:
    queue = WaitQueue()
    now = anyio.current_time()
    late = queue.push(None, now + 0.2, 0.2)
    early = queue.push(None, now + 0.05, 0.05)
    failed: list[float] = []

    def error(waiter: Any) -> BaseException:
        failed.append(waiter.timeout)
        return PoolTimeout(f"after {waiter.timeout}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.enforce_deadlines, error)
        with pytest.raises(PoolTimeout, match=r"0\.05"):
            await early.wait()
        with pytest.raises(PoolTimeout, match=r"0\.2"):
            await late.wait()
        # A new, earlier deadline wakes the task sleeping for nothing.
        sooner = queue.push(None, anyio.current_time() + 0.01, 0.01)
        with anyio.fail_after(2), pytest.raises(PoolTimeout):
            await sooner.wait()
        tg.cancel_scope.cancel()
    assert failed == [0.05, 0.2, 0.01] and len(queue) == 0


def test_wait_queue_keeps_same_timeout_waiters_out_of_the_heap() -> None:
    """Waiters with one timeout are in deadline order already: no heap entry each
    (a busy pool's every request); an earlier deadline behind a later one uses the
    heap; both expire exactly at their deadlines, abandoned ones skipped."""
    queue = WaitQueue()
    now = 1000.0
    waiters = [queue.push(None, now + 0.02 * (i + 1), 0.1) for i in range(5)]
    assert all(w.in_order for w in waiters) and queue._deadlines == []
    shorter = queue.push(None, now + 0.01, 0.01)
    assert not shorter.in_order and len(queue._deadlines) == 1
    assert queue.next_deadline() == now + 0.01
    queue.leave(waiters[0])  # abandoned: never failed, never counted
    assert queue.expire(now + 0.005, lambda w: PoolTimeout("early")) == 0
    assert queue.expire(now + 0.045, lambda w: PoolTimeout("x")) == 2
    assert shorter.done and waiters[1].done and not waiters[2].done and len(queue) == 3
    assert queue.next_deadline() == now + 0.06
    with pytest.raises(PoolTimeout):
        waiters[1].result()
    assert queue.expire(now + 1.0, lambda w: PoolTimeout("x")) == 3
    assert len(queue) == 0 and queue.next_deadline() == math.inf
    # An emptied queue starts a new order: an earlier deadline is in order again.
    assert queue.push(None, now + 0.001, 0.001).in_order


def test_wait_queue_leaving_after_a_hand_off_returns_the_connection() -> None:
    queue = WaitQueue()
    ledger = Ledger(0, 1, queue)
    s = Slot(object(), ledger.generation, math.inf)  # type: ignore[arg-type]
    waiter = queue.push(None)
    queue.hand(waiter, s)
    assert queue.leave(waiter) is s  # the caller must give it back
    assert len(queue) == 0 and queue.first() is None
