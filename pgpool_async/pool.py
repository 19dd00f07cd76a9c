"""The async pool: psycopg2's ThreadedConnectionPool behind an anyio facade.

Who does what:

- the engine (:class:`~pgpool_async.engine.ThreadedConnectionPool`) keeps the
  books; its state methods do no I/O and are only called on the event loop, so
  its lock is never contended by a thread doing I/O;
- :mod:`~pgpool_async.waiting` queues requests when no connection is idle;
- :mod:`~pgpool_async.offload` runs every connect, query, rollback and close in
  the pool's own worker threads;
- :mod:`~pgpool_async.background` hosts the pool's tasks: those of
  :mod:`~pgpool_async.growth` open connections for waiters and refill
  ``minconn`` (a waiter is served by whichever comes first, a returned
  connection or a new one), those of :mod:`~pgpool_async.upkeep` enforce
  deadlines and lifetimes and report leaks.
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import psycopg2
import psycopg2.extensions
from psycopg2.extensions import connection as PGConnection

from ._loop.native import preload as native_preload
from .background import BackgroundTasks
from .connection import (
    AsyncConnection,
    Params,
    _all_rows,
    _first_row,
    _first_value,
    _rowcount,
    execute_sync,
    fetchall_sync,
    fetchone_sync,
    fetchval_sync,
    run_and_commit,
)
from .engine import (
    CLOSED_MESSAGE,
    ThreadedConnectionPool,
    check_connect_args,
    check_sizes,
    close_quietly,
    is_usable,
    reset_for_reuse,
)
from .errors import (
    PoolClosed,
    PoolConfigError,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)
from .growth import OPEN, PoolGrowth
from .health import ConnInfo, Health
from .leaks import call_site, logger
from .notifications import forget_listens
from .offload import Offloader
from .stats import PoolStats
from .upkeep import PoolUpkeep
from .waiting import WaitQueue

__all__ = ["AsyncConnectionPool"]

T = TypeVar("T")
_names = itertools.count(1)
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_OPENING_AT_ONCE = 4


def _check_timeout(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PoolConfigError(f"{name} must be a number of seconds, got {value!r}")
    if value <= 0:
        raise PoolConfigError(f"{name} must be > 0 seconds (use math.inf to wait forever), got {value}")
    return float(value)


def _check_io(io: str) -> str:
    if io not in ("auto", "loop", "thread"):
        raise PoolConfigError(f'io must be "auto", "loop" or "thread", got {io!r}')
    return io


def _with_connect_timeout(kwargs: dict[str, Any], params: dict[str, str], timeout: float) -> dict[str, Any]:
    """libpq waits forever for an unresponsive server: bound each connect attempt
    by the pool timeout unless the user set ``connect_timeout`` themselves."""
    if "connect_timeout" in params:
        return kwargs
    seconds = 2 if math.isinf(timeout) else max(2, math.ceil(timeout))
    return {**kwargs, "connect_timeout": seconds}


def _describe_target(params: dict[str, str]) -> str:
    """``dbname@host:port`` for messages: never the password."""
    host = params.get("host", "")
    port = params.get("port", "")
    return f"{params.get('dbname', '')}@{host}{':' if port else ''}{port}"


class _NoEvent:
    """Stands in for the sweeper's event before ``open()`` (no loop yet)."""

    def set(self) -> None:
        return None


class _ConnectionContext:
    """``async with pool.connection() as conn``: commit on success, rollback on error."""

    __slots__ = ("_conn", "_key", "_pool", "_timeout")

    def __init__(self, pool: AsyncConnectionPool, key: Hashable | None, timeout: float | None):
        self._pool = pool
        self._key = key
        self._timeout = timeout
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        self._conn = await self._pool.getconn(self._key, timeout=self._timeout)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        if conn.released:  # the body returned it itself
            return
        try:
            if exc_type is None:
                await conn._idle()
                raw = conn.raw
                if not raw.closed and raw.get_transaction_status() != _STATUS_IDLE:
                    await conn.commit()
        finally:
            # On error, cancellation or a failed commit, putconn rolls back.
            await self._pool.putconn(conn)


