"""Opening connections in the background, backing off after every kind of failure.

New connections are opened by background tasks, never by the request that needs
one: the :class:`~.ledger.Ledger` decides how many (for ``minconn``, and one at
a time while requests wait), :class:`Opener` opens them in worker threads and
hands each to the ledger. A connect (and its ``configure`` hook) runs in a copy
of the context of the task that asked for it (``open()``, a checkout): tracing
spans made there join that task's trace.

No failure mode reconnects back to back. A failed connect is retried by the
same task after a delay that doubles with jitter (several tasks retrying on
their own schedules find a server that is back within a fraction of a second).
A connection discarded because its ``check``, ``configure`` or ``reset`` hook
failed feeds the pool-wide :class:`Backoff`, which every task waits out before
its next attempt: a hook that always fails opens a handful of connections a
second, not hundreds. A connection that passes its check resets it.

An outage is logged once at WARNING when it starts and once when it ends, with
one DEBUG line per attempt in between.
"""

from __future__ import annotations

import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
from psycopg2.extensions import connection as PGConnection

from .._thread.blocking import close_quietly
from .._thread.blocking import connect as blocking_connect
from .._thread.offload import Offloader
from ..errors import PoolClosed, is_permanent_connect_error
from .health import Health, HookFailed, HookLog
from .ledger import Ledger, Plan, Slot
from .stats import PoolStats

__all__ = ["Backoff", "Opener"]

logger = logging.getLogger("pgpool_async")

# At most this many connects at once (each takes a worker thread), like psycopg_pool's workers.
_CONNECTS_AT_ONCE = 4


