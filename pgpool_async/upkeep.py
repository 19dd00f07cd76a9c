"""Upkeep: waiters' deadlines, lifetimes and idle limits, leaks.

A mixin of :class:`~pgpool_async.AsyncConnectionPool`, run by two background
tasks: one enforces the deadlines of queued requests (one task for all, rather
than a timer per request), the other retires connections past ``max_lifetime``
or idle past ``max_idle``, refills ``minconn``, reports leaks and recovers the
slots of connections garbage-collected while lent.
"""

from __future__ import annotations

import time
import traceback
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from psycopg2.extensions import connection as PGConnection

from ._internals import PoolInternals
from ._loop import native
from .errors import PoolTimeout
from .leaks import describe, logger

if TYPE_CHECKING:
    from .connection import AsyncConnection
    from .waiting import Waiter

__all__ = ["PoolUpkeep"]


class PoolUpkeep(PoolInternals):
    """Deadlines, lifetimes, idle limits and leaks (mixin of the pool)."""

    async def _expire_waiters(self) -> None:
        """The one task that enforces waiters' deadlines: it sleeps until the
        earliest one, or until a request with an earlier deadline arrives."""
        while not self.closed:
            now = anyio.current_time()
            self._stats.requests_errors += self._waiting.expire(now, self._timeout_error)
            self._sweep_target = self._waiting.next_deadline()
            self._sweep_wake = anyio.Event()
            with anyio.move_on_after(self._sweep_target - now):
                await self._sweep_wake.wait()

    def _timeout_error(self, waiter: Waiter) -> PoolTimeout:
        error = PoolTimeout(
            f"couldn't get a connection after {waiter.timeout:.2f} sec "
            f"(pool {self.name!r}: {self._engine.used_count} in use, max {self.maxconn})"
        )
        error.__cause__ = self._last_error
        return error

    async def _maintain(self) -> None:
        """Upkeep, every ``_maintenance_interval`` seconds: retire connections
        past their lifetime or idle too long, refill ``minconn``, report leaks."""
        while not self.closed:
            await anyio.sleep(self._maintenance_interval())
            await self._recover_orphans()
            self._report_leaks()
            await self._close_evicted(self._engine._evict_idle(self._retired, keep=0))
            if self._health.max_idle is not None:
                idle = self._engine._evict_idle(self._idle_too_long, keep=self.minconn)
                await self._close_evicted(idle)
            self._ensure_min()

    def _idle_too_long(self, raw: PGConnection) -> bool:
        info = self._info.get(id(raw))
        max_idle = self._health.max_idle
        if info is None or info.idle_since is None or max_idle is None:
            return False
        return time.monotonic() - info.idle_since >= max_idle

    def _maintenance_interval(self) -> float:
        periods = [1.0]
        for value in (self._health.max_idle, self._health.max_lifetime, self.leak_threshold):
            if value is not None:
                periods.append(value / 4)
        return max(0.02, min(periods))

    def _make_orphan_hook(
        self, raw: PGConnection, site: traceback.StackSummary | None
    ) -> Callable[[weakref.ref[AsyncConnection]], None]:
        def orphaned(ref: weakref.ref[AsyncConnection]) -> None:
            # May run in any thread, at any time: only record it here.
            if self._lent.get(id(raw)) is ref:
                self._orphans.append((raw, site))

        return orphaned

    async def _recover_orphans(self) -> None:
        while self._orphans:
            raw, site = self._orphans.pop()
            self._lent.pop(id(raw), None)
            self._stats.connections_leaked += 1
            logger.warning(
                "pool %r: a connection was garbage-collected without being returned; "
                "its slot is recovered. It was taken at %s",
                self.name,
                describe(site),
            )
            native.release(raw)  # its loop-native runner, if any, went with it
            await self._return_raw(raw)

    def _report_leaks(self) -> None:
        if self.leak_threshold is None:
            return
        now = time.monotonic()
        for ref in list(self._lent.values()):
            conn = ref()
            if conn is None or conn.leak_reported or now - conn.lent_at < self.leak_threshold:
                continue
            conn.leak_reported = True
            self._stats.connections_leaked += 1
            logger.warning(
                "pool %r: a connection has been lent for %.1f s (leak_threshold=%s) and not "
                "returned. It was taken at %s",
                self.name,
                now - conn.lent_at,
                self.leak_threshold,
                describe(conn.taken_at),
            )
