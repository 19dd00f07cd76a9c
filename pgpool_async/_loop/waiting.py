"""Waiting for a connection: a FIFO queue of waiters, each handed one connection.

Everything here runs on the event loop thread, so a hand-off is atomic: either
the waiter takes the connection (:meth:`Waiter.hand` returns True) or it has
already given up and the caller keeps the connection. A waiter that gives up
after being handed one gets it back from :meth:`Waiter.abandon`, to return it:
a timed-out or cancelled waiter never swallows a connection.

Deadlines are kept in a heap and enforced by one task per pool,
:meth:`WaitQueue.enforce_deadlines`, rather than a cancel scope and timer per
request: in a busy pool most requests wait, and that is the cheaper way. The
queue owns that mechanism whole: a request with an earlier deadline than the
one the task sleeps for wakes it.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import anyio

from .ledger import Slot

__all__ = ["WaitQueue", "Waiter", "current_time"]


def current_time() -> float:
    """``anyio.current_time()``, without its library lookup on asyncio (the
    waiting path calls it once per request)."""
    loop = asyncio._get_running_loop()
    return loop.time() if loop is not None else anyio.current_time()


class Waiter:
    """One request queued for a connection.

    Its signal is a bare future of the running asyncio loop (what a hand-off
    costs is paid once per request, and most requests in a busy pool wait), or
    an anyio event elsewhere (trio)."""

    __slots__ = ("_conn", "_done", "_error", "_signal", "deadline", "in_order", "key", "timeout")

    def __init__(self, key: Hashable | None, deadline: float = math.inf, timeout: float = math.inf) -> None:
        self.key = key
        self.deadline = deadline  # in anyio.current_time()'s clock
        self.timeout = timeout  # as the caller gave it, for the error message
        loop = asyncio._get_running_loop()
        self._signal: asyncio.Future[None] | anyio.Event = (
            asyncio.Future(loop=loop) if loop is not None else anyio.Event()
        )
        self._conn: Slot | None = None
        self._error: BaseException | None = None
        self._done = False
        # Its deadline is no earlier than any before it in the queue (the usual
        # case: one timeout for all), so the queue's order is its deadline's.
        self.in_order = False

    @property
    def done(self) -> bool:
        """True once handed a connection or an error, or abandoned."""
        return self._done

    def _wake(self) -> None:
        signal = self._signal
        if isinstance(signal, asyncio.Future):
            if not signal.done():  # (cancelled along with its task: it is leaving)
                signal.set_result(None)
        else:
            signal.set()

    def hand(self, conn: Slot) -> bool:
        """Give ``conn`` to this waiter; False if it no longer waits."""
        if self._done:
            return False
        self._done = True
        self._conn = conn
        self._wake()
        return True

    def fail(self, error: BaseException) -> bool:
        """Make this waiter raise ``error``; False if it no longer waits."""
        if self._done:
            return False
        self._done = True
        self._error = error
        self._wake()
        return True

    async def wait(self) -> Slot:
        """Wait to be handed a connection, or raise the error handed instead."""
        await self.signalled()
        return self.result()

    def signalled(self) -> Awaitable[Any]:
        """What to await until handed a connection or an error (then call
        :meth:`result`): the bare future on asyncio, so that a busy pool's every
        request awaits no coroutine of ours."""
        signal = self._signal
        return signal if isinstance(signal, asyncio.Future) else signal.wait()

    def result(self) -> Slot:
        """Once signalled: the connection handed, or raise the error handed instead."""
        if self._error is not None:
            raise self._error
        assert self._conn is not None
        return self._conn

    def abandon(self) -> Slot | None:
        """Give up waiting. Returns a connection handed meanwhile: the caller
        must return it to the pool."""
        self._done = True
        conn, self._conn = self._conn, None
        return conn


class WaitQueue:
    """Waiters in arrival order. Abandoned waiters are skipped lazily, so
    leaving the queue costs O(1); ``len()`` counts only live ones.

    Deadlines: a waiter whose deadline is no earlier than every one pushed
    before it (all waiters with the same timeout) is ``in_order``: the queue's
    own order is its deadline order, so it costs no heap entry (and no object
    for the garbage collector to follow while it waits). Only a waiter with an
    earlier deadline than one ahead of it goes into a heap."""

    def __init__(self) -> None:
        self._waiters: deque[Waiter] = deque()
        self._live = 0
        self._deadlines: list[tuple[float, int, Waiter]] = []  # the waiters out of order
        self._last_deadline = -math.inf  # the latest deadline of an in-order waiter
        self._pushed = 0
        self._sleeping_until = math.inf
        self._wake: anyio.Event | None = None

    def __len__(self) -> int:
        return self._live

    def push(self, key: Hashable | None, deadline: float = math.inf, timeout: float = math.inf) -> Waiter:
        """Queue a new waiter at the back."""
        waiter = Waiter(key, deadline, timeout)
        if not self._live:
            self._last_deadline = -math.inf  # (every waiter still queued is done)
        self._waiters.append(waiter)
        self._live += 1
        if deadline != math.inf and deadline >= self._last_deadline:
            waiter.in_order = True
            self._last_deadline = deadline
            if deadline < self._sleeping_until and self._wake is not None:
                self._wake.set()  # (only the first in-order waiter can be earliest)
        elif deadline != math.inf:
            self._pushed += 1
            heap = self._deadlines
            if len(heap) > 2 * self._live + 64:
                # Served waiters stay in the heap until the sweeper meets them:
                # drop them now and then, so the heap (and GC work) stays small.
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
            heapq.heappush(heap, (deadline, self._pushed, waiter))
            if deadline < self._sleeping_until and self._wake is not None:
                self._wake.set()  # the deadline task sleeps until a later one
        return waiter

    def next_deadline(self) -> float:
        """The earliest deadline of a live waiter (``math.inf`` if none)."""
        heap = self._deadlines
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        earliest = heap[0][0] if heap else math.inf
        first = self._first_in_order()
        if first is not None and first.deadline < earliest:
            return first.deadline
        return earliest

    def _first_in_order(self) -> Waiter | None:
        """The live in-order waiter nearest the front (the earliest of them)."""
        for waiter in self._waiters:
            if waiter.in_order and not waiter.done:
                return waiter
        return None

    def expire(self, now: float, error: Callable[[Waiter], BaseException]) -> int:
        """Fail every live waiter whose deadline is past with ``error(waiter)``;
        returns how many."""
        expired = 0
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2]
            if not waiter.done:
                self._live -= 1
                waiter.fail(error(waiter))
                expired += 1
        # In-order waiters: front to back, until one whose deadline is ahead.
        for waiter in self._waiters:  # (failing a waiter leaves it queued: no mutation)
            if waiter.done or not waiter.in_order:
                continue
            if waiter.deadline > now:
                break
            self._live -= 1
            waiter.fail(error(waiter))
            expired += 1
        return expired

    def first(self) -> Waiter | None:
        """The live waiter at the front, or None."""
        while self._waiters:
            waiter = self._waiters[0]
            if not waiter.done:
                return waiter
            self._waiters.popleft()
        return None

    def hand(self, waiter: Waiter, conn: Slot) -> None:
        """Give the front waiter (from :meth:`first`) its connection."""
        self._waiters.popleft()
        self._live -= 1
        waiter.hand(conn)

    def serve(self, waiter: Waiter, conn: Slot | None = None, error: BaseException | None = None) -> bool:
        """Hand ``waiter``, wherever it is in the queue, ``conn`` (or ``error``):
        for a pool whose waiters are served by someone else in their own order
        (an engine's queue). False if it no longer waits (the caller keeps ``conn``)."""
        if waiter.done:
            return False
        self._live -= 1
        if error is not None:
            waiter.fail(error)
        else:
            assert conn is not None
            waiter.hand(conn)
        self.first()  # (drops served waiters from the front)
        return True

    def leave(self, waiter: Waiter) -> Slot | None:
        """A waiter gives up; returns a connection it was handed meanwhile, if any."""
        if not waiter.done:
            self._live -= 1
        return waiter.abandon()

    def fail_all(self, error: BaseException) -> None:
        """Make every live waiter raise ``error`` (the pool is closing)."""
        while (waiter := self.first()) is not None:
            self._waiters.popleft()
            self._live -= 1
            waiter.fail(error)

    async def enforce_deadlines(self, error: Callable[[Waiter], BaseException]) -> None:
        """Run forever (a background task): fail each waiter at its deadline with
        ``error(waiter)``, sleeping until the earliest one."""
        while True:
            now = current_time()
            self.expire(now, error)
            self._sleeping_until = self.next_deadline()
            self._wake = anyio.Event()
            with anyio.move_on_after(self._sleeping_until - now):
                await self._wake.wait()
