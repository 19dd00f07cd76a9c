"""The pools under test, each behind the same small interface.

An async contender (:class:`AsyncContender`) opens a pool, runs one *query
operation* (check out, query, return; commit when its mode is ``tx``), one
*checkout operation* (check out and return, no query), and can lend a
connection for as long as the caller likes (:meth:`AsyncContender.acquire`).
Query operations return the :func:`time.perf_counter` instant the connection was
obtained, or None when the API hides it.

:class:`ThreadsContender` is the plain synchronous baseline: psycopg2's own
``ThreadedConnectionPool`` used from OS threads.

Modes: ``tx`` means every query runs in a transaction (psycopg2's and psycopg 3's
default: BEGIN, query, COMMIT); ``autocommit`` means the query alone.

Peer libraries are imported when a contender opens, so a missing one only
fails its own rows.

The realistic workloads (:mod:`benchmarks.realistic`) call three more operations,
each written the way that library's documentation does it: :meth:`AsyncContender.row_by_key`,
:meth:`~AsyncContender.rows_range` and :meth:`~AsyncContender.write_tx` (``*_sync``
on :class:`ThreadsContender`); ``realistic`` names the ones a contender runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from time import perf_counter
from types import TracebackType
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import psycopg2
import psycopg2.extensions
import psycopg2.pool
from psycopg2.extras import Json

from .realistic import ALL as REALISTIC
from .realistic import INSERT_ROW, READS, ROW_BY_KEY, ROWS_RANGE, UPDATE_ROW, NewRow, asyncpg_init, numbered

__all__ = [
    "CONTENDERS",
    "AsyncContender",
    "NativeRunnerPool",
    "NativeRunnerPoolTx",
    "ContenderClass",
    "Contender",
    "PoolSpec",
    "ThreadsContender",
    "asyncpg_kwargs",
    "by_key",
    "select",
]

TX = "tx"
AUTOCOMMIT = "autocommit"


@dataclass(frozen=True)
class PoolSpec:
    """Where to connect and how many connections to keep (``minsize``) and allow (``maxsize``)."""

    dsn: str
    minsize: int
    maxsize: int
    #: asyncpg only: decode jsonb with ``json.loads`` (``init=``), as the realistic workloads need
    jsonb_codec: bool = False


def asyncpg_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg takes URIs only: turn a libpq DSN (either form) into its keywords."""
    params = psycopg2.extensions.parse_dsn(dsn)
    kwargs: dict[str, Any] = {}
    for libpq, ours in (("host", "host"), ("user", "user"), ("password", "password"), ("dbname", "database")):
        if libpq in params:
            kwargs[ours] = params[libpq]
    if "port" in params:
        kwargs["port"] = int(params["port"])
    return kwargs


def _fetchval(conn: Any, sql: str) -> Any:
    """The first column of the first row, on a psycopg2 connection (in a thread)."""
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    return None if row is None else row[0]


def _fetchone(conn: Any, sql: str, params: Sequence[Any]) -> Any:
    """One row, on a psycopg2 connection (in a thread)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def _fetchall(conn: Any, sql: str, params: Sequence[Any]) -> list[Any]:
    """Every row, on a psycopg2 connection (in a thread)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        rows: list[Any] = cur.fetchall()
    return rows


def _execute(conn: Any, sql: str, params: Sequence[Any]) -> None:
    """A statement without rows, on a psycopg2 connection (in a thread)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)


def psycopg2_params(row: NewRow) -> tuple[Any, ...]:
    """``INSERT_ROW``'s parameters for psycopg2 (and aiopg, pgpool_async): jsonb through ``Json``."""
    return (row.name, row.created, row.amount, row.ref, Json(row.payload), row.active, row.score)


ASYNCPG_ROW_BY_KEY = numbered(ROW_BY_KEY)
ASYNCPG_ROWS_RANGE = numbered(ROWS_RANGE)
ASYNCPG_INSERT_ROW = numbered(INSERT_ROW)
ASYNCPG_UPDATE_ROW = numbered(UPDATE_ROW)


