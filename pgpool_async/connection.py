"""The async face of one pooled psycopg2 connection.

An :class:`AsyncConnection` is lent by :class:`~pgpool_async.AsyncConnectionPool`.
Its statements run on the event loop (the pool's ``io="auto"``, see
:mod:`pgpool_async._loop.native`), other database calls in one of the pool's
worker threads, one at a time per connection (psycopg2 allows a connection, never
a cursor, to move between threads). Once the connection is back in the pool the
object is cut loose from it (asyncpg's detached proxy): every further use raises
:class:`~pgpool_async.errors.ConnectionReleased`.

Everything that runs a call on the connection goes through its :class:`Loan`:
the small interface that :mod:`~pgpool_async.cursor`,
:mod:`~pgpool_async.copying` and :mod:`~pgpool_async.notifications` use. A loan
decides where each call runs: on the loop (the connection's loop-native runner)
or in the pool's worker threads.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg2.extensions import connection as PGConnection

from . import copying, notifications
from ._loan import RELEASED, Loan
from ._loop import failover, txpooling
from ._thread import blocking
from ._thread.blocking import Params
from ._thread.offload import Offloader
from .cursor import AsyncCursor, Transaction
from .errors import ConnectionReleased

if TYPE_CHECKING:
    from psycopg2.sql import Composable

    from ._loop.ledger import Slot
    from .notifications import Notifies

__all__ = ["AsyncConnection", "Loan", "Params"]

T = TypeVar("T")


class AsyncConnection:
    """A pooled connection; no call blocks the event loop (statements run on it
    without blocking, everything else in worker threads).

    Calls on one connection run one at a time, in call order. After the
    connection is returned (``putconn`` or the end of ``async with
    pool.connection()``), any use raises :class:`ConnectionReleased`.
    """

    __slots__ = ("__weakref__", "_loan", "_pool", "_slot", "key", "lent_at")

    def __init__(self, pool: Any, slot: Slot, offload: Offloader, io: str = "thread") -> None:
        self._pool = pool
        self._slot: Slot | None = slot
        self._loan: Loan | None = Loan(slot.raw, offload, io, slot.runner, pool._fit, pool._telemetry)
        self.key: Hashable = slot.key
        self.lent_at = slot.lent_at  # (time.monotonic(), set as the ledger lent it)

    @property
    def loan(self) -> Loan:
        """This loan's calls and state (see :class:`Loan`).

        :raises ConnectionReleased: the connection went back to the pool.
        """
        loan = self._loan
        if loan is None:
            raise ConnectionReleased(RELEASED)
        return loan

    @property
    def raw(self) -> PGConnection:
        """The psycopg2 connection. Touch it only in a worker thread (see :meth:`run_sync`).

        :raises ConnectionReleased: the connection went back to the pool.
        """
        return self.loan.raw

    @property
    def pool(self) -> Any:
        """The pool that lent this connection."""
        return self._pool

    @property
    def released(self) -> bool:
        """True once the connection is back in its pool."""
        return self._loan is None

    @property
    def closed(self) -> bool:
        """True if released, or if the underlying connection is closed."""
        return self._loan is None or bool(self._loan.raw.closed)

    def _detach(self) -> tuple[Slot, Loan]:
        """Cut this object loose from its connection (the pool's return path).

        :raises ConnectionReleased: already returned.
        """
        slot, loan = self._slot, self._loan
        if slot is None or loan is None:
            raise ConnectionReleased(RELEASED)
        self._slot = self._loan = None
        loan.detached = True  # cursors and iterators still holding it refuse too
        return slot, loan

    async def run_sync(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(raw_connection, *args)`` in a worker thread and return its result.

        The escape hatch for any psycopg2 code: cursors created inside ``func``
        must not escape it. ``func`` may call back into the event loop with
        ``anyio.from_thread.run``. Cancelling the caller waits for ``func`` to
        finish (a thread cannot be interrupted), then raises the cancellation.
        """
        return await self.loan.call_user(func, *args)

    # The statement methods are counted until awaited (Loan.statement: a block
    # ending with one never awaited raises); a released connection raises when
    # they are called.

    def execute(self, sql: str | Composable, params: Params = None) -> Coroutine[Any, Any, int]:
        """Execute a statement (``await`` it); returns the cursor's ``rowcount``."""
        return self.loan.statement("conn.execute", blocking.execute, sql, params)

    def fetchone(self, sql: str | Composable, params: Params = None) -> Coroutine[Any, Any, Any]:
        """Execute a query (``await`` it) and return its first row, or None."""
        return self.loan.statement("conn.fetchone", blocking.fetchone, sql, params)

    def fetchall(self, sql: str | Composable, params: Params = None) -> Coroutine[Any, Any, list[Any]]:
        """Execute a query (``await`` it) and return all its rows."""
        return self.loan.statement("conn.fetchall", blocking.fetchall, sql, params)

    def fetchval(self, sql: str | Composable, params: Params = None) -> Coroutine[Any, Any, Any]:
        """Execute a query (``await`` it) and return the first column of its first row, or None."""
        return self.loan.statement("conn.fetchval", blocking.fetchval, sql, params)

    def cursor(self, name: str | None = None, **kwargs: Any) -> AsyncCursor:
        """A cursor for ``async with conn.cursor() as cur``.

        ``name`` makes a server-side cursor that streams large results
        (``itersize`` rows per fetch); ``cursor_factory``, ``scrollable`` and
        ``withhold`` are psycopg2's. Creating a cursor does no I/O.

        :raises TransactionPoolingError: with ``transaction_pooling``, a WITH HOLD
            cursor, or a named cursor in autocommit mode.
        """
        loan = self.loan
        if self._pool.transaction_pooling:
            txpooling.check_cursor(loan.raw, name, kwargs)
        return AsyncCursor(loan, loan.raw.cursor(name, **kwargs))

    def transaction(self) -> Transaction:
        """``async with conn.transaction()``: commit on success, roll back on
        error; nested blocks are savepoints."""
        return Transaction(self.loan)

    async def set_session(self, **settings: Any) -> None:
        """psycopg2's ``set_session`` (``isolation_level``, ``readonly``,
        ``deferrable``, ``autocommit``), off the loop. Reset when the connection
        goes back to the pool.

        :raises TransactionPoolingError: with ``transaction_pooling``, ``readonly``,
            ``isolation_level`` or ``deferrable`` in autocommit mode (psycopg2 would
            send them as ``SET``); with autocommit off they apply per transaction.
        """
        loan = self.loan
        if self._pool.transaction_pooling:
            txpooling.check_set_session(loan.raw, settings)
        loan.session_changed = True
        await loan.call(lambda raw: raw.set_session(**settings))

    @property
    def autocommit(self) -> bool:
        """Whether the connection is in autocommit mode (set it with :meth:`set_session`)."""
        return bool(self.raw.autocommit)

    async def commit(self) -> None:
        """Commit the current transaction.

        :raises CommitOutcomeUnknown: the connection was lost during COMMIT (an
            ``OperationalError``): the transaction may or may not have committed.
        """
        loan = self.loan
        loan.first_error = None  # (the next transaction's first error is named)
        await loan.call(failover.commit)

    async def rollback(self) -> None:
        """Roll back the current transaction."""
        loan = self.loan
        loan.first_error = None
        await loan.call(PGConnection.rollback)

    # -- COPY and LISTEN/NOTIFY: the logic lives in copying.py and notifications.py

    async def copy_expert(self, sql: str | Composable, file: object, size: int = copying.DEFAULT_SIZE) -> int:
        """psycopg2's ``copy_expert``, streamed; ``file`` is sync or async (see
        :mod:`pgpool_async.copying`). Returns the row count.

        :raises PoolError: a psycopg2 wait callback is set (COPY can't run; nothing sent).
        :raises TypeError: ``file`` can be neither read nor written.
        """
        return await copying.copy_expert(self.loan, sql, file, size)

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
        return await copying.copy_from(self.loan, file, table, sep, null, size, columns)

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
        return await copying.copy_to(self.loan, file, table, sep, null, columns, size)

    def notifies(self, *, timeout: float | None = None, stop_after: int | None = None) -> Notifies:
        """``async for n in conn.notifies()``: notifications (``Notify``) awaited on the
        event loop, no thread; ``timeout``: stop after that many seconds without one;
        ``stop_after``: stop after that many. Use autocommit or commit first; waiting
        inside a transaction raises PoolError (see :mod:`pgpool_async.notifications`).

        :raises TransactionPoolingError: the pool has ``transaction_pooling``.
        """
        if self._pool.transaction_pooling:
            txpooling.check_listen()
        return notifications.Notifies(self.loan, timeout, stop_after)

    async def listen(self, channel: str) -> None:
        """``LISTEN channel`` (quoted, case-sensitive); commits unless autocommit or in
        ``transaction()``. The pool sends ``UNLISTEN *`` when the connection comes back.

        :raises TransactionPoolingError: the pool has ``transaction_pooling``.
        """
        if self._pool.transaction_pooling:
            txpooling.check_listen()
        await notifications.listen(self.loan, channel)

    async def unlisten(self, channel: str | None = None) -> None:
        """``UNLISTEN channel``, or ``UNLISTEN *``; commits like :meth:`listen`."""
        await notifications.unlisten(self.loan, channel)

    async def notify(self, channel: str, payload: str = "") -> None:
        """``pg_notify(channel, payload)``; commits like :meth:`listen`, so it is sent now."""
        await notifications.notify(self.loan, channel, payload)

    def __repr__(self) -> str:
        state = "released" if self._loan is None else f"key={self.key!r}"
        io = "loop" if self._loan is not None and self._loan.on_loop else "thread"
        name = getattr(self._pool, "name", "?")
        return f"<AsyncConnection {state} io={io} of {name!r}>"
