"""The async pool: psycopg2 connections behind an anyio facade.

Who does what (each piece of state has one owner):

- :class:`~._loop.ledger.Ledger` owns every connection's state (one
  :class:`~._loop.ledger.Slot` each) and decides every change, on the loop,
  with no I/O; it returns a :class:`~._loop.ledger.Plan` of I/O to do, which
  :meth:`AsyncConnectionPool._apply` carries out in the background;
- :class:`~._loop.waiting.WaitQueue` queues requests (FIFO) and enforces their
  deadlines;
- :class:`~._loop.opener.Opener` opens connections, backing off after every
  failure; :class:`~._loop.upkeep.Upkeep` retires and refills;
- :class:`~._thread.offload.Offloader` runs every connect, query, rollback and
  close in the pool's own threads; :class:`~._thread.background.BackgroundTasks`
  hosts the pool's tasks.

Hand-back cannot be interrupted: returning a connection is a state change on
the loop (no await), and whatever I/O it needs (rollback, reset, close) runs in
a task the pool owns. A caller may await it, for back-pressure; cancelling that
await (anyio, ``task.cancel()``, ``wait_for``) leaves the return to finish. The
same holds for :meth:`AsyncConnectionPool.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.lowlevel
import psycopg2.extensions
from psycopg2.extensions import connection as PGConnection

from . import _config
from ._config import check_connect_args, check_sizes, check_timeout, describe_target, with_connect_timeout
from ._libpq import cancel_in_background, shutdown_sockets, was_shut_down, with_network_defaults
from ._loan import Loan
from ._loop import failover, native, txpooling
from ._loop.health import Health, HookFailed, HookLog, looks_alive
from ._loop.leaks import call_site
from ._loop.ledger import Ledger, Plan, Return, Slot, SlotState, decide_return
from ._loop.opener import Opener
from ._loop.stats import PoolStats
from ._loop.upkeep import Upkeep
from ._loop.waiting import Waiter, WaitQueue, current_time
from ._redact import redact_connect_args
from ._telemetry import PoolTelemetry
from ._thread import blocking
from ._thread.background import BackgroundTasks
from ._thread.blocking import Params, close_all, run_and_commit
from ._thread.offload import Offloader
from .connection import AsyncConnection
from .errors import PoolClosed, PoolConfigError, PoolError, PoolTimeout, TooManyRequests

__all__ = ["AsyncConnectionPool"]

T = TypeVar("T")
logger = logging.getLogger("pgpool_async")
_names = itertools.count(1)
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR
_PSYCOPG2_READY = psycopg2.extensions.STATUS_READY
CLOSED_MESSAGE = "connection pool is closed"


def _weak(method: Callable[..., Any], gone: Any = None) -> Callable[..., Any]:
    """``method`` of an object held weakly: calls it while the object lives,
    else returns ``gone``. Background tasks hold the pool this way, so a pool
    dropped without ``close()`` can be collected."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return gone if bound is None else bound(*args)

    return call