class Contender(ABC):
    """What every contender tells about itself.

    ``representative`` marks one contender per library: it also runs the
    checkout, spike and memory workloads. ``overload`` marks those that run
    the overload workload, ``waiters`` those that run the waiters workload.
    """

    key: ClassVar[str]
    name: ClassVar[str]
    library: ClassVar[str]
    mode: ClassVar[str]
    representative: ClassVar[bool] = False
    overload: ClassVar[bool] = False
    waiters: ClassVar[bool] = False
    checkout_name: ClassVar[str] = ""
    note: ClassVar[str] = ""
    spike_rounds: ClassVar[int | None] = None
    checkout_sleep0: ClassVar[bool] = False
    #: the realistic workloads this contender runs (``row_by_key``, ``rows_100``, ``write_tx``)
    realistic: ClassVar[frozenset[str]] = frozenset()


class AsyncContender(Contender):
    """A pool used from asyncio tasks."""

    @abstractmethod
    async def open(self, spec: PoolSpec) -> None:
        """Create the pool and open ``spec.minsize`` connections."""

    @abstractmethod
    async def close(self) -> None:
        """Close the pool and all its connections."""

    @abstractmethod
    async def query(self, sql: str) -> float | None:
        """Check out, run ``sql`` and fetch its value, return; the instant of checkout."""

    @abstractmethod
    def acquire(self) -> AbstractAsyncContextManager[Any]:
        """Lend one connection for an ``async with`` block."""

    async def checkout(self) -> None:
        """Check a connection out and return it, nothing else."""
        async with self.acquire():
            pass

    # The realistic workloads: each returns what the library returned (rows, the new id).

    async def row_by_key(self, key: int) -> Any:
        """``realistic.ROW_BY_KEY``: one row."""
        raise NotImplementedError

    async def rows_range(self, first: int, last: int) -> Sequence[Any]:
        """``realistic.ROWS_RANGE``: the rows with ``first <= id <= last``."""
        raise NotImplementedError

    async def write_tx(self, row: NewRow) -> Any:
        """In one transaction: ``INSERT_ROW`` (``RETURNING id``), ``UPDATE_ROW`` on that id; commit."""
        raise NotImplementedError


# -- pgpool_async ---------------------------------------------------------------


class _PgpoolBase(AsyncContender):
    library = "pgpool_async"
    autocommit: ClassVar[bool] = False
    io: ClassVar[str | None] = None  # None: the pool's default (``"auto"``)

    def __init__(self) -> None:
        self.pool: Any = None

    async def open(self, spec: PoolSpec) -> None:
        from pgpool_async import AsyncConnectionPool

        self.pool = AsyncConnectionPool(
            spec.minsize, spec.maxsize, spec.dsn, autocommit=self.autocommit, io=self.io
        )
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        return self.pool.connection()  # type: ignore[no-any-return]

    # README's idioms: a connection() block (commit on a clean exit), conn.fetch*,
    # conn.transaction() (BEGIN in autocommit mode; otherwise the open transaction).

    async def row_by_key(self, key: int) -> Any:
        async with self.pool.connection() as conn:
            return await conn.fetchone(ROW_BY_KEY, (key,))

    async def rows_range(self, first: int, last: int) -> Sequence[Any]:
        async with self.pool.connection() as conn:
            return await conn.fetchall(ROWS_RANGE, (first, last))  # type: ignore[no-any-return]

    async def write_tx(self, row: NewRow) -> Any:
        async with self.pool.connection() as conn, conn.transaction():
            new_id = await conn.fetchval(INSERT_ROW, psycopg2_params(row))
            await conn.execute(UPDATE_ROW, (new_id,))
        return new_id


class PgpoolConnection(_PgpoolBase):
    """``async with pool.connection() as c: await c.fetchval(sql)``, default settings."""

    key = "pgpool"
    name = "pgpool_async connection()"
    mode = TX
    representative = True
    overload = True
    waiters = True
    checkout_name = "pgpool_async connection(): pass"
    checkout_sleep0 = True  # also measured with a sleep(0) after each (an extra yield per checkout)
    realistic = REALISTIC

    async def query(self, sql: str) -> float | None:
        async with self.pool.connection() as conn:
            acquired = perf_counter()
            await conn.fetchval(sql)
        return acquired


class PgpoolConnectionAutocommit(PgpoolConnection):
    """The same with ``AsyncConnectionPool(..., autocommit=True)``."""

    key = "pgpool-ac"
    name = "pgpool_async connection() autocommit"
    mode = AUTOCOMMIT
    autocommit = True
    representative = False
    waiters = False
    checkout_name = ""
    checkout_sleep0 = False