class Backoff:
    """Delays between attempts after failures: doubling, with jitter, never
    above ``cap`` (so a server back after an outage or a promotion is found
    within about ``cap`` seconds)."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0

    def delay(self) -> float:
        """Seconds to wait before the next attempt (0 with no recent failure)."""
        if not self.failures:
            return 0.0
        delay: float = min(self.first * 2 ** (self.failures - 1), self.cap)
        return delay * random.uniform(0.5, 1.0)


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


class Opener:
    """Opens the connections the ledger asks for; see the module docstring.

    ``apply(plan)`` carries out a ledger decision (the pool's, held weakly by
    the pool so that a running opener never keeps a dropped pool alive);
    ``usable`` is the liveness test the ledger uses when handing out.
    """

    def __init__(
        self,
        *,
        name: str,
        target: str,
        connect_args: tuple[tuple[Any, ...], dict[str, Any]],
        autocommit: bool,
        ledger: Ledger,
        offload: Offloader,
        health: Health,
        stats: PoolStats,
        hook_log: HookLog,
        waiting: Any,
        apply: Callable[[Plan], None],
        usable: Callable[[Slot], bool],
        reconnect_timeout: float,
        reconnect_failed: Callable[[], Any],
        connected: Callable[[float], None] | None = None,
    ) -> None:
        self._name = name
        self._target = target
        self._args, self._kwargs = connect_args
        self._autocommit = autocommit
        self._ledger = ledger
        self._offload = offload
        self._health = health
        self._stats = stats
        self._connected = connected  # told each connect's seconds (the pool's metrics)
        self._hook_log = hook_log
        self._waiting = waiting
        self._apply = apply
        self._usable = usable
        self.reconnect_timeout = reconnect_timeout
        self._reconnect_failed = reconnect_failed
        self.backoff = Backoff()
        self.last_error: BaseException | None = None
        self.permanent_error: BaseException | None = None
        self._outage_since: float | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._progress: anyio.Event | None = None

    async def progress(self) -> None:
        """Wait until a connection is opened or an attempt fails."""
        if self._progress is None:
            self._progress = anyio.Event()
        await self._progress.wait()

    def _signal(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _wanted(self) -> bool:
        """Whether the slot being opened is still needed."""
        ledger = self._ledger
        return not ledger.closing and (len(self._waiting) > 0 or ledger.size <= ledger.minconn)

    async def open_one(self) -> None:
        """Open one connection into a slot the ledger reserved, retrying with the
        backoff while it is wanted; give the slot back if it no longer is, or
        after ``reconnect_timeout`` of failures (then ``reconnect_failed``)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(_CONNECTS_AT_ONCE)
        opened = False
        first_failure: float | None = None
        retry = Backoff(cap=1.0)  # this task's own, for connect errors: probes at least once a second
        try:
            while self._wanted():
                delay = max(self.backoff.delay(), retry.delay())
                if delay:
                    await anyio.sleep(delay)
                    if not self._wanted():
                        break
                async with self._limiter:
                    raw = await self._attempt(retry)
                if raw is not None:
                    opened = True
                    self._apply(
                        self._ledger.opened(
                            Slot(raw, self._ledger.generation, self._health.expires_at()), self._usable
                        )
                    )
                    return
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure >= self.reconnect_timeout:
                    await self._give_up_reconnecting()
                    break
        finally:
            if not opened:
                self._ledger.open_failed()
            self._signal()

    async def _attempt(self, retry: Backoff) -> PGConnection | None:
        """One connect in a worker thread; the connection, or None after a failure."""
        attempt = _Attempt()
        started = time.monotonic()
        self._stats.connections_num += 1
        try:
            raw = await self._offload.run_abandoning(self._connect_in_thread, attempt)
        except HookFailed as exc:
            self._stats.connections_errors += 1
            self.last_error = exc.__cause__ or exc
            self._hook_log.failed(exc.hook, exc.__cause__ or exc)
            self.backoff.failed()
            return None
        except Exception as exc:
            self._stats.connections_errors += 1
            retry.failed()
            self._failed(exc)
            return None
        except BaseException:
            orphan = attempt.give_up()
            if orphan is not None:  # finished as we gave up: close it off the loop
                # (in this task's context, like every call the pool hands to a thread)
                threading.Thread(
                    target=contextvars.copy_context().run, args=(close_quietly, orphan), daemon=True
                ).start()
            raise
        took = time.monotonic() - started
        self._stats.connections_ms += int(took * 1000)
        if self._connected is not None:
            self._connected(took)
        if self._outage_since is not None:
            logger.warning(
                "pool %r: connected to %s again after %.1f s of failures",
                self._name,
                self._target,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        self.last_error = None
        if self._health.check is None:
            self.backoff.succeeded()
        return raw

    def _failed(self, exc: BaseException) -> None:
        self.last_error = exc
        if is_permanent_connect_error(exc):
            self.permanent_error = exc
            self._signal()  # open() fails at once on it
        message = str(exc).strip().replace("\n", " ")
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "pool %r: cannot connect to %s (%s); %s",
                self._name,
                self._target,
                message,
                "open() fails on it: retrying would not help"
                if self.permanent_error is exc
                else "retrying in the background with backoff",
            )
        else:
            logger.debug("pool %r: connect to %s failed again: %s", self._name, self._target, message)

    def _connect_in_thread(self, attempt: _Attempt) -> PGConnection:
        """In a worker thread: open and set up one connection."""
        raw: PGConnection = blocking_connect(self._args, self._kwargs)
        try:
            self._health.set_up_in_thread(raw, self._autocommit)
        except BaseException:
            close_quietly(raw)
            raise
        attempt.conn = raw
        if attempt.abandoned or self._ledger.closing:
            attempt.conn = None
            close_quietly(raw)
            raise PoolClosed(f"pool {self._name!r} is closed")
        return raw

    async def _give_up_reconnecting(self) -> None:
        logger.error(
            "pool %r: could not reconnect to %s for %.1f s (reconnect_timeout); will retry later",
            self._name,
            self._target,
            self.reconnect_timeout,
        )
        try:
            result = self._reconnect_failed()
            if hasattr(result, "__await__"):
                await result
        except Exception as exc:
            self._hook_log.failed("reconnect_failed", exc)