class _ConnectionContext:
    """``async with pool.connection() as conn``: commit on success, rollback on error."""

    __slots__ = ("_conn", "_key", "_pool", "_timeout")

    def __init__(self, pool: AsyncConnectionPool, key: Hashable | None, timeout: float | None):
        self._pool = pool
        self._key = key
        self._timeout = timeout
        self._conn: AsyncConnection | None = None

    def __aenter__(self) -> Coroutine[Any, Any, AsyncConnection]:
        # The pool's checkout coroutine itself (one coroutine less per block);
        # it also gives this context the connection, for __aexit__.
        return self._pool._checkout(self._key, self._timeout, self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        slot, loan = conn._slot, conn._loan
        if slot is None or loan is None:  # the body returned it itself
            return
        try:
            if exc_type is None:
                if slot.closed_by_pool:
                    raise PoolClosed(
                        f"pool {self._pool.name!r} was closed while this connection was lent and "
                        "closed it (close() timeout passed): its transaction was NOT committed; "
                        "give close() a longer timeout, or finish work before closing"
                    )
                if loan.turn.locked():
                    await loan.turn.wait_idle()  # a call another task started on it ends first
                raw = loan.raw
                # A connection its user closed has nothing to commit (psycopg2 and
                # psycopg_pool skip it too); the return replaces it.
                status = raw.get_transaction_status() if not raw.closed else _STATUS_IDLE
                if loan.unawaited or status == _STATUS_INERROR:
                    # A statement never awaited, or a failed transaction: roll back, say so.
                    loan.check_finished("the connection() block")
                if status != _STATUS_IDLE:
                    await loan.call(blocking.commit_if_open)
        finally:
            # On error, cancellation or a failed commit, the return rolls back.
            # Starting it never awaits; waiting for it is back-pressure only.
            done = self._pool._start_return(conn, close=False)
            if done is not None:
                await _back_pressure(done)


class AsyncConnectionPool:
    """An asyncio/trio connection pool over psycopg2, that never blocks the event loop.

    ``AsyncConnectionPool(minconn, maxconn, *args, **kwargs)``: ``args`` and
    ``kwargs`` go to ``psycopg2.connect`` (a DSN, libpq keywords,
    ``connection_factory``, ``cursor_factory``). Pool options, keyword only:

    - ``timeout``: seconds a request waits for a connection, and ``open()`` for
      ``minconn`` connections, before :class:`PoolTimeout` (default 30). Unless
      given, libpq's ``connect_timeout`` is set to it too (at least 2 s), and
      TCP keepalives and ``tcp_user_timeout`` (half of it, 10..30 s) bound how
      long a silent network holds a connection (see ``_libpq.with_network_defaults``).
    - ``max_waiting``: requests allowed to queue; one more gets
      :class:`TooManyRequests` at once (0: no limit).
    - ``name``: shown in ``repr``, log lines and thread names.
    - ``autocommit``: hand out connections in autocommit mode.
    - ``io``: how statements run. ``"auto"`` (the default): ``execute``/``fetch*``/``commit``/``rollback``
      and the one-hop helpers run on the event loop through psycopg2's own libpq
      (:mod:`pgpool_async._loop.native`) where possible; threads otherwise
      (other platforms, a ``cursor_factory``, cursors, COPY, ``run_sync``).
      ``"thread"``: every call in the pool's worker threads. ``"loop"``: as
      ``"auto"``, but ``open()`` raises :class:`PoolConfigError` if the loop
      path is not available in this process, and so does a statement on a
      connection it cannot run (a class, cursor factory or proxy the pool does
      not know; ``"auto"`` runs those in threads and logs it once at INFO).
    - ``check``: check a connection idle for ``check_idle`` seconds (default 1)
      before lending it, in a worker thread: ``True`` for a ``SELECT 1`` round
      trip, or a callable ``check(raw_connection)`` that raises if it is unfit.
      A failed connection is discarded and the next one tried. Without
      ``check``, idle connections are still screened without a round trip
      (closed, or the server hung up).
    - ``configure(raw_connection)``: run on each new connection (committed);
      ``reset(raw_connection)``: run on each return, after the rollback, outside
      any transaction (``DISCARD ALL`` works). A connection that fails either is
      discarded, never lent; the failure is logged at WARNING (rate-limited).
    - ``max_lifetime`` (default 1 h, up to 10% less at random) and ``max_idle``
      (default 10 min, above ``minconn``): connections older, or idle longer,
      are replaced in the background. ``None`` disables either.
    - ``reconnect_timeout`` (default 5 min): after that long failing to refill
      ``minconn``, call ``reconnect_failed(pool)`` (sync or async) and keep
      trying later.
    - ``leak_threshold``: seconds after which a connection not returned is
      reported (logger ``pgpool_async``) with where it was taken.
    - ``transaction_pooling``: the DSN points at a transaction pooler (PgBouncer
      in transaction mode, PgCat, Odyssey, RDS Proxy, Supavisor): nothing
      session-level is ever left on a server connection; what would be is refused
      with :class:`TransactionPoolingError` (see ``docs/scaling.md``).
      Incompatible with ``reset``.
    - ``check="read-write"`` / ``check="standby"``: built-in checks that the
      server still accepts writes / is still a standby. Whatever ``check``, with
      ``target_session_attrs`` in the DSN, a connection whose server changed role
      (a ``ReadOnlySqlTransaction``, or the role PostgreSQL 14+ reports) is
      discarded on return with every idle one to the same host.
    - ``telemetry`` (default True): with OpenTelemetry's API installed and a
      tracer or meter provider set by the app, a CLIENT span per statement and
      the pool's metrics (see ``docs/observability.md``); False: none for this pool.

    Creating the pool does no I/O; ``await pool.open()`` or ``async with pool``
    opens ``minconn`` connections. Bad options raise :class:`PoolConfigError` here.
    A pool opened and dropped without ``close()`` warns with ``ResourceWarning``
    when collected, and closes its connections and threads.
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
        io: str | None = None,
        check: bool | str | Callable[[PGConnection], Any] | None = None,
        check_idle: float = 1.0,
        configure: Callable[[PGConnection], Any] | None = None,
        reset: Callable[[PGConnection], Any] | None = None,
        max_lifetime: float | None = 3600.0,
        max_idle: float | None = 600.0,
        reconnect_timeout: float = 300.0,
        reconnect_failed: Callable[[AsyncConnectionPool], Any] | None = None,
        leak_threshold: float | None = None,
        transaction_pooling: bool = False,
        telemetry: bool = True,
        **kwargs: Any,
    ) -> None:
        check_sizes(minconn, maxconn)
        params = check_connect_args(args, kwargs)
        self.transaction_pooling = txpooling.check_options(transaction_pooling, reset)
        self._fit = failover.ServerFit(params)
        self.timeout = check_timeout("timeout", timeout)
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise PoolConfigError(f"max_waiting must be an int >= 0 (0: no limit), got {max_waiting!r}")
        self.max_waiting = max_waiting
        self.name = name if name is not None else f"pool-{next(_names)}"
        self.autocommit = bool(autocommit)
        if io is None:
            io = _config.DEFAULT_IO
        if io not in ("auto", "loop", "thread"):
            raise PoolConfigError(f'io must be "auto", "loop" or "thread", got {io!r}')
        self.io = io
        health = Health.build(
            failover.named_check(check), check_idle, configure, reset, max_lifetime, max_idle
        )
        reconnect_timeout = check_timeout("reconnect_timeout", reconnect_timeout)
        if reconnect_failed is not None and not callable(reconnect_failed):
            raise PoolConfigError(
                f"reconnect_failed must be a callable taking the pool, got {reconnect_failed!r}"
            )
        self._reconnect_failed = reconnect_failed
        self.leak_threshold = (
            None if leak_threshold is None else check_timeout("leak_threshold", leak_threshold)
        )
        self._connect_kwargs = with_network_defaults(
            with_connect_timeout(kwargs, params, self.timeout), params, self.timeout
        )
        self._target = redact_connect_args(describe_target(params), args, kwargs)
        self._health = health
        self._stats = PoolStats()
        self._telemetry = PoolTelemetry(self.name, io, self._stats, telemetry)
        self._hook_log = HookLog(logger, self.name)
        self._waiting = WaitQueue()
        self._ledger = Ledger(minconn, maxconn, self._waiting)
        self._offload = Offloader(maxconn, self.name)
        self._tasks = BackgroundTasks(self.name)
        usable = _weak(self._usable, gone=False)
        self._opener = Opener(
            name=self.name,
            target=self._target,
            connect_args=(args, self._connect_kwargs),
            autocommit=self.autocommit,
            ledger=self._ledger,
            offload=self._offload,
            health=health,
            stats=self._stats,
            hook_log=self._hook_log,
            waiting=self._waiting,
            apply=_weak(self._apply),
            usable=usable,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=_weak(self._call_reconnect_failed),
            connected=self._telemetry.connected,
        )
        self._upkeep = Upkeep(
            name=self.name,
            ledger=self._ledger,
            health=health,
            stats=self._stats,
            leak_threshold=self.leak_threshold,
            apply=_weak(self._apply_alive, gone=False),
            recover=_weak(self._recover, gone=False),
            usable=usable,
        )
        self._opened = False
        self._closed_done: anyio.Event | None = None
        self._never_opened_closed = False

    @classmethod
    def over(
        cls,
        engine: Any,
        *,
        timeout: float = 30.0,
        max_waiting: int = 0,
        name: str | None = None,
        io: str | None = None,
        leak_threshold: float | None = None,
    ) -> AsyncConnectionPool:
        """An async pool whose connections are ``engine``'s: a ``ThreadedConnectionPool``
        (psycopg2's, this package's, or a subclass of either) that threads keep
        using. One budget: the engine's ``maxconn`` counts what threads and tasks
        hold; a task waits (FIFO, up to ``timeout``) for any return, a thread's
        ``putconn`` included. Opening takes nothing from the engine; ``close()``
        ends the face only, ``closeall()`` closes the engine too. See
        ``docs/from-psycopg2-pools.md``.

        :raises PoolConfigError: ``engine`` is a ``SimpleConnectionPool`` (not
            thread-safe) or not a pool; bad options.
        :raises PoolClosed: the engine is closed.
        """
        face = AsyncConnectionPool._face
        assert face is not None, "pgpool_async/__init__.py imports _engine.py, which sets it"
        return face(
            engine, timeout=timeout, max_waiting=max_waiting, name=name, io=io, leak_threshold=leak_threshold
        )

    #: The class of :meth:`over`'s faces, set by ``_engine.py`` (which builds on this
    #: class, so this module cannot import it); the package's ``__init__`` imports it.
    _face: ClassVar[Callable[..., AsyncConnectionPool] | None] = None

    # -- properties ---------------------------------------------------------

    @property
    def minconn(self) -> int:
        """Connections kept open."""
        return self._ledger.minconn

    @property
    def maxconn(self) -> int:
        """At most this many connections, open or opening."""
        return self._ledger.maxconn

    @property
    def reconnect_timeout(self) -> float:
        """Seconds of failing to refill ``minconn`` before ``reconnect_failed(pool)`` is called."""
        return self._opener.reconnect_timeout

    @property
    def closed(self) -> bool:
        """True once closing has started (before ``open()``, False)."""
        return self._ledger.closing or self._never_opened_closed

    # -- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        """Open ``minconn`` connections, in worker threads, and start serving.

        Retries failed connects with backoff until ``timeout``, except errors
        that retrying cannot fix (unknown database or role, failed password,
        an unparsable DSN): those are raised at once, as psycopg2 raised them.

        :raises PoolTimeout: ``minconn`` connections could not be opened within
            ``timeout``; its ``__cause__`` is the last connect error. The pool is
            closed then.
        :raises psycopg2.OperationalError: a connect error that cannot heal (the
            pool is closed then).
        :raises PoolClosed: the pool was closed; pools cannot be reopened.
        """
        if self.closed:
            raise PoolClosed(f"{CLOSED_MESSAGE}: pools cannot be reopened, create a new one")
        if self._opened:
            return
        if self.io != "thread":
            # Finding psycopg2's libpq reads /proc/self/maps: in a thread, once.
            reason = await self._offload.run_anyio(native.preload)
            if reason is not None and self.io == "loop":
                raise PoolConfigError(
                    f'io="loop" is not available here ({reason}): use io="auto" or "thread"'
                )
        self._opened = True
        self._telemetry.opened(self)
        await self._tasks.start()
        self._tasks.spawn(
            self._waiting.enforce_deadlines,
            _timeout_error(self.name, self._ledger, self._stats, self._opener, self._telemetry),
        )
        self._tasks.spawn(self._upkeep.run)
        self._apply(self._ledger.assign(self._usable))
        ledger, opener = self._ledger, self._opener
        try:
            with anyio.fail_after(self.timeout):
                while ledger.size - ledger.opening_count < ledger.minconn:
                    if opener.permanent_error is not None:
                        raise opener.permanent_error
                    await opener.progress()
        except TimeoutError:
            await self._close_quietly()
            raise PoolTimeout(
                f"pool {self.name!r} couldn't open {self.minconn} connection(s) to "
                f"{self._target} within {self.timeout:.2f} sec"
            ) from opener.last_error
        except BaseException:
            await self._close_quietly()
            raise

    async def _close_quietly(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    async def __aenter__(self) -> AsyncConnectionPool:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiting requests get :class:`PoolClosed`, lent
        connections get up to ``timeout`` seconds to come back, then the sockets
        of those still out are shut down (a worker blocked on a dead network
        fails at once) and every connection is closed (a ``connection()`` block
        still running then raises :class:`PoolClosed` instead of committing). Safe to call twice, and
        concurrently.

        Closing is the pool's own task: cancelling ``close()`` (or a timeout
        around it) stops the waiting, not the closing, which finishes in the
        background; the pool is never left half closed.
        """
        check_timeout("close timeout", timeout)
        if not self._opened:
            self._never_opened_closed = True
            return
        self._start_closing(timeout)
        assert self._closed_done is not None
        await self._closed_done.wait()
        await self._tasks.wait_stopped()

    async def closeall(self) -> None:
        """Close every connection now, those lent out included, and close the pool.

        :raises PoolClosed: the pool was already closed (psycopg2's behaviour).
        """
        if self.closed:
            raise PoolClosed(CLOSED_MESSAGE)
        if not self._opened:
            self._never_opened_closed = True
            return
        self._start_closing(0.0)
        assert self._closed_done is not None
        await self._closed_done.wait()
        await self._tasks.wait_stopped()

    def _start_closing(self, timeout: float) -> None:
        """Begin closing, once: no I/O here; the rest runs in a pool task."""
        if self._closed_done is not None:
            return
        self._closed_done = anyio.Event()
        idle = self._ledger.start_closing()
        self._waiting.fail_all(PoolClosed(CLOSED_MESSAGE))
        try:
            self._tasks.spawn(self._finish_closing, idle, timeout, self._closed_done)
        except PoolClosed:  # the tasks are gone (the loop is ending): close off the loop
            self._close_off_loop(_let_go([*idle, *self._ledger.close_lent()]))
            self._offload.shutdown()
            self._closed_done.set()

    async def _finish_closing(self, idle: list[Slot], timeout: float, done: anyio.Event) -> None:
        try:
            if idle:
                await self._offload.run_return(close_all, _let_go(idle))
            empty = anyio.Event()
            self._ledger.when_empty(empty.set)
            with anyio.move_on_after(timeout):
                await empty.wait()
            lent = self._ledger.close_lent()
            _let_go(lent)  # a statement running on the loop ends now (its connection closed)
            for slot in lent:
                if not slot.raw.closed:
                    anyio.notify_closing(slot.raw)  # wakes a notifies() waiting on its socket
            # Still lent at the deadline: a worker blocked on a silent network would
            # hold psycopg2's close(); shutting the sockets down makes it fail now.
            shutdown_sockets(s.raw for s in lent)
            if lent:
                await self._offload.run_return(close_all, [s.raw for s in lent])
        finally:
            self._offload.shutdown()
            done.set()
            self._tasks.stop()

    async def resize(self, minconn: int, maxconn: int) -> None:
        """Change the pool's sizes. Growing takes effect at once (waiters are
        served, ``minconn`` refilled in the background); idle connections above a
        smaller ``maxconn`` are closed now, lent ones when they come back.

        :raises PoolConfigError: bad sizes (the pool is left unchanged).
        """
        check_sizes(minconn, maxconn)
        self._check_serving()
        self._offload.resize(maxconn)
        plan = Plan(close=self._ledger.resize(minconn, maxconn))
        plan += self._ledger.assign(self._usable)
        self._apply(plan)
        await anyio.lowlevel.checkpoint()

    async def drain(self) -> None:
        """Replace every connection gracefully (e.g. after a password rotation):
        idle ones are closed now and ``minconn`` reopened in the background; lent
        ones are closed when they come back instead of being reused."""
        self._check_serving()
        plan = Plan(close=self._ledger.drain())
        plan += self._ledger.assign(self._usable)
        self._apply(plan)
        await anyio.lowlevel.checkpoint()

    def __del__(self) -> None:
        if not getattr(self, "_opened", False) or self._closed_done is not None:
            return
        name, ledger = self.name, self._ledger
        slots = [*ledger.start_closing(), *ledger.close_lent()]
        # From another thread, the loop that watches their sockets (one per pool)
        # lets them go first, then a thread closes them (see native.watching_loop).
        loop = next(filter(None, (native.watching_loop(s.raw) for s in slots)), None)
        handed = False
        if loop is not None and loop is not asyncio._get_running_loop():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing watches
                loop.call_soon_threadsafe(_close_slots_off_loop, slots)
                handed = True
        if not handed:
            _close_slots_off_loop(slots)
        self._tasks.stop_from_any_thread()
        self._offload.shutdown()
        # Warn last, holding no reference to the pool: where warnings are errors,
        # the exception's traceback must not bring the pool back to life.
        del self, ledger, slots
        warnings.warn(
            f"pool {name!r} was opened and never closed: use 'async with pool:' or "
            "'await pool.close()'; its connections and threads are closed now",
            ResourceWarning,
            stacklevel=1,
        )

    @staticmethod
    def _close_off_loop(conns: list[PGConnection]) -> None:
        if conns:
            threading.Thread(target=close_all, args=(conns,), name="pgpool-close", daemon=True).start()

    # -- lending --------------------------------------------------------------

    def connection(self, timeout: float | None = None, key: Hashable | None = None) -> _ConnectionContext:
        """Lend a connection for an ``async with`` block.

        On a clean exit the transaction is committed and the connection
        returned; on an exception (or cancellation) it is rolled back, returned,
        and the exception propagates. If ``close()`` closed the connection under
        the block, a clean exit raises :class:`PoolClosed` (nothing was
        committed). Waiting follows :meth:`getconn`.
        """
        return _ConnectionContext(self, key, timeout)

    async def getconn(self, key: Hashable | None = None, timeout: float | None = None) -> AsyncConnection:
        """Lend a connection, waiting (FIFO) up to ``timeout`` if none is free.
        Return it with :meth:`putconn`.

        With a ``key`` already lent, the same connection again (psycopg2's keys).

        :raises PoolTimeout: none became free within ``timeout`` (default: the pool's).
        :raises TooManyRequests: ``max_waiting`` requests are already waiting.
        :raises PoolClosed: the pool is closed or closing.
        :raises PoolError: the pool was never opened.
        """
        return await self._checkout(key, timeout, None)

    async def _checkout(
        self, key: Hashable | None, timeout: float | None, into: _ConnectionContext | None
    ) -> AsyncConnection:
        """:meth:`getconn`; the connection is also given to ``into``, if any."""
        self._check_serving()
        wait = self.timeout if timeout is None else check_timeout("timeout", timeout)
        self._stats.requests_num += 1
        conn = self._held(key) if key is not None else None
        if conn is None:
            # An idle connection, else one waited for (FIFO); checked first if it
            # sat idle long enough (a check's time counts against the timeout too).
            # Bounded: each pass that does not end discards a connection that
            # failed its check, and only connections idle long enough are checked.
            deadline = current_time() + wait
            health = self._health
            while True:
                slot = None
                if not len(self._waiting):
                    slot, plan = self._ledger.take(key, self._usable)
                    if plan.close:
                        self._apply(plan)
                if slot is None:
                    slot = await self._wait(key, deadline, wait)
                else:
                    await self._checkpoint(slot)
                if (
                    health.check is None
                    or not health.check_due(slot.idle_since)
                    or await self._passes_check(slot)
                ):
                    break
            conn = self._lend(slot)
            if self._telemetry.metering():
                self._telemetry.waited(current_time() - deadline + wait)
        if into is not None:
            into._conn = conn
        return conn

    def _held(self, key: Hashable) -> AsyncConnection | None:
        """The connection lent under a psycopg2 key, if its borrower still holds it."""
        held = self._ledger.lent_under(key)
        if held is None or held.holder is None:
            return None
        return held.holder()  # type: ignore[no-any-return]

    async def _checkpoint(self, slot: Slot) -> None:
        """Every call is a checkpoint (trio's rule), so a loop of checkouts that
        never waits still lets other tasks run, and cancellation is seen here;
        a request cancelled here gives back the (clean) connection it took."""
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            self._apply(self._ledger.give_back(slot, self._usable))
            raise

    def _lend(self, slot: Slot) -> AsyncConnection:
        # Behind a transaction pooler the thread path keeps its checks (txpooling.py);
        # the loop path has not been taught them yet.
        io = "thread" if self.transaction_pooling else self.io
        if io != "thread" and slot.runner is None:
            slot.runner = native.LoopStatementRunner(slot.raw)  # no I/O; entered at first use
        conn = AsyncConnection(self, slot, self._offload, io)
        if self.leak_threshold is not None:
            slot.taken_at = call_site()
        dropped = slot.on_drop
        if dropped is None:
            dropped = slot.on_drop = _orphan_recorder(slot, self._ledger.orphans)
        slot.holder = weakref.ref(conn, dropped)
        return conn

    def _check_serving(self) -> None:
        if self.closed:
            raise PoolClosed(f"{CLOSED_MESSAGE} (pool {self.name!r})")
        if not self._opened:
            raise PoolError(
                f"pool {self.name!r} is not open: use 'async with pool:' or 'await pool.open()' first"
            )

    def _usable(self, slot: Slot) -> bool:
        """The ledger's liveness test for an idle connection: no round trip, no wait."""
        if slot.trusted or looks_alive(slot.raw, slot.runner):
            return True
        self._stats.connections_lost += 1
        logger.info("pool %r: discarding a broken idle connection", self.name)
        return False

    async def _passes_check(self, slot: Slot) -> bool:
        """Run the check on a connection that sat idle long enough; a failure
        discards it (and backs off reopening). A caller cancelled meanwhile gets
        its cancellation once the check is done, the connection given back."""
        native.release(slot.raw)  # the check is psycopg2 code, in a thread
        try:
            error = await self._offload.run(
                self._health.check_in_thread, slot.raw, on_cancel=lambda: cancel_in_background(slot.raw)
            )
        except BaseException:
            self._start_return_slot(slot, None, close=False)
            raise
        if error is None:
            self._opener.backoff.succeeded()
            return True
        self._stats.connections_lost += 1
        self._opener.backoff.failed()
        if self._health.check is blocking.liveness_check:
            logger.info("pool %r: a connection failed its check and was discarded: %s", self.name, error)
        else:
            self._hook_log.failed("check", error)
        if self._health.check in (failover.read_write_check, failover.standby_check):
            self._retire_server(slot.raw)  # its idle siblings would fail it too
        self._apply(self._ledger.discard(slot, self._usable))
        return False

    def _retire_server(self, raw: PGConnection) -> None:
        """``raw``'s server can no longer serve this pool (see :mod:`._loop.failover`):
        close every idle connection to it now, lent ones when they come back, and
        refill (libpq picks the right host). No I/O here."""
        server = failover.server_of(raw)
        if server is None:
            return
        logger.warning(
            "pool %r: server %s:%s no longer fits target_session_attrs: reconnecting", self.name, *server
        )
        idle = self._ledger.retire(lambda slot: failover.server_of(slot.raw) == server)
        self._stats.connections_lost += len(idle)
        plan = Plan(close=idle)
        plan += self._ledger.assign(self._usable)
        self._apply(plan)

    async def _wait(self, key: Hashable | None, deadline: float, timeout: float) -> Slot:
        """Queue for a connection until ``deadline`` (``timeout``: for the error message)."""
        if self.max_waiting and len(self._waiting) >= self.max_waiting:
            self._stats.requests_errors += 1
            raise TooManyRequests(
                f"pool {self.name!r}: {len(self._waiting)} requests are already waiting for a "
                f"connection (max_waiting={self.max_waiting}): raise max_waiting or maxconn, or retry later"
            )
        started = time.monotonic()  # (for the stats: a C call, where current_time() is two of ours)
        waiter = self._waiting.push(key, deadline, timeout)
        self._stats.requests_queued += 1
        if self._ledger.may_assign():  # (a busy, full pool: nothing to hand out or open)
            self._apply(self._ledger.assign(self._usable))
        try:
            if waiter.done:  # handed a connection at once: still a checkpoint
                await anyio.lowlevel.checkpoint()
            await waiter.signalled()
            return waiter.result()  # or PoolTimeout from the deadlines, PoolClosed from close()
        except BaseException as exc:
            handed = self._waiting.leave(waiter)
            if handed is not None:  # handed a connection while being cancelled: it is clean
                self._apply(self._ledger.give_back(handed, self._usable))
            if isinstance(exc, PoolClosed):
                self._stats.requests_errors += 1
            raise
        finally:
            self._stats.requests_wait_ms += int((time.monotonic() - started) * 1000)

    # -- one-hop helpers ------------------------------------------------------

    async def run_sync(self, func: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Borrow a connection, run ``func(raw_connection, *args)`` and commit in a
        single worker-thread call, then return the connection (rolled back on error).
        ``func`` may call back into the loop with ``anyio.from_thread``."""
        return await self._borrow_and_run(Loan.call_user, func, args, timeout)

    async def execute(self, sql: str, params: Params = None, *, timeout: float | None = None) -> int:
        """Run one statement on a pooled connection and commit; returns ``rowcount``."""
        return await self._borrow_and_run(Loan.call, blocking.execute, (sql, params), timeout)

    async def fetchone(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Any:
        """Run a query on a pooled connection; its first row, or None."""
        return await self._borrow_and_run(Loan.call, blocking.fetchone, (sql, params), timeout)

    async def fetchall(self, sql: str, params: Params = None, *, timeout: float | None = None) -> list[Any]:
        """Run a query on a pooled connection; all its rows."""
        return await self._borrow_and_run(Loan.call, blocking.fetchall, (sql, params), timeout)

    async def fetchval(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Any:
        """Run a query on a pooled connection; the first column of its first row, or None."""
        return await self._borrow_and_run(Loan.call, blocking.fetchval, (sql, params), timeout)

    async def _borrow_and_run(
        self,
        runner: Callable[..., Awaitable[T]],
        func: Callable[..., Any],
        args: tuple[Any, ...],
        timeout: float | None,
    ) -> T:
        """Borrow, run ``func`` then commit in one worker-thread call, return."""
        conn = await self._checkout(None, timeout, None)
        try:
            return await runner(conn.loan, run_and_commit, func, *args)
        finally:
            done = self._start_return(conn, close=False)
            if done is not None:
                await _back_pressure(done)

    # -- returning --------------------------------------------------------------

    async def putconn(self, conn: AsyncConnection, key: Hashable | None = None, close: bool = False) -> None:
        """Return a connection: rolled back if mid-transaction (and ``reset``),
        then reused; or closed, with ``close=True``, if broken, past its lifetime
        or drained. After ``close``/``closeall`` the connection is closed.

        The return is the pool's job: it is under way when this is first
        awaited, and cancelling the caller (any way) does not interrupt it.

        :raises ConnectionReleased: it was already returned.
        :raises PoolError: it was lent by another pool, or under another key.
        """
        if not isinstance(conn, AsyncConnection):
            raise PoolError(f"putconn() takes the AsyncConnection the pool lent, got {type(conn).__name__}")
        if conn.pool is not self:
            raise PoolError(
                f"connection is not a member of this pool ({self.name!r}): return it to {conn.pool.name!r}"
            )
        conn.loan.check()  # raises ConnectionReleased if already returned
        if key is not None and key != conn.key:
            raise PoolError(f"connection was taken under the key {conn.key!r}, not {key!r}")
        await _back_pressure(self._start_return(conn, close))

    def _start_return(self, conn: AsyncConnection, close: bool) -> anyio.Event | None:
        """Take a lent connection back; no await. Returns an event set when the
        return's I/O is done, or None if it needed none."""
        slot, loan = conn._detach()
        used = time.monotonic() - conn.lent_at
        self._stats.usage_ms += int(used * 1000)
        if self._telemetry.metering():
            self._telemetry.used(used)
        return self._start_return_slot(slot, loan, close)

    def _start_return_slot(self, slot: Slot, loan: Loan | None, close: bool) -> anyio.Event | None:
        if slot.state is not SlotState.LENT:  # closed by the pool meanwhile (close timeout)
            return None
        raw = slot.raw
        if loan is None:
            native.release(raw)  # an orphan's runner, if any, went with it
        if self._fit.unfit(raw):  # its server changed role (failover.py)
            close = True
            self._retire_server(raw)
        ledger = self._ledger
        closed = bool(raw.closed)
        now = time.monotonic()
        settled = clean = False
        if loan is not None and loan.loop_settled():  # (no call running: the turn is free)
            settled = True
            clean = (
                not loan.session_changed
                and not loan.listened
                and self._health.reset is None
                and not closed
                and raw.get_transaction_status() == _STATUS_IDLE  # (libpq's view: the loop's too)
                and raw.status == _PSYCOPG2_READY  # (psycopg2's: not after a COMMIT sent as SQL)
            )
        route = decide_return(
            close=close,
            settled=settled,
            clean=clean,
            closed=closed,
            shut_down=was_shut_down(raw),
            must_close=ledger.must_close(slot, now),
        )
        if route is Return.KEEP:
            # The common case: no I/O, no thread.
            self._apply(ledger.keep(slot, self._usable, now))
            return None
        # Anything else waits for a call still running, then decides again (_finish_return).
        ledger.begin_return(slot)
        done = anyio.Event()
        try:
            self._tasks.spawn(self._finish_return, slot, loan, close, done)
        except PoolClosed:  # no task can run any more: close it off the loop
            self._ledger.discard(slot, self._usable)
            self._close_off_loop(_let_go([slot]))
            return None
        return done

    async def _finish_return(self, slot: Slot, loan: Loan | None, close: bool, done: anyio.Event) -> None:
        """The I/O of a return, in a pool task: wait for a call still running on
        the connection, then reset it (one thread hop) and check it in, or close it."""
        try:
            if loan is not None:
                await loan.turn.wait_idle()
                await loan.give_back_loop()
            if slot.state is SlotState.CLOSED:
                return
            raw = slot.raw
            route = decide_return(
                close=close,
                settled=True,
                clean=False,
                closed=bool(raw.closed),
                shut_down=was_shut_down(raw),
                must_close=self._ledger.must_close(slot),
            )
            if route is Return.CLOSE:
                if raw.closed and not close:
                    self._stats.returns_bad += 1
                await self._apply_now(self._ledger.discard(slot, self._usable))
                return
            # Behind a transaction pooler, with no standalone statement (txpooling.py).
            reset = txpooling.reset_in_thread if self.transaction_pooling else self._health.reset_in_thread
            try:
                # An orphan's loan is gone: undo whatever it may have changed.
                outcome = await self._offload.run_return(
                    reset,
                    raw,
                    self.autocommit,
                    loan.session_changed if loan is not None else True,
                    loan.listened if loan is not None else True,
                )
            except BaseException as exc:
                # Whatever the reset raised in its thread (even a BaseException such
                # as a CancelledError raised by user code), the slot comes back; the
                # pool's own task is never cancelled by it.
                self._stats.returns_bad += 1
                logger.warning(
                    "pool %r: resetting a returned connection raised %s; it was discarded",
                    self.name,
                    type(exc).__name__,
                    exc_info=exc,
                )
                await self._apply_now(self._ledger.discard(slot, self._usable))
                return
            if outcome is True:
                self._apply(self._ledger.check_in(slot, self._usable))
                return
            self._stats.returns_bad += 1
            if isinstance(outcome, HookFailed):
                self._hook_log.failed("reset", outcome.__cause__ or outcome)
                self._opener.backoff.failed()
            await self._apply_now(self._ledger.discard(slot, self._usable))
        finally:
            done.set()

    def _recover(self, slot: Slot) -> bool:
        """Take back a slot whose borrower was garbage-collected (upkeep)."""
        self._start_return_slot(slot, None, close=False)
        return True

    # -- carrying out the ledger's plans ----------------------------------------

    def _apply(self, plan: Plan) -> None:
        """Do the I/O a ledger decision asks for, in the background."""
        if plan.close:
            raws = _let_go(plan.close)
            try:
                self._tasks.spawn(self._offload.run_return, close_all, raws)
            except PoolClosed:
                self._close_off_loop(raws)
        for _ in range(plan.open):
            try:
                self._tasks.spawn(self._opener.open_one)
            except PoolClosed:
                self._ledger.open_failed()

    async def _apply_now(self, plan: Plan) -> None:
        """:meth:`_apply`, closing in this task: when it returns, they are closed."""
        closing, plan.close = plan.close, []
        self._apply(plan)
        if closing:
            await self._offload.run_return(close_all, _let_go(closing))

    def _apply_alive(self, plan: Plan) -> bool:
        self._apply(plan)
        return True

    async def _call_reconnect_failed(self) -> None:
        if self._reconnect_failed is not None:
            result = self._reconnect_failed(self)
            if hasattr(result, "__await__"):
                await result

    # -- reporting ----------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Gauges and counters, with psycopg_pool's key names, and
        ``pool_on_loop``: connections whose statements run on the event loop now
        (``io="auto"``; 0 with ``io="thread"``)."""
        on_loop = sum(1 for s in self._ledger.open_slots() if s.runner is not None and s.runner.entered)
        return {
            **self._ledger.snapshot(),
            "pool_on_loop": on_loop,
            "requests_waiting": len(self._waiting),
            **self._stats.snapshot(),
        }

    def pop_stats(self) -> dict[str, int]:
        """Like :meth:`get_stats`, then reset the counters."""
        stats = self.get_stats()
        self._stats.reset()
        return stats

    def __repr__(self) -> str:
        ledger = self._ledger
        state = "closed" if self.closed else ("open" if self._opened else "not open")
        return (
            f"<AsyncConnectionPool {self.name!r} {self._target} [{state}, io={self.io}] | "
            f"Requests: {ledger.lent_count} active, {len(self._waiting)} queued | "
            f"Connections: {ledger.idle_count} idle, {ledger.lent_count} in use, "
            f"{ledger.opening_count} opening, {ledger.returning_count} returning, max {ledger.maxconn}>"
        )


def _orphan_recorder(slot: Slot, orphans: list[Slot]) -> Callable[[weakref.ref[Any]], None]:
    """The callback of the weak reference to ``slot``'s borrower (made once per slot)."""

    def dropped(ref: weakref.ref[Any]) -> None:
        # Any thread, any time (garbage collection): only record it.
        if slot.holder is ref:
            orphans.append(slot)

    return dropped


def _close_slots_off_loop(slots: list[Slot]) -> None:
    """Let each connection go from its runner, then close them all in a thread."""
    AsyncConnectionPool._close_off_loop(_let_go(slots))


def _let_go(slots: list[Slot]) -> list[PGConnection]:
    """The connections of ``slots``, each let go by its loop-native runner (no
    longer watched by the loop) before a thread closes it."""
    raws = []
    for slot in slots:
        if slot.runner is not None:
            native.release(slot.raw)
        raws.append(slot.raw)
    return raws


async def _back_pressure(done: anyio.Event | None) -> None:
    """Wait for a return the pool is finishing. Shielded from anyio cancellation,
    so a block cancelled by a scope exits with its connection already clean; a
    native ``task.cancel()`` can cut this wait, never the return itself."""
    if done is not None:
        with anyio.CancelScope(shield=True):
            await done.wait()


def _timeout_error(
    name: str, ledger: Ledger, stats: PoolStats, opener: Opener, telemetry: PoolTelemetry
) -> Callable[[Waiter], BaseException]:
    """The deadline task's error for a waiter; holds no reference to the pool."""

    def error(waiter: Waiter) -> BaseException:
        stats.requests_errors += 1
        telemetry.timed_out()
        exc = PoolTimeout(
            f"couldn't get a connection after {waiter.timeout:.2f} sec (pool {name!r}: "
            f"{ledger.lent_count} in use, {ledger.opening_count} opening, max {ledger.maxconn})"
        )
        exc.__cause__ = opener.last_error
        return exc

    return error