class PgpoolFetchval(_PgpoolBase):
    """``await pool.fetchval(sql)``: checkout, query, commit, return in one call."""

    key = "pgpool-fetchval"
    name = "pgpool_async pool.fetchval"
    mode = TX
    realistic = READS  # reads through pool.fetchone / pool.fetchall; writes as pgpool's

    async def query(self, sql: str) -> float | None:
        await self.pool.fetchval(sql)
        return None

    async def row_by_key(self, key: int) -> Any:
        return await self.pool.fetchone(ROW_BY_KEY, (key,))

    async def rows_range(self, first: int, last: int) -> Sequence[Any]:
        return await self.pool.fetchall(ROWS_RANGE, (first, last))  # type: ignore[no-any-return]


class PgpoolFetchvalAutocommit(PgpoolFetchval):
    """``pool.fetchval`` with ``autocommit=True``."""

    key = "pgpool-fetchval-ac"
    name = "pgpool_async pool.fetchval autocommit"
    mode = AUTOCOMMIT
    autocommit = True
    realistic = frozenset()  # pool.fetch* is one round trip in either mode


# A face over a ThreadedConnectionPool (AsyncConnectionPool.over): the engine's
# connections, shared with threads (none here: the face's own cost).


class PgpoolOverEngine(PgpoolConnection):
    """``AsyncConnectionPool.over(pgpool_async.ThreadedConnectionPool(...))``: checkout
    and clean return on the loop, under the engine's lock."""

    key = "pgpool-over"
    name = "pgpool_async over its ThreadedConnectionPool"
    overload = False
    waiters = False
    checkout_name = "pgpool_async over its ThreadedConnectionPool: pass"
    checkout_sleep0 = False
    realistic = frozenset()
    engine_class: ClassVar[str] = "pgpool_async"

    async def open(self, spec: PoolSpec) -> None:
        import anyio.to_thread
        import psycopg2.pool

        from pgpool_async import AsyncConnectionPool, ThreadedConnectionPool

        cls: Any = (
            ThreadedConnectionPool
            if self.engine_class == "pgpool_async"
            else psycopg2.pool.ThreadedConnectionPool
        )
        self.engine = await anyio.to_thread.run_sync(lambda: cls(spec.minsize, spec.maxsize, spec.dsn))
        self.pool = AsyncConnectionPool.over(self.engine, io=self.io)
        await self.pool.open()

    async def close(self) -> None:
        import anyio.to_thread

        await self.pool.close()
        await anyio.to_thread.run_sync(self.engine.closeall)


class PgpoolOverPsycopg2(PgpoolOverEngine):
    """``AsyncConnectionPool.over(psycopg2.pool.ThreadedConnectionPool(...))``: getconn
    and putconn in worker threads (psycopg2's may do I/O under its lock)."""

    key = "pgpool-over-psycopg2"
    name = "pgpool_async over psycopg2's ThreadedConnectionPool"
    checkout_name = "pgpool_async over psycopg2's ThreadedConnectionPool: pass"
    engine_class = "psycopg2"


# The old path, next to the default: one thread hop per statement.


class PgpoolConnectionThread(PgpoolConnection):
    """``connection()`` + ``fetchval`` with ``io="thread"``."""

    key = "pgpool-thread"
    name = 'pgpool_async connection() io="thread"'
    io = "thread"
    representative = False
    checkout_name = ""
    checkout_sleep0 = False


class PgpoolConnectionAutocommitThread(PgpoolConnectionAutocommit):
    """``connection()`` autocommit with ``io="thread"``."""

    key = "pgpool-ac-thread"
    name = 'pgpool_async connection() autocommit io="thread"'
    io = "thread"
    realistic = frozenset()


class PgpoolFetchvalThread(PgpoolFetchval):
    """``pool.fetchval`` with ``io="thread"``."""

    key = "pgpool-fetchval-thread"
    name = 'pgpool_async pool.fetchval io="thread"'
    io = "thread"
    realistic = frozenset()


class PgpoolFetchvalAutocommitThread(PgpoolFetchvalAutocommit):
    """``pool.fetchval`` autocommit with ``io="thread"``."""

    key = "pgpool-fetchval-ac-thread"
    name = 'pgpool_async pool.fetchval autocommit io="thread"'
    io = "thread"


