"""Drivers: run one operation from many asyncio tasks or OS threads and time it.

An operation is a callable that checks a connection out, maybe runs a query,
returns the connection, and returns the :func:`time.perf_counter` instant it got
the connection (or None when the API does not show it, like ``pool.fetchval``).

Two shapes of load:

- closed loop (:func:`drive_async`, :func:`drive_threads`): ``concurrency``
  workers repeat the operation for ``warmup + duration`` seconds; only the
  operations that *complete* inside the measured window are counted;
- burst (:func:`burst_async`, :func:`burst_threads`): ``n`` operations start at
  once, each runs once; the makespan is the time until the last one ends.

In both, a 1 ms :class:`Ticker` runs on the event loop and records the longest
gap between its wake-ups: how long the loop was stalled (GIL, blocking calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter

__all__ = [
    "AsyncOp",
    "Burst",
    "Samples",
    "SyncOp",
    "Ticker",
    "Window",
    "burst_async",
    "burst_threads",
    "drive_async",
    "drive_threads",
    "percentile",
]

AsyncOp = Callable[[], Awaitable[float | None]]
SyncOp = Callable[[], float | None]

TICK = 0.001
_ERROR_PAUSE = 0.001


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Window:
    """The measured time span, in :func:`time.perf_counter` seconds."""

    start: float
    end: float

    @classmethod
    def after(cls, warmup: float, duration: float) -> Window:
        """A window opening ``warmup`` seconds from now and lasting ``duration``."""
        start = perf_counter() + warmup
        return cls(start, start + duration)

    def __contains__(self, instant: float) -> bool:
        return self.start <= instant < self.end


@dataclass
class Samples:
    """What a closed-loop run measured: latencies, waits for a connection, errors."""

    duration: float
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    max_gap: float = 0.0

    window: Window | None = None
    censored: list[float] = field(default_factory=list)

    def add(self, started: float, acquired: float | None, ended: float) -> None:
        """Record one operation, if it ended in the window or was running at its end.

        One still running when the window closed counts with its age then, as
        a latency and as a wait (a lower bound): so starved requests show up in
        the percentiles instead of vanishing from them. It is not counted in ops/s.
        """
        window = self.window
        if window is None or ended in window:
            self.latencies.append(ended - started)
            if acquired is not None:
                self.waits.append(acquired - started)
        elif started < window.end <= ended:
            self.censored.append(window.end - started)
            self.latencies.append(window.end - started)
            self.waits.append(
                (acquired if acquired is not None and acquired < window.end else window.end) - started
            )

    def fail(self, exc: BaseException) -> None:
        """Count a failed operation, keeping the first error's text."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"

    @property
    def unfinished(self) -> int:
        """Operations still running when the window closed."""
        return len(self.censored)

    @property
    def ops(self) -> int:
        """Operations completed inside the window."""
        return len(self.latencies) - self.unfinished

    @property
    def ops_per_sec(self) -> float:
        """Operations completed per second of window."""
        return self.ops / self.duration if self.duration > 0 else float("nan")


@dataclass
class Burst:
    """What a burst measured: each operation's latency and the makespan."""

    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    makespan: float = 0.0
    errors: int = 0
    first_error: str | None = None
    max_gap: float = 0.0

    def fail(self, exc: BaseException) -> None:
        """Count a failed operation, keeping the first error's text."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"


class Ticker:
    """A task waking every millisecond; ``max_gap`` is the longest time, in seconds,
    between two of its wake-ups, among the gaps that overlap ``window`` (1 ms is
    the floor: the sleep itself). A task that never yields starves the ticker: the
    gap closed by :meth:`observe` when the ticker stops still counts it."""

    def __init__(self, window: Window | None = None) -> None:
        self.window = window
        self.max_gap = 0.0
        self._last = perf_counter()

    def observe(self, now: float) -> None:
        """Close the gap that started at the previous wake-up."""
        overlaps = self.window is None or (now >= self.window.start and self._last < self.window.end)
        if overlaps and now - self._last > self.max_gap:
            self.max_gap = now - self._last
        self._last = now

    async def run(self) -> None:
        """Tick until cancelled."""
        self._last = perf_counter()
        while True:
            await asyncio.sleep(TICK)
            self.observe(perf_counter())


@contextlib.asynccontextmanager
async def ticking(window: Window | None = None) -> AsyncIterator[Ticker]:
    """Run a :class:`Ticker` for the duration of the block."""
    ticker = Ticker(window)
    task = asyncio.create_task(ticker.run())
    try:
        yield ticker
    finally:
        ticker.observe(perf_counter())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def drive_async(op: AsyncOp, concurrency: int, warmup: float, duration: float) -> Samples:
    """Run ``op`` in a closed loop from ``concurrency`` asyncio tasks."""
    window = Window.after(warmup, duration)
    samples = Samples(duration, window=window)

    async def worker() -> None:
        while (started := perf_counter()) < window.end:
            try:
                acquired = await op()
            except Exception as exc:
                samples.fail(exc)
                await asyncio.sleep(_ERROR_PAUSE)
                continue
            samples.add(started, acquired, perf_counter())

    async with ticking(window) as ticker:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.max_gap = ticker.max_gap
    return samples


async def drive_threads(op: SyncOp, concurrency: int, warmup: float, duration: float) -> Samples:
    """Run ``op`` in a closed loop from ``concurrency`` OS threads, the ticker on the loop."""
    window = Window.after(warmup, duration)
    samples = Samples(duration, window=window)

    def worker() -> None:
        while (started := perf_counter()) < window.end:
            try:
                acquired = op()
            except Exception as exc:
                samples.fail(exc)
                threading.Event().wait(_ERROR_PAUSE)
                continue
            samples.add(started, acquired, perf_counter())  # list.append: atomic under the GIL

    threads = [threading.Thread(target=worker, name=f"bench-{i}", daemon=True) for i in range(concurrency)]
    async with ticking(window) as ticker:
        for thread in threads:
            thread.start()
        await asyncio.sleep(max(0.0, window.end - perf_counter()))
        await asyncio.to_thread(_join_all, threads)
    samples.max_gap = ticker.max_gap
    return samples


def _join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


async def burst_async(op: AsyncOp, n: int) -> Burst:
    """Start ``n`` operations at once from asyncio tasks; each runs once."""
    burst = Burst()

    async def one() -> None:
        started = perf_counter()
        try:
            acquired = await op()
        except Exception as exc:
            burst.fail(exc)
            return
        burst.latencies.append(perf_counter() - started)
        if acquired is not None:
            burst.waits.append(acquired - started)

    async with ticking() as ticker:
        started = perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        burst.makespan = perf_counter() - started
    burst.max_gap = ticker.max_gap
    return burst


async def burst_threads(op: SyncOp, n: int) -> Burst:
    """Start ``n`` operations at once from OS threads (released by a barrier)."""
    burst = Burst()
    barrier = threading.Barrier(n + 1)

    def one() -> None:
        barrier.wait()
        started = perf_counter()
        try:
            acquired = op()
        except Exception as exc:
            burst.fail(exc)
            return
        burst.latencies.append(perf_counter() - started)
        if acquired is not None:
            burst.waits.append(acquired - started)

    threads = [threading.Thread(target=one, name=f"burst-{i}", daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    async with ticking() as ticker:
        started = perf_counter()
        await asyncio.to_thread(barrier.wait)
        await asyncio.to_thread(_join_all, threads)
        burst.makespan = perf_counter() - started
    burst.max_gap = ticker.max_gap
    return burst