class AsyncConnectionPool(PoolGrowth, PoolUpkeep):
    """An asyncio/trio connection pool over psycopg2, that never blocks the event loop.

    ``AsyncConnectionPool(minconn, maxconn, *args, **kwargs)``: ``args`` and
    ``kwargs`` go to ``psycopg2.connect`` (a DSN, libpq keywords,
    ``connection_factory``, ``cursor_factory``). Pool options, keyword only:

    - ``timeout``: seconds a request waits for a connection, and ``open()`` for
      ``minconn`` connections, before :class:`PoolTimeout` (default 30). Unless
      given, libpq's ``connect_timeout`` is set to it too (at least 2 s).
    - ``max_waiting``: requests allowed to queue; one more gets
      :class:`TooManyRequests` at once (0: no limit).
    - ``name``: shown in ``repr``, log lines and thread names.
    - ``autocommit``: hand out connections in autocommit mode.
    - ``io``: how statements run. ``"thread"`` (default for now): in the pool's
      worker threads. ``"auto"``: ``execute``/``fetch*``/``commit``/``rollback``
      and the one-hop helpers run on the event loop through libpq itself
      (:mod:`pgpool_async._loop.native`) where possible, threads otherwise (other
      platforms, a ``cursor_factory``, cursors, COPY, ``run_sync``).
      ``"loop"``: the same, but ``open()`` raises :class:`PoolConfigError` if
      the loop path is not available in this process.
    - ``check``: check a connection idle for ``check_idle`` seconds (default 1)
      before lending it, in a worker thread: ``True`` for a ``SELECT 1`` round
      trip, or a callable ``check(raw_connection)`` that raises if it is unfit.
      A failed connection is discarded and the next one tried. Without
      ``check``, idle connections are still screened without a round trip
      (closed, or the server hung up).
    - ``configure(raw_connection)``: run on each new connection (committed);
      ``reset(raw_connection)``: run on each return, after the rollback. A
      connection that fails either is discarded, never lent.
    - ``max_lifetime`` (default 1 h, up to 10% less at random) and ``max_idle``
      (default 10 min, above ``minconn``): connections older, or idle longer,
      are replaced in the background. ``None`` disables either.
    - ``reconnect_timeout`` (default 5 min): after that long failing to refill
      ``minconn``, call ``reconnect_failed(pool)`` and keep trying later.
    - ``leak_threshold``: seconds after which a connection not returned is
      reported (logger ``pgpool_async``) with where it was taken.

    Creating the pool does no I/O; ``await pool.open()`` or ``async with pool``
    opens ``minconn`` connections. Bad options raise :class:`PoolConfigError` here.
    """

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        *args: Any,
        timeout: float = 30.0,
        max_waiting: int = 0,
        name: str | None = None,
        autocommit: bool = False,
        io: str = "thread",
        check: bool | Callable[[PGConnection], Any] | None = None,
        check_idle: float = 1.0,
        configure: Callable[[PGConnection], Any] | None = None,
        reset: Callable[[PGConnection], Any] | None = None,
        max_lifetime: float | None = 3600.0,
        max_idle: float | None = 600.0,
        reconnect_timeout: float = 300.0,
        reconnect_failed: Callable[[AsyncConnectionPool], Any] | None = None,
        leak_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_sizes(minconn, maxconn)
        params = check_connect_args(args, kwargs)
        self.timeout = _check_timeout("timeout", timeout)
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise PoolConfigError(f"max_waiting must be an int >= 0 (0: no limit), got {max_waiting!r}")
        self.max_waiting = max_waiting
        self.name = name if name is not None else f"pool-{next(_names)}"
        self.autocommit = bool(autocommit)
        self.io = _check_io(io)
        self._health = Health.build(check, check_idle, configure, reset, max_lifetime, max_idle)
        self.reconnect_timeout = _check_timeout("reconnect_timeout", reconnect_timeout)
        if reconnect_failed is not None and not callable(reconnect_failed):
            raise PoolConfigError(
                f"reconnect_failed must be a callable taking the pool, got {reconnect_failed!r}"
            )
        self._reconnect_failed = reconnect_failed
        self.leak_threshold = (
            None if leak_threshold is None else _check_timeout("leak_threshold", leak_threshold)
        )
        self._engine: ThreadedConnectionPool = ThreadedConnectionPool.unopened(
            minconn, maxconn, *args, **_with_connect_timeout(kwargs, params, self.timeout)
        )
        self._target = _describe_target(params)
        self._offload = Offloader(maxconn, self.name)
        self._tasks = BackgroundTasks(self.name)
        self._waiting = WaitQueue()
        self._lent: dict[int, weakref.ref[AsyncConnection]] = {}
        self._info: dict[int, ConnInfo] = {}
        self._orphans: list[tuple[PGConnection, traceback.StackSummary | None]] = []
        self._generation = 0
        self._growing = 0
        self._filling = 0
        self._opened = False
        self._closing = False
        self._all_returned: anyio.Event | None = None
        self._last_error: BaseException | None = None
        self._stats = PoolStats()
        self._sweep_target = math.inf
        self._sweep_wake: anyio.Event | Any = _NoEvent()

    # -- properties ---------------------------------------------------------

    @property
    def minconn(self) -> int:
        """Connections kept open."""
        return self._engine.minconn

    @property
    def maxconn(self) -> int:
        """At most this many connections, open or opening."""
        return self._engine.maxconn

    @property
    def closed(self) -> bool:
        """True once closing has started (or before ``open()``, False)."""
        return self._closing or self._engine.closed

    # -- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        """Open ``minconn`` connections, in worker threads, and start serving.

        Retries failed connects with backoff until ``timeout``.

        :raises PoolTimeout: ``minconn`` connections could not be opened within
            ``timeout``; its ``__cause__`` is the last connect error. The pool is
            closed then.
        :raises PoolClosed: the pool was closed; pools cannot be reopened.
        """
        if self.closed:
            raise PoolClosed(f"{CLOSED_MESSAGE}: pools cannot be reopened, create a new one")
        if self._opened:
            return
        if self.io != "thread":
            # Finding psycopg2's libpq reads /proc/self/maps: in a thread, once.
            reason = await self._offload.run_anyio(native_preload)
            if reason is not None and self.io == "loop":
                raise PoolConfigError(
                    f'io="loop" is not available here ({reason}): use io="auto" or "thread"'
                )
        self._opened = True
        await self._tasks.start()
        self._sweep_wake = anyio.Event()
        self._tasks.spawn(self._expire_waiters)
        # A few connects at a time, like psycopg_pool's workers: each takes a thread.
        opening = anyio.CapacityLimiter(_OPENING_AT_ONCE)
        try:
            with anyio.fail_after(self.timeout):
                async with anyio.create_task_group() as group:
                    for _ in range(self.minconn):
                        if self._engine._reserve():
                            group.start_soon(self._open_idle_connection, OPEN, opening)
        except TimeoutError:
            await self.close()
            raise PoolTimeout(
                f"pool {self.name!r} couldn't open {self.minconn} connection(s) to "
                f"{self._target} within {self.timeout:.2f} sec"
            ) from self._last_error
        except BaseException:
            await self.close()
            raise
        self._tasks.spawn(self._maintain)

    async def __aenter__(self) -> AsyncConnectionPool:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiting requests get :class:`PoolClosed`, lent
        connections get up to ``timeout`` seconds to come back, then every
        connection is closed. Safe to call twice.
        """
        _check_timeout("close timeout", timeout)
        if self._engine.closed:
            return
        self._closing = True
        self._waiting.fail_all(PoolClosed(CLOSED_MESSAGE))
        if self._engine.used_count:
            self._all_returned = anyio.Event()
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await self._all_returned.wait()
        await self._close_everything()

    async def closeall(self) -> None:
        """Close every connection now, those lent out included, and close the pool.

        :raises PoolClosed: the pool was already closed (psycopg2's behaviour).
        """
        if self._engine.closed:
            raise PoolClosed(CLOSED_MESSAGE)
        self._closing = True
        self._waiting.fail_all(PoolClosed(CLOSED_MESSAGE))
        await self._close_everything()

    async def _close_everything(self) -> None:
        # Lent connections are closed too; their holders' putconn() then closes quietly.
        conns = self._engine._close_all_state()
        for raw in conns:
            if not raw.closed:
                anyio.notify_closing(raw)  # wakes a notifies() waiting on its socket
        self._lent.clear()
        self._info.clear()
        with anyio.CancelScope(shield=True):
            if conns:
                await self._offload.run_return(_close_all, conns)
            await self._tasks.aclose()
        self._offload.shutdown()

    async def resize(self, minconn: int, maxconn: int) -> None:
        """Change the pool's sizes. Growing takes effect at once (waiters are
        served, ``minconn`` refilled in the background); idle connections above a
        smaller ``maxconn`` are closed now, lent ones when they come back.

        :raises PoolConfigError: bad sizes (the pool is left unchanged).
        """
        check_sizes(minconn, maxconn)
        self._check_serving()
        self._engine.minconn, self._engine.maxconn = minconn, maxconn
        self._offload.resize(maxconn)
        surplus = self._engine._evict_idle(lambda _: True, keep=maxconn)
        await self._close_evicted(surplus)
        self._ensure_min()
        self._dispatch()

    async def drain(self) -> None:
        """Replace every connection gracefully (e.g. after a password rotation):
        idle ones are closed now and ``minconn`` reopened in the background; lent
        ones are closed when they come back instead of being reused."""
        self._check_serving()
        self._generation += 1
        old = self._engine._evict_idle(self._retired, keep=0)
        await self._close_evicted(old)
        self._ensure_min()

    # -- lending --------------------------------------------------------------

    def connection(self, timeout: float | None = None, key: Hashable | None = None) -> _ConnectionContext:
        """Lend a connection for an ``async with`` block.

        On a clean exit the transaction is committed and the connection
        returned; on an exception (or cancellation) it is rolled back, returned,
        and the exception propagates. Waiting follows :meth:`getconn`.
        """
        return _ConnectionContext(self, key, timeout)

    async def getconn(self, key: Hashable | None = None, timeout: float | None = None) -> AsyncConnection:
        """Lend a connection, waiting (FIFO) up to ``timeout`` if none is free.

        With a ``key`` already lent, the same connection again (psycopg2's keys).

        :raises PoolTimeout: none became free within ``timeout`` (default: the pool's).
        :raises TooManyRequests: ``max_waiting`` requests are already waiting.
        :raises PoolClosed: the pool is closed or closing.
        :raises PoolError: the pool was never opened.
        """
        self._check_serving()
        wait = self.timeout if timeout is None else _check_timeout("timeout", timeout)
        self._stats.requests_num += 1
        if key is not None and (raw := self._engine._in_use(key)) is not None:
            lent = self._lent[id(raw)]()
            if lent is not None:
                return lent
        # Every call is a checkpoint (trio's rule), so a loop of checkouts that
        # never waits still lets other tasks run, and cancellation is seen here.
        await anyio.lowlevel.checkpoint()
        deadline = time.monotonic() + wait
        # Bounded: each pass that does not return discards a connection that
        # failed its check, and only idle connections are ever checked.
        while True:
            raw = self._take_ready(key)
            if raw is None:
                raw = await self._wait(key, deadline, wait)
            if self._health.check is None or await self._passes_check(raw):
                break
        conn = AsyncConnection(self, raw, self._engine._rused[id(raw)])
        if self.leak_threshold is not None:
            conn.taken_at = call_site()
        self._lent[id(raw)] = weakref.ref(conn, self._make_orphan_hook(raw, conn.taken_at))
        return conn

    def _check_serving(self) -> None:
        if self.closed:
            raise PoolClosed(CLOSED_MESSAGE)
        if not self._opened:
            raise PoolError(
                f"pool {self.name!r} is not open: use 'async with pool:' or 'await pool.open()' first"
            )

    def _retired(self, raw: PGConnection) -> bool:
        """Past its lifetime, or from before a drain()."""
        info = self._info.get(id(raw))
        return info is None or info.generation != self._generation or time.monotonic() >= info.expires_at

    def _take_ready(self, key: Hashable | None, trusted: PGConnection | None = None) -> PGConnection | None:
        """An idle connection that still looks alive, lent under ``key``; no I/O.

        ``trusted``: a connection that was in use a moment ago (it is handed on
        without the socket peek, a system call that costs more than the rest of
        the hand-off in a busy pool).
        """
        while (raw := self._engine._take_idle(key)) is not None:
            retired = self._retired(raw)
            if not retired and (raw is trusted or is_usable(raw)):
                return raw
            if retired and not raw.closed:
                logger.debug("pool %r: replacing a connection past its lifetime", self.name)
            else:
                self._stats.connections_lost += 1
                logger.info("pool %r: discarding a broken idle connection", self.name)
            self._discard_lent(raw)
        return None

    async def _passes_check(self, raw: PGConnection) -> bool:
        """Run the user's or built-in check if the connection sat idle long enough;
        a failure discards it. Cancellation during the check keeps it safe."""
        info = self._info.get(id(raw))
        if not self._health.check_due(info.idle_since if info else None):
            return True
        try:
            ok = await self._offload.run(self._health.run_check, raw)
        except BaseException:
            # The check finished (threads are not interrupted): give the connection back.
            with anyio.CancelScope(shield=True):
                await self._return_raw(raw)
            raise
        if not ok:
            self._stats.connections_lost += 1
            logger.info("pool %r: a connection failed its check and was discarded", self.name)
            self._discard_lent(raw)
        return ok

    async def _wait(self, key: Hashable | None, deadline: float, timeout: float) -> PGConnection:
        if self.max_waiting and len(self._waiting) >= self.max_waiting:
            self._stats.requests_errors += 1
            raise TooManyRequests(
                f"{len(self._waiting)} requests are already waiting for a connection "
                f"(max_waiting={self.max_waiting}): raise max_waiting or maxconn, or retry later"
            )
        started = time.monotonic()
        deadline = anyio.current_time() + max(deadline - started, 0.0)
        waiter = self._waiting.push(key, deadline, timeout)
        if deadline < self._sweep_target:
            self._sweep_wake.set()  # the sweeper sleeps until a later deadline
        self._stats.requests_queued += 1
        self._grow()
        try:
            return await waiter.wait()  # or PoolTimeout from the sweeper, PoolClosed from close()
        except BaseException as exc:
            handed = self._waiting.leave(waiter)
            if handed is not None:  # handed a connection while being cancelled
                self._give_back_nowait(handed)
            if isinstance(exc, PoolClosed):
                self._stats.requests_errors += 1
            raise
        finally:
            self._stats.requests_wait_ms += int((time.monotonic() - started) * 1000)

    def _dispatch(self, trusted: PGConnection | None = None) -> None:
        """Hand idle connections to waiters, first come first served; no I/O."""
        while (waiter := self._waiting.first()) is not None:
            raw = self._take_ready(waiter.key, trusted)
            if raw is None:
                self._grow()
                return
            self._waiting.hand(waiter, raw)

    # -- one-hop helpers ------------------------------------------------------

    async def run_sync(self, func: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Borrow a connection, run ``func(raw_connection, *args)`` and commit in a
        single worker-thread call, then return the connection (rolled back on error).
        ``func`` may call back into the loop with ``anyio.from_thread``."""
        return await self._borrow_and_run(AsyncConnection.run_sync, func, args, timeout)

    async def execute(self, sql: str, params: Params = None, *, timeout: float | None = None) -> int:
        """Run one statement on a pooled connection and commit; returns ``rowcount``."""
        if self.io != "thread":
            return await self._borrow_and_run(
                AsyncConnection._statement_and_commit,
                execute_sync,
                (_rowcount, sql, params),
                timeout,
                run=False,
            )
        return await self._borrow_and_run(AsyncConnection._call, execute_sync, (sql, params), timeout)

    async def fetchone(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Any:
        """Run a query on a pooled connection; its first row, or None."""
        if self.io != "thread":
            return await self._borrow_and_run(
                AsyncConnection._statement_and_commit,
                fetchone_sync,
                (_first_row, sql, params),
                timeout,
                run=False,
            )
        return await self._borrow_and_run(AsyncConnection._call, fetchone_sync, (sql, params), timeout)

    async def fetchall(self, sql: str, params: Params = None, *, timeout: float | None = None) -> list[Any]:
        """Run a query on a pooled connection; all its rows."""
        if self.io != "thread":
            return await self._borrow_and_run(
                AsyncConnection._statement_and_commit,
                fetchall_sync,
                (_all_rows, sql, params),
                timeout,
                run=False,
            )
        return await self._borrow_and_run(AsyncConnection._call, fetchall_sync, (sql, params), timeout)

    async def fetchval(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Any:
        """Run a query on a pooled connection; the first column of its first row, or None."""
        if self.io != "thread":
            return await self._borrow_and_run(
                AsyncConnection._statement_and_commit,
                fetchval_sync,
                (_first_value, sql, params),
                timeout,
                run=False,
            )
        return await self._borrow_and_run(AsyncConnection._call, fetchval_sync, (sql, params), timeout)

    async def _borrow_and_run(
        self,
        runner: Callable[..., Awaitable[T]],
        func: Callable[..., Any],
        args: tuple[Any, ...],
        timeout: float | None,
        run: bool = True,
    ) -> T:
        """Borrow, run ``func`` then commit in one worker-thread call, return.
        ``run=False``: ``runner`` commits itself (the loop-native helpers)."""
        conn = await self.getconn(timeout=timeout)
        try:
            if not run:
                return await runner(conn, func, *args)
            return await runner(conn, run_and_commit, func, *args)
        finally:
            await self.putconn(conn)

    # -- returning --------------------------------------------------------------

    async def putconn(self, conn: AsyncConnection, key: Hashable | None = None, close: bool = False) -> None:
        """Return a connection: rolled back if mid-transaction (and ``reset``),
        then reused; or closed, with ``close=True``, if broken, past its lifetime
        or drained. Cancelling the caller does not interrupt a return. After
        ``closeall``/``close`` the connection is closed.

        :raises ConnectionReleased: it was already returned.
        :raises PoolError: it was lent by another pool, or under another key.
        """
        if not isinstance(conn, AsyncConnection):
            raise PoolError(f"putconn() takes the AsyncConnection the pool lent, got {type(conn).__name__}")
        if conn.pool is not self:
            raise PoolError(
                f"connection is not a member of this pool ({self.name!r}): return it to {conn.pool.name!r}"
            )
        raw = conn.raw  # raises ConnectionReleased if already returned
        await conn._idle()
        await conn._loop_give_back()
        if key is not None and key != conn.key:
            raise PoolError(f"connection was taken under the key {conn.key!r}, not {key!r}")
        conn._release()
        self._lent.pop(id(raw), None)
        self._stats.usage_ms += int((time.monotonic() - conn.lent_at) * 1000)
        if conn._session_changed and not raw.closed:
            # No I/O outside a transaction; inside one, reset_for_reuse rolls back first.
            await self._offload.run_return(self._restore_session, raw)
        if conn._listened and not raw.closed and not close:
            close = not await self._offload.run_return(forget_listens, raw)
        await self._return_raw(raw, close)

    async def _return_raw(self, raw: PGConnection, close: bool = False) -> None:
        """Take a lent connection back: reuse it, or close it and free its slot."""
        if self._engine._detach(raw, None) is None:  # pool closed meanwhile
            await self._offload.run_return(close_quietly, raw)
            return
        if not close and not self._retired(raw) and self._engine.size <= self.maxconn:
            if self._health.reset is None and not raw.closed and raw.get_transaction_status() == _STATUS_IDLE:
                self._check_in(raw)  # the common case: no I/O, no thread
                return
            if await self._offload.run_return(self._health.reset_returned, raw):
                self._check_in(raw)
                return
            self._stats.returns_bad += 1
        await self._offload.run_return(close_quietly, raw)
        self._forget_info(raw)
        self._engine._release_slot()
        self._after_slot_freed()
        self._ensure_min()

    def _give_back_nowait(self, raw: PGConnection) -> None:
        # A connection just handed over is clean: no I/O is needed to return it.
        if self._engine._detach(raw, None) is None:
            self._close_in_background(raw)
        else:
            self._check_in(raw)

    def _restore_session(self, raw: PGConnection) -> None:
        if reset_for_reuse(raw):
            raw.set_session(
                isolation_level="default",
                readonly="default",
                deferrable="default",
                autocommit=self.autocommit,
            )

    def _check_in(self, raw: PGConnection) -> None:
        """A returned, clean connection goes to the next waiter or idle."""
        if self._engine._checkin(raw):
            info = self._info.get(id(raw))
            if info is not None:
                info.idle_since = time.monotonic()
            self._dispatch(trusted=raw if not raw.closed else None)
        else:
            self._close_in_background(raw)
        self._after_slot_freed()

    def _after_slot_freed(self) -> None:
        if self._all_returned is not None and not self._engine.used_count:
            self._all_returned.set()
        if len(self._waiting):
            self._grow()

    def _forget_info(self, raw: PGConnection) -> None:
        self._info.pop(id(raw), None)

    def _discard_lent(self, raw: PGConnection) -> None:
        """Drop a lent connection found unfit: close it in the background, free its slot."""
        self._engine._forget(raw)
        self._close_in_background(raw)
        self._after_slot_freed()
        self._ensure_min()

    async def _close_evicted(self, conns: list[PGConnection]) -> None:
        for raw in conns:
            self._forget_info(raw)
        if conns:
            await self._offload.run_return(_close_all, conns)

    def _close_in_background(self, raw: PGConnection) -> None:
        self._forget_info(raw)
        try:
            self._tasks.spawn(self._offload.run_return, close_quietly, raw)
        except PoolClosed:
            close_quietly(raw)  # no loop task left to use; closing sends one packet

    # -- reporting ----------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Gauges and counters, with psycopg_pool's key names."""
        engine = self._engine
        return {
            "pool_min": engine.minconn,
            "pool_max": engine.maxconn,
            "pool_size": engine.size,
            "pool_available": engine.idle_count,
            "requests_waiting": len(self._waiting),
            **self._stats.snapshot(),
        }

    def pop_stats(self) -> dict[str, int]:
        """Like :meth:`get_stats`, then reset the counters."""
        stats = self.get_stats()
        self._stats.reset()
        return stats

    def __repr__(self) -> str:
        engine = self._engine
        state = "closed" if self.closed else ("open" if self._opened else "not open")
        opening = engine.size - engine.idle_count - engine.used_count
        return (
            f"<AsyncConnectionPool {self.name!r} {self._target} [{state}, io={self.io}] | "
            f"Requests: {engine.used_count} active, {len(self._waiting)} queued | "
            f"Connections: {engine.idle_count} idle, {engine.used_count} in use, "
            f"{opening} opening or returning, max {engine.maxconn}>"
        )


def _close_all(conns: list[PGConnection]) -> None:
    for conn in conns:
        close_quietly(conn)