# -- asyncpg ----------------------------------------------------------------------


class Asyncpg(AsyncContender):
    """``asyncpg.create_pool``; ``async with pool.acquire() as c: await c.fetchval(sql)``."""

    key = "asyncpg"
    name = "asyncpg pool"
    library = "asyncpg"
    mode = AUTOCOMMIT
    representative = True
    overload = True
    waiters = True
    checkout_name = "asyncpg acquire()+release"
    note = "its release runs a reset query (a round trip) by default"
    realistic = REALISTIC

    def __init__(self) -> None:
        self.pool: Any = None

    async def open(self, spec: PoolSpec) -> None:
        import asyncpg

        init = asyncpg_init if spec.jsonb_codec else None
        self.pool = await asyncpg.create_pool(
            min_size=spec.minsize, max_size=spec.maxsize, init=init, **asyncpg_kwargs(spec.dsn)
        )

    async def close(self) -> None:
        await self.pool.close()

    async def query(self, sql: str) -> float | None:
        async with self.pool.acquire() as conn:
            acquired = perf_counter()
            await conn.fetchval(sql)
        return acquired

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        return self.pool.acquire()  # type: ignore[no-any-return]

    async def row_by_key(self, key: int) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(ASYNCPG_ROW_BY_KEY, key)

    async def rows_range(self, first: int, last: int) -> Sequence[Any]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(ASYNCPG_ROWS_RANGE, first, last)  # type: ignore[no-any-return]

    async def write_tx(self, row: NewRow) -> Any:
        async with self.pool.acquire() as conn, conn.transaction():
            new_id = await conn.fetchval(
                ASYNCPG_INSERT_ROW,
                row.name,
                row.created,
                row.amount,
                row.ref,
                row.payload,  # the jsonb codec's json.dumps
                row.active,
                row.score,
            )
            await conn.execute(ASYNCPG_UPDATE_ROW, new_id)
        return new_id


# -- psycopg 3 / psycopg_pool ---------------------------------------------------------


class PsycopgPool(AsyncContender):
    """psycopg_pool's ``AsyncConnectionPool``, psycopg 3's default (non-autocommit) mode."""

    key = "psycopg_pool"
    name = "psycopg_pool (psycopg 3)"
    library = "psycopg_pool"
    mode = TX
    representative = True
    overload = True
    waiters = True
    checkout_name = "psycopg_pool connection(): pass"
    autocommit: ClassVar[bool] = False
    realistic = REALISTIC

    def __init__(self) -> None:
        self.pool: Any = None

    async def open(self, spec: PoolSpec) -> None:
        from psycopg_pool import AsyncConnectionPool

        kwargs = {"autocommit": True} if self.autocommit else {}
        self.pool = AsyncConnectionPool(
            spec.dsn, min_size=spec.minsize, max_size=spec.maxsize, kwargs=kwargs, open=False
        )
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def query(self, sql: str) -> float | None:
        async with self.pool.connection() as conn:
            acquired = perf_counter()
            await (await conn.execute(sql)).fetchone()
        return acquired

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        return self.pool.connection()  # type: ignore[no-any-return]

    async def row_by_key(self, key: int) -> Any:
        async with self.pool.connection() as conn:
            return await (await conn.execute(ROW_BY_KEY, (key,))).fetchone()

    async def rows_range(self, first: int, last: int) -> Sequence[Any]:
        async with self.pool.connection() as conn:
            return await (await conn.execute(ROWS_RANGE, (first, last))).fetchall()  # type: ignore[no-any-return]

    async def write_tx(self, row: NewRow) -> Any:
        from psycopg.types.json import Jsonb

        params = (row.name, row.created, row.amount, row.ref, Jsonb(row.payload), row.active, row.score)
        async with self.pool.connection() as conn, conn.transaction():
            (new_id,) = await (await conn.execute(INSERT_ROW, params)).fetchone()
            await conn.execute(UPDATE_ROW, (new_id,))
        return new_id


class PsycopgPoolAutocommit(PsycopgPool):
    """psycopg_pool with ``kwargs={"autocommit": True}``: the same-mode peer of pgpool's autocommit."""

    key = "psycopg_pool-ac"
    name = "psycopg_pool (psycopg 3) autocommit"
    mode = AUTOCOMMIT
    autocommit = True
    representative = False
    overload = False
    waiters = False
    checkout_name = ""


