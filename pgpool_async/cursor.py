"""Async cursors and transactions on a lent connection.

A client-side cursor holds its whole result in memory once ``execute`` returns,
so its fetches run on the event loop with no thread hop. With the pool's
``io="auto"``, a plain client-side cursor's ``execute``/``executemany`` run on
the loop too (:mod:`pgpool_async._loop.native`): the result is then held here,
not in the psycopg2 cursor (``raw``). A named (server-side) cursor fetches from
the server: each fetch runs in a worker thread, ``itersize`` rows at a time
when iterated, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio.lowlevel
import psycopg2
from psycopg2.extensions import connection as PGConnection
from psycopg2.extensions import cursor as PGCursor

from ._loan import Loan, run_cursor_method
from ._loop import failover
from ._loop.native import Result
from ._telemetry import is_plain_cursor_class
from ._thread.blocking import Params, cursor_execute, execute
from .errors import PoolError

__all__ = ["AsyncCursor", "Transaction"]

T = TypeVar("T")


class AsyncCursor:
    """A psycopg2 cursor whose network calls run off the event loop.

    Use it as ``async with conn.cursor() as cur``; it must not outlive the
    connection's loan. Attributes psycopg2 users read (``rowcount``,
    ``description``, ``query``, ``statusmessage``, ``rownumber``,
    ``lastrowid``, ``itersize``, ``arraysize``) pass through, or come from the
    result of a statement that ran on the loop.
    """

    __slots__ = ("_cur", "_loan", "_pos", "_result")

    def __init__(self, loan: Loan, cur: PGCursor) -> None:
        self._loan = loan
        self._cur = cur
        # The last statement's result when it ran on the event loop (else None:
        # the psycopg2 cursor holds it), and the next row's index in it.
        self._result: Result | None = None
        self._pos = 0

    @property
    def raw(self) -> PGCursor:
        """The psycopg2 cursor (use it only in a worker thread). After a
        statement that ran on the loop it does not hold that result."""
        return self._cur

    @property
    def server_side(self) -> bool:
        """True for a named cursor: its fetches talk to the server."""
        return self._cur.name is not None

    def __getattr__(self, name: str) -> Any:
        result = self._result
        if result is not None and name in _FROM_RESULT:
            if name == "rownumber":
                return self._pos
            return getattr(result, name)
        if name in (
            "rowcount",
            "description",
            "query",
            "statusmessage",
            "rownumber",
            "itersize",
            "arraysize",
            "closed",
            "lastrowid",
            "name",
        ):
            return getattr(self._cur, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("itersize", "arraysize"):
            setattr(self._cur, name, value)
        else:
            object.__setattr__(self, name, value)

    async def _io(self, func: Callable[..., T], *args: Any) -> T:
        self._result = None  # the psycopg2 cursor holds what comes next
        return await self._loan.call(lambda _raw: func(*args))

    async def _io_statement(self, sql: Any, func: Callable[..., T], *args: Any) -> T:
        """:meth:`_io` for a statement (``sql``: its text, for the span and the per-path count)."""
        self._result = None
        return await self._loan.call_statement(sql, lambda _raw: func(*args))

    @property
    def _on_loop_ok(self) -> bool:
        # Rows of other cursor classes (RealDictCursor...) are built by psycopg2 only.
        # (OpenTelemetry's TracedCursorFactory over a plain cursor too: the pool makes its spans.)
        return self._loan.io != "thread" and is_plain_cursor_class(type(self._cur)) and self._cur.name is None

    def _check_open(self) -> None:
        if self._cur.closed:
            raise psycopg2.InterfaceError("cursor already closed")  # psycopg2's words

    async def _loop_execute(self, sql: str, params: Params) -> Result | None:
        """One statement through the loan: its result when it ran on the loop,
        None when it ran in a thread (the psycopg2 cursor holds its outcome)."""
        self._check_open()
        before = self._result
        self._result = None
        loan = self._loan
        try:
            return await loan.call(cursor_execute, self._cur, sql, params)
        except Exception as exc:
            if loan.last_on_loop:
                self._after_failure(before, sql, params, exc)
            raise

    def _state(self, before: Result | None) -> _Described:
        """A copy of what this cursor shows now (``before``: the loop path's last
        result, whose rows stay fetchable; None: the psycopg2 cursor's own)."""
        shown: Any = self._cur if before is None else before
        state = _Described([], shown.rowcount, shown.statusmessage, shown.lastrowid, None)
        state.query, state.described = shown.query, shown.description
        state.returns_rows = state.described is not None if before is None else before.returns_rows
        state.source = before
        return state

    def _after_failure(self, before: Result | None, sql: str, params: Params, exc: BaseException) -> None:
        """What psycopg2's cursor shows after ``execute`` raised ``exc``: when the
        statement never left (its parameters could not be adapted, an empty
        query) only ``query`` is cleared; when it was sent, the query, no rows,
        ``rowcount`` -1, and an empty status from the server's error (None when
        the connection failed instead)."""
        try:
            query: bytes | None = self._cur.mogrify(sql, params)
        except Exception:  # (the same error as the one raised: it was never sent)
            query = None
        if not query:
            state = self._state(before)
            state.query = None
            self._result = state
            return
        lost = isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and exc.pgcode is None
        failed = Result([], -1, None if lost else "", 0, None)
        failed.query = query
        self._result = failed
        self._pos = 0

    def execute(self, sql: str, params: Params = None) -> Coroutine[Any, Any, None]:
        """Execute a statement (``await`` it): on the event loop (``io="auto"``, a
        plain client-side cursor), else in a worker thread. A block that ends
        while one was never awaited raises :class:`~pgpool_async.StatementNotAwaited`."""
        self._loan.count_statement("cursor.execute")
        return self._execute(sql, params)

    async def _execute(self, sql: str, params: Params) -> None:
        self._loan.unawaited -= 1
        if not self._on_loop_ok:
            self._result = None  # the psycopg2 cursor holds what comes next
            await self._loan.call(run_cursor_method, self._cur.execute, sql, params)
            return
        self._result = await self._loop_execute(sql, params)
        self._pos = 0

    def executemany(self, sql: str, seq: Iterable[Params]) -> Coroutine[Any, Any, None]:
        """Execute a statement once per parameter set (``await`` it; one round trip
        each, as psycopg2 does; ``rowcount`` is their sum): on the event loop
        (``io="auto"``, a plain client-side cursor), else in one worker-thread call."""
        self._loan.count_statement("cursor.executemany")
        return self._executemany(sql, seq)

    async def _executemany(self, sql: str, seq: Iterable[Params]) -> None:
        self._loan.unawaited -= 1
        if not self._on_loop_ok:
            self._result = None
            await self._loan.call(run_cursor_method, self._cur.executemany, sql, list(seq))
            return
        self._check_open()  # (an empty seq too, as psycopg2)
        total = 0
        last: Result | None = None
        status: str | None = None
        seq = list(seq)
        if not seq:
            self._nothing_executed()
            return
        # psycopg2 shows rowcount -1 until every statement has run, then their sum;
        # a failure part-way leaves what the last statement left.
        state = self._state(self._result)
        state.rowcount = -1
        self._result = state
        for params in seq:
            # None: it ran in a thread (the loan can't use the loop just now): the
            # psycopg2 cursor has its outcome.
            last = await self._loop_execute(sql, params)
            if last is not None:
                self._result = self._no_rows(last)
            count = self._cur.rowcount if last is None else last.rowcount
            status = self._cur.statusmessage if last is None else last.statusmessage
            # psycopg2's sum: -1 (unknown) once any statement's count is unknown.
            total = -1 if count == -1 or total == -1 else total + count
        # psycopg2: no rows to fetch after executemany; rowcount the sum.
        self._result = Result([], total, status, 0 if last is None else last.lastrowid, None)
        self._result.query = self._cur.query if last is None else last.query
        self._pos = 0

    @staticmethod
    def _no_rows(result: Result) -> Result:
        """``result`` as one statement of ``executemany`` leaves it: nothing to fetch."""
        done = Result([], result.rowcount, result.statusmessage, result.lastrowid, None)
        done.query = result.query
        return done

    def _nothing_executed(self) -> None:
        """psycopg2's ``executemany`` with no parameter sets: ``rowcount`` 0,
        the rest as the last statement left it, no rows left to fetch."""
        state = self._state(self._result)
        state.rows, state.rowcount, state.source = [], 0, None
        self._result = state
        self._pos = 0

    def callproc(self, name: str, params: Params = None) -> Coroutine[Any, Any, Any]:
        """Call a stored procedure or function (``await`` it)."""
        self._loan.count_statement("cursor.callproc")
        return self._callproc(name, params)

    async def _callproc(self, name: str, params: Params) -> Any:
        self._loan.unawaited -= 1
        return await self._io_statement(name, self._cur.callproc, name, params)

    async def scroll(self, value: int, mode: Literal["relative", "absolute"] = "relative") -> None:
        """Move in the result as psycopg2's ``scroll``: locally for a client-side
        cursor (``ProgrammingError`` out of bounds, nothing moved), with ``MOVE``
        on the server (a worker thread) for a named one."""
        result = self._result
        if result is None:
            if self.server_side:
                await self._io(self._cur.scroll, value, mode)
            else:
                self._cur.scroll(value, mode)
            return
        self._check_open()
        if mode == "relative":
            position = self._pos + value
        elif mode == "absolute":
            position = value
        else:
            raise psycopg2.ProgrammingError("scroll mode must be 'relative' or 'absolute'")
        if position < 0 or position >= result.rowcount:
            raise psycopg2.ProgrammingError("scroll destination out of bounds")
        self._pos = position

    def mogrify(self, sql: str, params: Params = None) -> bytes:
        """The query as it would be sent; no I/O."""
        result: bytes = self._cur.mogrify(sql, params)
        return result

    def _take(self, size: int) -> list[Any] | None:
        """The next ``size`` rows of the loop path's result (negative: all that are
        left), converted now, as psycopg2's fetches convert them: a row whose value
        a typecaster refuses raises, and the position moves past it. None: more
        rows than one slice, for :meth:`_take_in_slices`."""
        result = self._result
        assert result is not None
        self._check_open()
        if not result.returns_rows:
            result.rowcount = -1  # (as psycopg2's fetch* leave it)
            raise psycopg2.ProgrammingError("no results to fetch")  # psycopg2's words
        start = self._pos
        end = result.count()
        stop = end if size < 0 else min(start + size, end)
        if stop - start > _SLICE:
            return None
        rows: list[Any] = []
        try:
            result.fetch(start, stop, rows)
        except Exception:
            self._pos = start + len(rows) + 1  # past the row that failed, as psycopg2
            raise
        self._pos = stop
        return rows

    async def _take_in_slices(self, size: int) -> list[Any]:
        """:meth:`_take` for many rows: a slice at a time, letting the loop run between."""
        rows: list[Any] = []
        while True:
            taken = self._take(_SLICE if size < 0 else min(size - len(rows), _SLICE))
            assert taken is not None
            rows += taken
            if not taken or (size >= 0 and len(rows) >= size):
                return rows
            await anyio.lowlevel.checkpoint()  # (cancelled here: the rows taken are gone)

    async def fetchone(self) -> Any:
        """The next row, or None."""
        if self._result is not None:
            rows = self._take(1)
            return rows[0] if rows else None
        if self.server_side:
            return await self._io(self._cur.fetchone)
        return self._cur.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        """The next ``size`` rows (default ``arraysize``; a negative size: all
        that are left, as psycopg2)."""
        size = self._cur.arraysize if size is None else size
        if self._result is not None:
            rows = self._take(size)
            return rows if rows is not None else await self._take_in_slices(size)
        if self.server_side:
            return await self._io(self._cur.fetchmany, size)
        return self._cur.fetchmany(size)

    async def fetchall(self) -> list[Any]:
        """All remaining rows (a server-side cursor: all of them in memory, so
        prefer ``async for``)."""
        if self._result is not None:
            rows = self._take(-1)
            return rows if rows is not None else await self._take_in_slices(-1)
        if self.server_side:
            return await self._io(self._cur.fetchall)
        return self._cur.fetchall()

    async def __aiter__(self) -> AsyncIterator[Any]:
        """Rows one by one; a server-side cursor fetches ``itersize`` at a time."""
        size = self._cur.itersize if self.server_side else max(self._cur.arraysize, 1000)
        while rows := await self.fetchmany(size):
            for row in rows:
                yield row

    async def close(self) -> None:
        """Close the cursor (a server-side one tells the server)."""
        if self._cur.closed:
            return
        if self.server_side and not self._loan.detached and not self._loan.raw.closed:
            await self._io(self._cur.close)
        else:
            self._cur.close()

    async def __aenter__(self) -> AsyncCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Described(Result):
    """A :class:`Result` whose ``description`` is given (psycopg2 keeps the last
    one through an ``executemany`` that ran nothing)."""

    __slots__ = ("described", "source")
    described: Any
    source: Result | None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.source = None

    def fetch(self, start: int, stop: int, into: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        source = self.source
        return source.fetch(start, stop, into) if source is not None else super().fetch(start, stop, into)

    def count(self) -> int:
        source = self.source
        return source.count() if source is not None else len(self.rows)

    @property
    def description(self) -> Any:
        return self.described


_SLICE = 256  # rows converted between two chances for the loop to run

_FROM_RESULT = frozenset(("rowcount", "description", "query", "statusmessage", "rownumber", "lastrowid"))


class Transaction:
    """``async with conn.transaction()``: commit on success, roll back on error.

    The outermost block is the transaction; a nested block (or one entered
    while a transaction is already open) is a savepoint, released on success and
    rolled back to on error. In autocommit mode the outermost block sends BEGIN.
    """

    __slots__ = ("_explicit", "_loan", "_savepoint")

    def __init__(self, loan: Loan) -> None:
        self._loan = loan
        self._savepoint: str | None = None
        self._explicit = False

    async def __aenter__(self) -> Transaction:
        loan = self._loan
        loan.check()
        raw = loan.raw
        depth = loan.tx_depth
        if depth or raw.get_transaction_status() != 0:  # 0: TRANSACTION_STATUS_IDLE
            self._savepoint = f"pgpool_sp_{depth + 1}"
            await loan.call(execute, f"SAVEPOINT {self._savepoint}", None)
        elif raw.autocommit:
            self._explicit = True
            await loan.call(execute, "BEGIN", None)
        loan.tx_depth = depth + 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loan = self._loan
        loan.tx_depth -= 1
        if loan.detached:
            raise PoolError("the connection was returned to the pool inside a transaction block")
        if exc_type is None:
            try:
                # A statement never awaited, or a failed transaction: roll back, say so.
                loan.check_finished("the transaction() block")
            except PoolError as error:
                await self._undo()
                raise error from None
        if self._savepoint is not None:
            if exc_type is None:
                await loan.call(execute, f"RELEASE SAVEPOINT {self._savepoint}", None)
            else:
                await self._undo()
        elif exc_type is None:
            if self._explicit:
                await loan.call(failover.commit_sql, "COMMIT")  # CommitOutcomeUnknown if lost
            else:
                await loan.call(failover.commit)
            loan.first_error = None
        else:
            await self._undo()

    async def _undo(self) -> None:
        """Roll back this block: to its savepoint, or the whole transaction."""
        loan = self._loan
        if self._savepoint is not None:
            await loan.call(execute, f"ROLLBACK TO SAVEPOINT {self._savepoint}", None)
            await loan.call(execute, f"RELEASE SAVEPOINT {self._savepoint}", None)
        elif self._explicit:
            await loan.call(execute, "ROLLBACK", None)
        else:
            await loan.call(PGConnection.rollback)
        if self._savepoint is None:
            loan.first_error = None
