"""The async face of one pooled psycopg2 connection.

An :class:`AsyncConnection` is lent by :class:`~pgpool_async.AsyncConnectionPool`.
Each database call runs in one of the pool's worker threads, one at a time per
connection (psycopg2 allows a connection, never a cursor, to move between
threads). Once the connection is back in the pool the object refuses every
further use with :class:`~pgpool_async.errors.ConnectionReleased`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import psycopg2
import psycopg2.extensions
from psycopg2.extensions import connection as PGConnection

from . import copying, notifications
from ._loop.native import LoopStatementRunner, Result
from .cursor import AsyncCursor, Transaction
from .errors import ConnectionReleased

if TYPE_CHECKING:
    from psycopg2.sql import Composable

    from .notifications import Notifies
    from .pool import AsyncConnectionPool

__all__ = ["AsyncConnection", "Params", "run_and_commit"]

T = TypeVar("T")
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
Params = Sequence[Any] | dict[str, Any] | None


def execute_sync(raw: PGConnection, sql: str, params: Params) -> int:
    with raw.cursor() as cur:
        cur.execute(sql, params)
        rowcount: int = cur.rowcount
        return rowcount


def fetchone_sync(raw: PGConnection, sql: str, params: Params) -> Any:
    with raw.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def fetchall_sync(raw: PGConnection, sql: str, params: Params) -> list[Any]:
    with raw.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def fetchval_sync(raw: PGConnection, sql: str, params: Params) -> Any:
    with raw.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    if row is None:
        return None
    # RealDictCursor rows are dicts: take the first column either way.
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def _rowcount(result: Result) -> int:
    return result.rowcount


def _check_rows(result: Result) -> list[Any]:
    if result.description is None:
        raise psycopg2.ProgrammingError("no results to fetch")  # psycopg2's words
    return result.rows


def _first_row(result: Result) -> Any:
    rows = _check_rows(result)
    return rows[0] if rows else None


def _all_rows(result: Result) -> list[Any]:
    return _check_rows(result)


def _first_value(result: Result) -> Any:
    rows = _check_rows(result)
    return rows[0][0] if rows else None


def run_and_commit(raw: PGConnection, func: Callable[..., T], *args: Any) -> T:
    """``func(raw, *args)``, then commit if it left a transaction open: one thread hop."""
    result = func(raw, *args)
    if raw.get_transaction_status() != _STATUS_IDLE:
        raw.commit()
    return result


def _cancel_quietly(raw: PGConnection) -> None:
    with contextlib.suppress(Exception):
        raw.cancel()


class _OneAtATime:
    """Runs the calls on one connection one at a time, in call order.

    Lives on the event loop thread only; free when uncontended (no event, no
    checkpoint). A waiter cancelled after being handed the turn passes it on.
    """

    __slots__ = ("_busy", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._waiters: deque[anyio.Event] = deque()

    def locked(self) -> bool:
        return self._busy

    async def __aenter__(self) -> None:
        if not self._busy:
            self._busy = True
            return
        turn = anyio.Event()
        self._waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self._release()  # handed the turn while being cancelled
            else:
                self._waiters.remove(turn)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the turn passes on; still busy
        else:
            self._busy = False


class AsyncConnection:
    """A pooled connection; every call runs off the event loop.

    Calls on one connection run one at a time, in call order. After the
    connection is returned (``putconn`` or the end of ``async with
    pool.connection()``), any use raises :class:`ConnectionReleased`.
    """

    __slots__ = (
        "__weakref__",
        "_listened",
        "_lock",
        "_pool",
        "_raw",
        "_runner",
        "_session_changed",
        "_tx_depth",
        "key",
        "leak_reported",
        "lent_at",
        "taken_at",
    )

    def __init__(self, pool: AsyncConnectionPool, raw: PGConnection, key: Hashable) -> None:
        self._raw: PGConnection | None = raw
        self._pool = pool
        self._lock = _OneAtATime()
        self.key = key
        self.lent_at = time.monotonic()
        self._tx_depth = 0
        self._session_changed = False
        self._listened = False
        self._runner: LoopStatementRunner | None = None  # the loop-native path, when in use
        self.taken_at: traceback.StackSummary | None = None  # with leak_threshold
        self.leak_reported = False

    @property
    def raw(self) -> PGConnection:
        """The psycopg2 connection. Touch it only in a worker thread (see :meth:`run_sync`).

        :raises ConnectionReleased: the connection went back to the pool.
        """
        raw = self._raw
        if raw is None:
            raise ConnectionReleased(
                "this connection was returned to the pool and can't be used anymore: "
                "take a new one with pool.connection() or pool.getconn()"
            )
        return raw

    @property
    def pool(self) -> AsyncConnectionPool:
        """The pool that lent this connection."""
        return self._pool

    @property
    def released(self) -> bool:
        """True once the connection is back in its pool."""
        return self._raw is None

    @property
    def closed(self) -> bool:
        """True if released, or if the underlying connection is closed."""
        return self._raw is None or bool(self._raw.closed)

    async def run_sync(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(raw_connection, *args)`` in a worker thread and return its result.

        The escape hatch for any psycopg2 code: cursors created inside ``func``
        must not escape it. ``func`` may call back into the event loop with
        ``anyio.from_thread.run``. Cancelling the caller waits for ``func`` to
        finish (a thread cannot be interrupted), then raises the cancellation.
        """
        raw = self.raw
        async with self._lock:
            await self._leave_loop()
            return await self._pool._offload.run_anyio(func, raw, *args)

    async def _run_sync_cancellable(
        self, func: Callable[..., T], *args: Any, on_cancel: Callable[[], object]
    ) -> T:
        """:meth:`run_sync`, calling ``on_cancel()`` on the loop as soon as the
        caller is cancelled (the thread is still waited for)."""
        raw = self.raw
        async with self._lock:
            await self._leave_loop()
            return await self._pool._offload.run_anyio(func, raw, *args, on_cancel=on_cancel)

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        """:meth:`run_sync` for the pool's own calls, which never call back into
        the loop: the fast path (see :mod:`pgpool_async.offload`)."""
        raw = self.raw
        async with self._lock:
            await self._leave_loop()
            return await self._pool._offload.run(func, raw, *args, on_cancel=self._cancel_query)

    # -- the loop-native path (pool option io="auto"/"loop"; see pgpool_async._loop.native)

    def _loop_runner(self, raw: PGConnection) -> LoopStatementRunner | None:
        """The runner to use for a statement now, entered; None: use a thread.
        Call with the lock held."""
        runner = self._runner
        if runner is not None and runner.entered:
            return runner
        if self._pool.io == "thread" or raw.cursor_factory is not None or type(raw) is not PGConnection:
            # Rows of other cursor factories are built by psycopg2 only, and a
            # connection subclass (e.g. LoggingConnection) expects its own cursor() to run.
            return None
        if runner is None:
            runner = self._runner = LoopStatementRunner(raw)
        if runner.refusal() is not None:
            return None  # e.g. psycopg2 holds a transaction: threads until it ends
        runner.enter()
        return runner

    async def _leave_loop(self) -> None:
        """Before psycopg2 code runs: hand the connection back to psycopg2 (a
        transaction opened on the loop is handed over too). Lock held."""
        runner = self._runner
        if runner is not None and runner.entered:
            await runner.leave(to_thread=self._pool._offload.run_anyio)

    async def _statement(
        self, sync: Callable[..., T], shape: Callable[[Result], T], sql: str, params: Params
    ) -> T:
        raw = self.raw
        async with self._lock:
            runner = self._loop_runner(raw)
            if runner is None:
                return await self._pool._offload.run(sync, raw, sql, params, on_cancel=self._cancel_query)
            return shape(await runner.execute(sql, params))

    async def _statement_and_commit(
        self, sync: Callable[..., T], shape: Callable[[Result], T], sql: str, params: Params
    ) -> T:
        """The pool's one-hop helpers: the statement, then commit. On the loop
        path ``BEGIN; statement`` go out together, and for ``execute`` the
        ``COMMIT`` too (one round trip)."""
        raw = self.raw
        async with self._lock:
            runner = self._loop_runner(raw)
            if runner is None:
                return await self._pool._offload.run(
                    run_and_commit, raw, sync, sql, params, on_cancel=self._cancel_query
                )
            if shape is _rowcount:
                # Nothing can fail after the statement: COMMIT goes in the same packet.
                return shape(await runner.execute(sql, params, commit=True))
            # fetch* raise on a statement without rows, and then must not commit.
            value = shape(await runner.execute(sql, params))
            await runner.commit()
            return value

    async def _loop_give_back(self) -> None:
        """Before the pool takes the connection back: end a transaction left open
        on the loop path (the pool would roll it back anyway), then leave."""
        runner = self._runner
        if runner is None or not runner.entered:
            return
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if runner.entered and runner.in_transaction:
                    with anyio.move_on_after(runner.cancel_grace * 2):
                        await runner.rollback()
                if runner.entered and runner.in_transaction:
                    runner.close()  # the rollback did not happen: never reuse it
                await runner.leave()

    def _cancel_query(self) -> None:
        """The caller was cancelled mid-call: ask the server to cancel the
        running statement, so the worker thread (and the caller) are free soon.
        The request opens its own connection, so it runs in a thread of its own."""
        raw = self._raw
        if raw is not None and not raw.closed:
            threading.Thread(target=_cancel_quietly, args=(raw,), name="pgpool-cancel", daemon=True).start()

    async def execute(self, sql: str, params: Params = None) -> int:
        """Execute a statement; returns the cursor's ``rowcount``."""
        return await self._statement(execute_sync, _rowcount, sql, params)

    async def fetchone(self, sql: str, params: Params = None) -> Any:
        """Execute a query and return its first row, or None."""
        return await self._statement(fetchone_sync, _first_row, sql, params)

    async def fetchall(self, sql: str, params: Params = None) -> list[Any]:
        """Execute a query and return all its rows."""
        return await self._statement(fetchall_sync, _all_rows, sql, params)

    async def fetchval(self, sql: str, params: Params = None) -> Any:
        """Execute a query and return the first column of its first row, or None."""
        return await self._statement(fetchval_sync, _first_value, sql, params)

    def cursor(self, name: str | None = None, **kwargs: Any) -> AsyncCursor:
        """A cursor for ``async with conn.cursor() as cur``.

        ``name`` makes a server-side cursor that streams large results
        (``itersize`` rows per fetch); ``cursor_factory``, ``scrollable`` and
        ``withhold`` are psycopg2's. Creating a cursor does no I/O.
        """
        return AsyncCursor(self, self.raw.cursor(name, **kwargs))

    def transaction(self) -> Transaction:
        """``async with conn.transaction()``: commit on success, roll back on
        error; nested blocks are savepoints."""
        return Transaction(self)

    async def set_session(self, **settings: Any) -> None:
        """psycopg2's ``set_session`` (``isolation_level``, ``readonly``,
        ``deferrable``, ``autocommit``), off the loop. Reset when the connection
        goes back to the pool."""
        self._session_changed = True
        await self._call(lambda raw: raw.set_session(**settings))

    @property
    def autocommit(self) -> bool:
        """Whether the connection is in autocommit mode (set it with :meth:`set_session`)."""
        return bool(self.raw.autocommit)

    async def commit(self) -> None:
        """Commit the current transaction."""
        if not await self._on_loop("commit"):
            await self._call(PGConnection.commit)

    async def rollback(self) -> None:
        """Roll back the current transaction."""
        if not await self._on_loop("rollback"):
            await self._call(PGConnection.rollback)

    async def _on_loop(self, what: str) -> bool:
        """commit/rollback on the loop path if it holds the connection; False: not."""
        runner = self._runner
        if runner is None or not runner.entered:
            return False
        async with self._lock:
            if not runner.entered:
                return False
            await (runner.commit() if what == "commit" else runner.rollback())
            return True

    # -- COPY and LISTEN/NOTIFY: the logic lives in copying.py and notifications.py

    async def copy_expert(self, sql: str | Composable, file: object, size: int = copying.DEFAULT_SIZE) -> int:
        """psycopg2's ``copy_expert``, streamed; ``file`` is sync or async (see
        :mod:`pgpool_async.copying`). Returns the row count.

        :raises PoolError: a psycopg2 wait callback is set (COPY can't run; nothing sent).
        :raises TypeError: ``file`` can be neither read nor written.
        """
        return await copying.copy_expert(self, sql, file, size)

    async def copy_from(
        self,
        file: object,
        table: str,
        sep: str = "\t",
        null: str = "\\N",
        size: int = copying.DEFAULT_SIZE,
        columns: Iterable[str] | None = None,
    ) -> int:
        """psycopg2's ``copy_from`` from a sync or async file, streamed; returns the row count.

        :raises PoolError: a psycopg2 wait callback is set (nothing sent).
        :raises TypeError: ``file`` can't be read.
        """
        return await copying.copy_from(self, file, table, sep, null, size, columns)

    async def copy_to(
        self,
        file: object,
        table: str,
        sep: str = "\t",
        null: str = "\\N",
        columns: Iterable[str] | None = None,
        size: int = copying.DEFAULT_SIZE,
    ) -> int:
        """psycopg2's ``copy_to`` into a sync or async file (``size``: chunk size
        for an async one), streamed; returns the row count.

        :raises PoolError: a psycopg2 wait callback is set (nothing sent).
        :raises TypeError: ``file`` can't be written.
        """
        return await copying.copy_to(self, file, table, sep, null, columns, size)

    def notifies(self, *, timeout: float | None = None, stop_after: int | None = None) -> Notifies:
        """``async for n in conn.notifies()``: notifications (``Notify``) awaited on the
        event loop, no thread; ``timeout``: stop after that many seconds without one;
        ``stop_after``: stop after that many. Use autocommit or commit first; waiting
        inside a transaction raises PoolError (see :mod:`pgpool_async.notifications`).
        """
        return notifications.Notifies(self, timeout, stop_after)

    async def listen(self, channel: str) -> None:
        """``LISTEN channel`` (quoted, case-sensitive); commits unless autocommit or in
        ``transaction()``. It outlives the loan: :meth:`unlisten` before returning."""
        await notifications.listen(self, channel)

    async def unlisten(self, channel: str | None = None) -> None:
        """``UNLISTEN channel``, or ``UNLISTEN *``; commits like :meth:`listen`."""
        await notifications.unlisten(self, channel)

    async def notify(self, channel: str, payload: str = "") -> None:
        """``pg_notify(channel, payload)``; commits like :meth:`listen`, so it is sent now."""
        await notifications.notify(self, channel, payload)

    def _release(self) -> PGConnection:
        """Detach from the psycopg2 connection (the pool calls this on return)."""
        raw = self.raw
        self._raw = None
        return raw

    async def _idle(self) -> None:
        """Wait for a call still running on this connection to end."""
        if self._lock.locked():
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    pass

    def __repr__(self) -> str:
        state = "released" if self._raw is None else f"key={self.key!r}"
        io = "loop" if self._runner is not None and self._runner.entered else "thread"
        return f"<AsyncConnection {state} io={io} of {self._pool.name!r}>"