# -- aiopg ------------------------------------------------------------------------------


class Aiopg(AsyncContender):
    """aiopg's pool (always autocommit); a cursor per query."""

    key = "aiopg"
    name = "aiopg pool"
    library = "aiopg"
    mode = AUTOCOMMIT
    representative = True
    overload = True
    waiters = True
    checkout_name = "aiopg acquire()+release"
    realistic = REALISTIC

    def __init__(self) -> None:
        self.pool: Any = None

    async def open(self, spec: PoolSpec) -> None:
        import aiopg

        self.pool = await aiopg.create_pool(spec.dsn, minsize=spec.minsize, maxsize=spec.maxsize)

    async def close(self) -> None:
        self.pool.close()
        await self.pool.wait_closed()

    async def query(self, sql: str) -> float | None:
        async with self.pool.acquire() as conn:
            acquired = perf_counter()
            async with conn.cursor() as cur:
                await cur.execute(sql)
                await cur.fetchone()
        return acquired

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        return self.pool.acquire()  # type: ignore[no-any-return]

    async def row_by_key(self, key: int) -> Any:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(ROW_BY_KEY, (key,))
            return await cur.fetchone()

    async def rows_range(self, first: int, last: int) -> Sequence[Any]:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(ROWS_RANGE, (first, last))
            return await cur.fetchall()  # type: ignore[no-any-return]

    async def write_tx(self, row: NewRow) -> Any:
        async with self.pool.acquire() as conn, conn.cursor() as cur, cur.begin():
            await cur.execute(INSERT_ROW, psycopg2_params(row))
            (new_id,) = await cur.fetchone()
            await cur.execute(UPDATE_ROW, (new_id,))
        return new_id


# -- hand-written: psycopg2's pool + anyio.to_thread ---------------------------------------


class _NaiveLease:
    """``async with``: semaphore, ``getconn`` in a thread ... ``putconn`` in a thread."""

    def __init__(self, owner: NaiveToThread) -> None:
        self._owner = owner
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        await self._owner.sem.acquire()
        try:
            self._conn = await anyio.to_thread.run_sync(self._owner.pool.getconn)
        except BaseException:
            self._owner.sem.release()
            raise
        return self._conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await anyio.to_thread.run_sync(self._owner.pool.putconn, self._conn)
        finally:
            self._owner.sem.release()


class NaiveToThread(AsyncContender):
    """The naive wrapper: psycopg2's ``ThreadedConnectionPool`` with every call
    (getconn, query, commit, putconn) in its own ``anyio.to_thread.run_sync``,
    and an ``asyncio.Semaphore`` so that ``getconn`` never meets an exhausted pool."""

    key = "naive"
    name = "naive psycopg2 pool + to_thread"
    library = "psycopg2 (naive)"
    mode = TX
    representative = True
    overload = True
    waiters = True
    checkout_name = "naive getconn+putconn (2 hops)"
    note = "4 thread hops per query: getconn, query, commit, putconn"
    spike_rounds = 1  # psycopg2's pool connects under its lock: ~45 x 150 ms, the same every time
    realistic = REALISTIC

    def __init__(self) -> None:
        self.pool: Any = None
        self.sem = asyncio.Semaphore(1)

    async def open(self, spec: PoolSpec) -> None:
        self.sem = asyncio.Semaphore(spec.maxsize)
        self.pool = await anyio.to_thread.run_sync(
            psycopg2.pool.ThreadedConnectionPool, spec.minsize, spec.maxsize, spec.dsn
        )

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self.pool.closeall)

    async def query(self, sql: str) -> float | None:
        async with self.sem:
            conn = await anyio.to_thread.run_sync(self.pool.getconn)
            acquired = perf_counter()
            try:
                await anyio.to_thread.run_sync(_fetchval, conn, sql)
                await anyio.to_thread.run_sync(conn.commit)
            finally:
                await anyio.to_thread.run_sync(self.pool.putconn, conn)
        return acquired

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        return _NaiveLease(self)

    async def checkout(self) -> None:
        async with self.sem:
            conn = await anyio.to_thread.run_sync(self.pool.getconn)
            await anyio.to_thread.run_sync(self.pool.putconn, conn)

    async def row_by_key(self, key: int) -> Any:
        async with self.acquire() as conn:
            row = await anyio.to_thread.run_sync(_fetchone, conn, ROW_BY_KEY, (key,))
            await anyio.to_thread.run_sync(conn.commit)
        return row

    async def rows_range(self, first: int, last: int) -> Sequence[Any]:
        async with self.acquire() as conn:
            rows = await anyio.to_thread.run_sync(_fetchall, conn, ROWS_RANGE, (first, last))
            await anyio.to_thread.run_sync(conn.commit)
        return rows

    async def write_tx(self, row: NewRow) -> Any:
        async with self.acquire() as conn:  # putconn rolls back what was not committed
            (new_id,) = await anyio.to_thread.run_sync(_fetchone, conn, INSERT_ROW, psycopg2_params(row))
            await anyio.to_thread.run_sync(_execute, conn, UPDATE_ROW, (new_id,))
            await anyio.to_thread.run_sync(conn.commit)
        return new_id


