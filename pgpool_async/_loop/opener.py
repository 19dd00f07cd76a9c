"""Opening connections: growing for waiters, refilling ``minconn``, backing off.

A mixin of :class:`~pgpool_async.AsyncConnectionPool`. Connections are opened by
background tasks, never by the request that needs one: a waiter is served by
whichever comes first, a returned connection or a new one. Growth is one
connection at a time (as psycopg_pool does), so a burst is mostly served by
connections coming back rather than by a storm of connects; failed connects are
retried with exponential backoff and jitter.
"""

from __future__ import annotations

import random
import time

import anyio
from psycopg2.extensions import connection as PGConnection

from ..errors import PoolClosed
from ..sync import CLOSED_MESSAGE, close_quietly
from ._internals import PoolInternals
from .leaks import logger

__all__ = ["OPEN", "PoolGrowth"]

# Retry delays after a failed connect: doubling, with jitter, capped.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 2.0
# Why a connection is being opened.
OPEN, _GROW, _FILL = "open", "grow", "fill"


class _Attempt:
    """One connect running in a worker thread, which its task may abandon.

    Under the GIL one of the two sides always sees the other: the thread closes
    a connection nobody waits for, or the task gets it.
    """

    __slots__ = ("abandoned", "conn")

    def __init__(self) -> None:
        self.conn: PGConnection | None = None
        self.abandoned = False

    def give_up(self) -> PGConnection | None:
        self.abandoned = True
        return self.conn


class PoolGrowth(PoolInternals):
    """Opening connections in the background (mixin of the pool)."""

    def _grow(self) -> None:
        """Open one more connection in the background while requests wait and
        there is room. One at a time, like psycopg_pool: a burst is mostly
        served by connections coming back, not by a storm of connects."""
        # Connections already being opened (to grow or refill) will serve the queue.
        if self._growing or self._filling or self.closed or not len(self._waiting):
            return
        if self._engine.size >= self.maxconn or not self._engine._reserve():
            return
        self._growing += 1
        self._tasks.spawn(self._grow_task)

    async def _grow_task(self) -> None:
        try:
            await self._open_idle_connection(_GROW)
        finally:
            self._growing -= 1
            if not self.closed and len(self._waiting):
                self._grow()

    def _ensure_min(self) -> None:
        """Refill ``minconn`` in the background, never in a caller's request."""
        if self.closed or not self._opened:
            return
        while self._engine.size < self.minconn and self._engine._reserve():
            self._filling += 1
            self._tasks.spawn(self._fill_task)

    async def _fill_task(self) -> None:
        try:
            await self._open_idle_connection(_FILL)
        finally:
            self._filling -= 1
            if not self.closed and len(self._waiting):
                self._grow()

    async def _open_idle_connection(self, purpose: str, limiter: anyio.CapacityLimiter | None = None) -> None:
        if limiter is None:
            await self._open_idle_connection_now(purpose)
        else:
            async with limiter:
                await self._open_idle_connection_now(purpose)

    async def _open_idle_connection_now(self, purpose: str) -> None:
        """Open a connection in the slot already reserved, retrying with backoff
        and jitter, and put it idle (then to the waiters). ``_GROW`` gives up
        when nobody waits any more; ``_FILL`` after ``reconnect_timeout``."""
        delay = _BACKOFF_FIRST
        first_failure: float | None = None
        attempt = _Attempt()
        try:
            while True:
                attempt = _Attempt()
                started = time.monotonic()
                self._stats.connections_num += 1
                try:
                    raw = await self._offload.run_abandoning(self._connect_thread, attempt)
                except Exception as exc:
                    self._stats.connections_errors += 1
                    self._last_error = exc
                    logger.warning("pool %r: connection to %s failed: %s", self.name, self._target, exc)
                else:
                    self._stats.connections_ms += int((time.monotonic() - started) * 1000)
                    self._last_error = None
                    self._info[id(raw)] = self._health.new_info(self._generation)
                    if self._engine._adopt_idle(raw):
                        self._info[id(raw)].idle_since = time.monotonic()
                        self._dispatch()
                    else:
                        self._forget_info(raw)
                        await self._offload.run_return(close_quietly, raw)
                    return
                now = time.monotonic()
                first_failure = first_failure or now
                if self.closed or (purpose == _GROW and not len(self._waiting)):
                    break
                if purpose == _FILL and now - first_failure >= self.reconnect_timeout:
                    self._give_up_reconnecting()
                    break
                await anyio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, _BACKOFF_MAX)
        except BaseException:
            orphan = attempt.give_up()
            if orphan is not None:
                with anyio.CancelScope(shield=True):
                    await self._offload.run_return(close_quietly, orphan)
            raise
        finally:
            if attempt.conn is None or attempt.abandoned:
                self._engine._release_slot()

    def _give_up_reconnecting(self) -> None:
        logger.error(
            "pool %r: could not reconnect to %s for %.1f s (reconnect_timeout); will retry later",
            self.name,
            self._target,
            self.reconnect_timeout,
        )
        if self._reconnect_failed is not None:
            try:
                self._reconnect_failed(self)
            except Exception:
                logger.exception("pool %r: the reconnect_failed callback raised", self.name)

    def _connect_thread(self, attempt: _Attempt) -> PGConnection:
        """In a worker thread: open and set up one connection."""
        raw = self._engine._open_connection()
        try:
            self._health.set_up(raw, self.autocommit)
        except BaseException:
            close_quietly(raw)
            raise
        attempt.conn = raw
        if attempt.abandoned or self.closed:
            attempt.conn = None
            close_quietly(raw)
            raise PoolClosed(CLOSED_MESSAGE)
        return raw