# -- the loop-native statement runner (issue 11), on a minimal pool of its own ----------------------


class _RunnerLease:
    """``async with``: a free runner (FIFO waiters), given back at the end."""

    def __init__(self, owner: NativeRunnerPool) -> None:
        self._owner = owner
        self._runner: Any = None

    async def __aenter__(self) -> Any:
        self._runner = await self._owner.take()
        return self._runner

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner.give(self._runner)


class NativeRunnerPool(AsyncContender):
    """``LoopStatementRunner`` (pgpool_async._loop.native) on plain psycopg2
    connections in autocommit, each entered once and kept by a minimal FIFO pool:
    what the loop-native path costs before it is wired into AsyncConnectionPool."""

    key = "native-runner"
    name = "loop-native runner (autocommit)"
    library = "pgpool_async (loop-native engine)"
    mode = AUTOCOMMIT
    note = "engine only: a minimal pool, not AsyncConnectionPool"
    autocommit: ClassVar[bool] = True

    def __init__(self) -> None:
        self.raws: list[Any] = []
        self.free: list[Any] = []
        self.queue: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def open(self, spec: PoolSpec) -> None:
        from pgpool_async._loop.native import LoopStatementRunner, preload

        reason = await anyio.to_thread.run_sync(preload)
        if reason is not None:
            raise RuntimeError(f"the loop-native path is not available: {reason}")

        def connect() -> Any:
            conn = psycopg2.connect(spec.dsn)
            conn.autocommit = self.autocommit
            return conn

        for _ in range(spec.maxsize):
            raw = await anyio.to_thread.run_sync(connect)
            self.raws.append(raw)
            runner = LoopStatementRunner(raw)
            runner.enter()
            self.free.append(runner)

    async def close(self) -> None:
        for runner in self.free:
            await runner.leave()
        for raw in self.raws:
            await anyio.to_thread.run_sync(raw.close)
        self.free.clear()
        self.raws.clear()

    async def take(self) -> Any:
        if self.free and not self.queue:
            return self.free.pop()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append(fut)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.give(fut.result())
            else:
                self.queue.remove(fut)
            raise

    def give(self, runner: Any) -> None:
        while self.queue:
            fut = self.queue.popleft()
            if not fut.done():
                fut.set_result(runner)
                return
        self.free.append(runner)

    async def query(self, sql: str) -> float | None:
        runner = await self.take()
        acquired = perf_counter()
        try:
            result = await runner.execute(sql)
            _ = result.rows[0][0]
            if not self.autocommit:
                await runner.commit()
        finally:
            self.give(runner)
        return acquired

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        return _RunnerLease(self)


class NativeRunnerPoolTx(NativeRunnerPool):
    """The same without autocommit: BEGIN goes out with the statement, then COMMIT."""

    key = "native-runner-tx"
    name = "loop-native runner (tx)"
    mode = TX
    autocommit = False


# -- plain threads ---------------------------------------------------------------------------


class ThreadsContender(Contender):
    """psycopg2's ``ThreadedConnectionPool`` used from OS threads, no event loop involved.

    psycopg2's pool raises when exhausted instead of waiting, so a
    ``threading.BoundedSemaphore(maxsize)`` guards ``getconn`` (the usual fix).
    """

    key = "threads"
    name = "psycopg2 pool in OS threads (sync)"
    library = "psycopg2 (threads)"
    mode = TX
    representative = True
    overload = True
    checkout_name = "psycopg2 threads getconn+putconn"
    note = "10 threads for SELECT 1, checkout and the realistic workloads; one thread per task otherwise"
    spike_rounds = 1  # psycopg2's pool connects under its lock: ~45 x 150 ms, the same every time
    realistic = REALISTIC

    def __init__(self) -> None:
        self.pool: Any = None
        self.sem = threading.BoundedSemaphore(1)

    def open_sync(self, spec: PoolSpec) -> None:
        """Create the pool (psycopg2 opens ``minsize`` connections one by one)."""
        self.sem = threading.BoundedSemaphore(spec.maxsize)
        self.pool = psycopg2.pool.ThreadedConnectionPool(spec.minsize, spec.maxsize, spec.dsn)

    async def open(self, spec: PoolSpec) -> None:
        """:meth:`open_sync` off the event loop."""
        await asyncio.to_thread(self.open_sync, spec)

    def close_sync(self) -> None:
        """Close every connection."""
        self.pool.closeall()

    async def close(self) -> None:
        """:meth:`close_sync` off the event loop."""
        await asyncio.to_thread(self.close_sync)

    def query_sync(self, sql: str) -> float | None:
        """Check out, query, commit, return."""
        with self.sem:
            conn = self.pool.getconn()
            acquired = perf_counter()
            try:
                _fetchval(conn, sql)
                conn.commit()
            finally:
                self.pool.putconn(conn)
        return acquired

    def checkout_sync(self) -> None:
        """Check a connection out and return it."""
        with self.sem:
            self.pool.putconn(self.pool.getconn())

    @contextlib.contextmanager
    def _lease(self) -> Any:
        with self.sem:
            conn = self.pool.getconn()
            try:
                yield conn
            finally:
                self.pool.putconn(conn)

    def acquire_sync(self) -> AbstractContextManager[Any]:
        """Lend one connection for a ``with`` block."""
        return self._lease()

    def row_by_key_sync(self, key: int) -> Any:
        """``ROW_BY_KEY``, then commit."""
        with self._lease() as conn:
            row = _fetchone(conn, ROW_BY_KEY, (key,))
            conn.commit()
        return row

    def rows_range_sync(self, first: int, last: int) -> Sequence[Any]:
        """``ROWS_RANGE``, then commit."""
        with self._lease() as conn:
            rows = _fetchall(conn, ROWS_RANGE, (first, last))
            conn.commit()
        return rows

    def write_tx_sync(self, row: NewRow) -> Any:
        """INSERT ... RETURNING id, UPDATE, commit (putconn rolls back on an error)."""
        with self._lease() as conn:
            (new_id,) = _fetchone(conn, INSERT_ROW, psycopg2_params(row))
            _execute(conn, UPDATE_ROW, (new_id,))
            conn.commit()
        return new_id


ContenderClass = type[AsyncContender] | type[ThreadsContender]

CONTENDERS: tuple[ContenderClass, ...] = (
    PgpoolConnection,
    PgpoolConnectionAutocommit,
    PgpoolFetchval,
    PgpoolFetchvalAutocommit,
    PgpoolConnectionThread,
    PgpoolOverEngine,
    PgpoolOverPsycopg2,
    PgpoolConnectionAutocommitThread,
    PgpoolFetchvalThread,
    PgpoolFetchvalAutocommitThread,
    Asyncpg,
    PsycopgPool,
    PsycopgPoolAutocommit,
    Aiopg,
    NaiveToThread,
    NativeRunnerPool,
    NativeRunnerPoolTx,
    ThreadsContender,
)

AnyContender = AsyncContender | ThreadsContender


def by_key(key: str) -> ContenderClass:
    """The contender class with this key.

    :raises KeyError: no such contender.
    """
    for cls in CONTENDERS:
        if cls.key == key:
            return cls
    raise KeyError(f"unknown contender {key!r}; known: {', '.join(c.key for c in CONTENDERS)}")


def select(only: Sequence[str] | None) -> list[ContenderClass]:
    """The contenders named in ``only`` (keys), in the canonical order; all if empty."""
    if not only:
        return list(CONTENDERS)
    wanted = {by_key(name.strip()).key for name in only if name.strip()}
    return [cls for cls in CONTENDERS if cls.key in wanted]
