"""AsyncConnectionPool.over(engine): one budget for threads and tasks, on a real server.

Every test runs over psycopg2's ThreadedConnectionPool, this package's, and the
pooling doc's ``DictConnectionPool`` (a psycopg2 subclass overriding
``_connect``), on asyncio and trio, with both io paths (conftest's ``pool_io``).
"""

from __future__ import annotations

import asyncio
import gc
import io
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import psycopg2
import psycopg2.extras
import psycopg2.pool
import pytest

import pgpool_async
from pgpool_async import (
    AsyncConnectionPool,
    PoolClosed,
    PoolConfigError,
    PoolError,
    PoolTimeout,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)

from .conftest import server_query

pytestmark = pytest.mark.anyio


class DictConnectionPool(psycopg2.pool.ThreadedConnectionPool):
    """The pooling doc's subclass (``connection-pooling.md``), as written there.
    (psycopg2's private attributes are untyped: ``self`` is read as Any.)"""

    def _connect(self: Any, key: Any = None) -> Any:
        conn = psycopg2.connect(
            *self._args, connection_factory=psycopg2.extras.DictConnection, **self._kwargs
        )
        if key is not None:
            self._used[key] = conn
            self._rused[id(conn)] = key
        else:
            self._pool.append(conn)
        return conn


ENGINES: dict[str, type[Any]] = {
    "psycopg2": psycopg2.pool.ThreadedConnectionPool,
    "ours": ThreadedConnectionPool,
    "seed-dict": DictConnectionPool,
}


@pytest.fixture(params=list(ENGINES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_engine(kind: str, dsn: str, app_name: str) -> Iterator[Callable[..., Any]]:
    """``make_engine(maxconn, minconn=0)``: an engine of this test's kind, closed
    at the end (with minconn > 0 it connects: call it in a thread)."""
    made: list[Any] = []

    def make(maxconn: int, minconn: int = 0) -> Any:
        engine = ENGINES[kind](minconn, maxconn, dsn, application_name=app_name)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        if not engine.closed:
            engine.closeall()


def engine_true(engine: Any) -> None:
    """psycopg2's documented state agrees with itself and with maxconn."""
    assert {id(c) for c in engine._used.values()} == set(engine._rused)
    for conn in engine._used.values():
        assert engine._used[engine._rused[id(conn)]] is conn
    assert not {id(c) for c in engine._pool} & set(engine._rused)
    assert len(engine._pool) + len(engine._used) <= engine.maxconn


async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(func, *args)


def _queued_is(queued: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: queued() == n


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.002)


def server_count(dsn: str, app_name: str) -> int:
    rows = server_query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,))
    return int(rows[0][0])


# -- building -----------------------------------------------------------------


@pytest.mark.parametrize("simple", [psycopg2.pool.SimpleConnectionPool, SimpleConnectionPool])
async def test_simple_pool_refused(dsn: str, simple: type[Any]) -> None:
    engine = simple(0, 1, dsn)
    with pytest.raises(PoolConfigError, match="not thread-safe"):
        AsyncConnectionPool.over(engine)
    with pytest.raises(PoolConfigError, match="ThreadedConnectionPool"):
        AsyncConnectionPool.over(object())


async def test_closed_engine_refused(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(1)
    engine.closeall()
    with pytest.raises(PoolClosed):
        AsyncConnectionPool.over(engine)


async def test_opening_takes_nothing(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(1)
    held = await in_thread(engine.getconn)  # a thread holds the whole budget
    async with AsyncConnectionPool.over(engine, timeout=0.2) as pool:
        assert len(engine._used) == 1
        with pytest.raises(PoolTimeout):
            await pool.getconn()
    await in_thread(engine.putconn, held)
    assert not engine.closed  # close() ends the face only
    engine_true(engine)


# -- lending and returning ------------------------------------------------------


async def test_lend_return_keeps_engine_true(make_engine: Callable[..., Any], kind: str) -> None:
    engine = make_engine(2)
    async with AsyncConnectionPool.over(engine) as pool:
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            assert list(engine._used.values()) == [conn.raw]
            engine_true(engine)
        assert not engine._used
        a = await pool.getconn()
        b = await pool.getconn()
        assert len(engine._used) == 2
        engine_true(engine)
        await a.execute("CREATE TEMP TABLE t (x int)")  # a transaction left open: rolled back
        await pool.putconn(a)
        await pool.putconn(b)
        assert not engine._used
        engine_true(engine)
        if kind == "ours":  # kept idle in the engine, for threads and tasks
            assert len(engine._pool) == 2
        stats = pool.get_stats()
        assert stats["engine_used"] == 0 and stats["engine_max"] == 2 and stats["pool_size"] == 0
        assert "over" in repr(pool)


async def test_everything_works_over_an_engine(make_engine: Callable[..., Any], dsn: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS t_face; CREATE TABLE t_face (x int)")
    engine = make_engine(2)
    async with AsyncConnectionPool.over(engine) as pool:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO t_face VALUES (1), (2)")
            async with conn.cursor() as cur:
                await cur.execute("SELECT x FROM t_face ORDER BY x")
                assert [r[0] for r in await cur.fetchall()] == [1, 2]
            async with conn.transaction():
                await conn.execute("INSERT INTO t_face VALUES (3)")
        assert await pool.fetchval("SELECT count(*) FROM t_face") == 3
        assert [r[0] for r in await pool.fetchall("SELECT x FROM t_face ORDER BY x")] == [1, 2, 3]
        assert await pool.execute("DELETE FROM t_face WHERE x = 3") == 1
        assert await pool.run_sync(lambda raw: raw.server_version) > 0
        assert not engine._used
        engine_true(engine)
    server_query(dsn, "DROP TABLE t_face")


@pytest.mark.usefixtures("no_wait_callback")  # (COPY refuses psycopg2 wait callbacks: test_copy.py)
async def test_copy_over_an_engine(make_engine: Callable[..., Any], dsn: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS t_face_copy; CREATE TABLE t_face_copy (x int)")
    engine = make_engine(1)
    async with AsyncConnectionPool.over(engine) as pool:
        async with pool.connection() as conn:
            await conn.copy_expert("COPY t_face_copy (x) FROM STDIN", io.BytesIO(b"10\n11\n"))
            out = io.BytesIO()
            await conn.copy_expert("COPY (SELECT x FROM t_face_copy ORDER BY x) TO STDOUT", out)
            assert out.getvalue() == b"10\n11\n"
        assert not engine._used
        engine_true(engine)
    server_query(dsn, "DROP TABLE t_face_copy")


async def test_listen_over_an_engine_and_unlisten_on_return(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(2)
    async with AsyncConnectionPool.over(engine, timeout=5) as pool:
        listener = await pool.getconn()
        raw = listener.raw
        await listener.listen("face_jobs")
        async with pool.connection() as sender:
            await sender.notify("face_jobs", "job 1")
        got = [n.payload async for n in listener.notifies(stop_after=1, timeout=5)]
        assert got == ["job 1"]
        await pool.putconn(listener)  # UNLISTEN * before the engine has it back
        assert not engine._used
        if raw in engine._pool:  # (psycopg2's engine closed it: above its minconn)
            channels = await in_thread(_listening, raw)
            assert channels == []
        engine_true(engine)


def _listening(raw: Any) -> list[Any]:
    with raw.cursor() as cur:
        cur.execute("SELECT pg_listening_channels()")
        rows = cur.fetchall()
    raw.rollback()
    return rows


async def test_broken_connection_goes_back_closed(make_engine: Callable[..., Any], dsn: str) -> None:
    engine = make_engine(1)
    async with AsyncConnectionPool.over(engine) as pool:
        conn = await pool.getconn()
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        server_query(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg2.Error):
            await conn.fetchval("SELECT 1")
        await pool.putconn(conn)
        assert not engine._used and not engine._pool
        engine_true(engine)
        assert await pool.fetchval("SELECT 1") == 1  # a new one, opened by the engine


async def test_keys(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(2)
    async with AsyncConnectionPool.over(engine) as pool:
        conn = await pool.getconn("k")
        assert engine._used["k"] is conn.raw
        assert await pool.getconn("k") is conn
        await pool.putconn(conn, "k")
        assert "k" not in engine._used
        held = await in_thread(engine.getconn, "t")
        with pytest.raises(PoolError, match="lent by the engine to a thread"):
            await pool.getconn("t")
        await in_thread(engine.putconn, held, "t")
        engine_true(engine)


# -- one budget ---------------------------------------------------------------


async def test_task_woken_by_a_threads_putconn(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(1)
    held = await in_thread(engine.getconn)
    async with AsyncConnectionPool.over(engine, timeout=10) as pool:
        woken: list[float] = []

        async def task() -> None:
            async with pool.connection() as conn:
                woken.append(time.monotonic())
                assert await conn.fetchval("SELECT 1") == 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(task)
            await until(lambda: pool.get_stats()["requests_waiting"] == 1)
            await anyio.sleep(0.05)
            assert not woken
            returned = time.monotonic()
            await in_thread(engine.putconn, held)
        assert woken and woken[0] - returned < 1.0  # generous: a loaded CI machine
        engine_true(engine)
        assert not engine._used


async def test_task_woken_by_a_threads_closing_putconn(make_engine: Callable[..., Any]) -> None:
    """The slot a thread frees (``putconn(conn, close=True)``) goes to the waiting
    task, which gets a new connection in it."""
    engine = make_engine(1)
    held = await in_thread(engine.getconn)
    async with AsyncConnectionPool.over(engine, timeout=10) as pool:
        async with anyio.create_task_group() as tg:

            async def give_back_closed() -> None:
                await until(lambda: pool.get_stats()["requests_waiting"] == 1)
                await in_thread(lambda: engine.putconn(held, close=True))

            tg.start_soon(give_back_closed)
            with anyio.fail_after(5):
                async with pool.connection() as conn:
                    assert conn.raw is not held
                    assert await conn.fetchval("SELECT 1") == 1
        assert not engine._used
        engine_true(engine)


# psycopg2's getconn never waits: only this package's engine has getconn(timeout=).
@pytest.mark.parametrize("kind", ["ours"], indirect=True)
async def test_thread_woken_by_a_tasks_return(make_engine: Callable[..., Any], kind: str) -> None:
    engine = make_engine(1)
    async with AsyncConnectionPool.over(engine) as pool:
        conn = await pool.getconn()
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(engine.getconn(timeout=10)))
        thread.start()
        await until(lambda: bool(engine._waiters))
        await pool.putconn(conn)
        await in_thread(thread.join, 5)
        assert got and engine._used and list(engine._used.values()) == got
        engine.putconn(got[0])  # (clean: no I/O)
        engine_true(engine)


async def test_fifo_across_threads_and_tasks(make_engine: Callable[..., Any], kind: str) -> None:
    engine = make_engine(1)
    served: list[str] = []
    async with AsyncConnectionPool.over(engine, timeout=20) as pool:
        first = await pool.getconn()
        threads: list[threading.Thread] = []

        def thread_job(name: str) -> None:
            conn = engine.getconn(timeout=20)
            served.append(name)
            time.sleep(0.02)
            engine.putconn(conn)

        async def task_job(name: str) -> None:
            async with pool.connection():
                served.append(name)
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            order = ["T1", "A", "T2", "B"] if kind == "ours" else ["A", "B", "C"]

            def queued() -> int:
                if kind == "ours":
                    return len(engine._waiters)
                return pool.get_stats()["requests_waiting"]

            for i, name in enumerate(order):
                if name.startswith("T"):
                    t = threading.Thread(target=thread_job, args=(name,))
                    t.start()
                    threads.append(t)
                else:
                    tg.start_soon(task_job, name)
                await until(_queued_is(queued, i + 1))
            await pool.putconn(first)
        for t in threads:
            await in_thread(t.join, 10)
        assert served == order
        engine_true(engine)
        assert not engine._used


async def test_pool_timeout_on_schedule(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(1)
    held = await in_thread(engine.getconn)
    async with AsyncConnectionPool.over(engine, timeout=10) as pool:
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 3.0
        assert list(engine._used.values()) == [held]
        if isinstance(engine, ThreadedConnectionPool):
            assert not engine._waiters
    await in_thread(engine.putconn, held)
    engine_true(engine)


async def test_server_never_sees_more_than_maxconn(
    make_engine: Callable[..., Any], dsn: str, app_name: str, kind: str
) -> None:
    # minconn = maxconn: psycopg2's engine closes every connection returned above
    # minconn, and a closed connection's backend lingers in pg_stat_activity for a
    # moment while the next one connects (the count would measure that churn).
    engine = await in_thread(make_engine, 3, 3)
    seen: list[int] = []
    stop = threading.Event()

    def thread_job() -> None:
        while not stop.is_set():
            try:
                conn = engine.getconn(timeout=10) if kind == "ours" else engine.getconn()
            except psycopg2.pool.PoolError:
                time.sleep(0.002)
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_sleep(0.005)")
                conn.rollback()
            finally:
                engine.putconn(conn)

    async with AsyncConnectionPool.over(engine, timeout=20) as pool:
        threads = [threading.Thread(target=thread_job) for _ in range(3)]
        for t in threads:
            t.start()

        async def task_job() -> None:
            for _ in range(10):
                async with pool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.005)")

        async def watch() -> None:
            while not stop.is_set():
                seen.append(await in_thread(server_count, dsn, app_name))
                engine_true(engine)
                await anyio.sleep(0.01)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                async with anyio.create_task_group() as jobs:
                    for _ in range(4):
                        jobs.start_soon(task_job)
                stop.set()
        finally:
            stop.set()
            for t in threads:
                await in_thread(t.join, 10)
    assert seen and max(seen) <= 3
    engine_true(engine)
    assert not engine._used


# -- cancellation: nothing stays in the engine's _used --------------------------


async def _cancel_waiting_getconn(pool: AsyncConnectionPool, how: str, anyio_backend: str) -> None:
    if how == "scope":
        with anyio.move_on_after(0.1):
            await pool.getconn()
    elif how == "scope-block":
        with anyio.move_on_after(0.1):
            async with pool.connection():
                pass
    elif how == "task.cancel":
        task = asyncio.ensure_future(pool.getconn())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.getconn(), 0.1)


@pytest.mark.parametrize("how", ["scope", "scope-block"])
async def test_cancelled_while_waiting(make_engine: Callable[..., Any], how: str, anyio_backend: str) -> None:
    await _cancelled_while_waiting(make_engine, how, anyio_backend)


# task.cancel() and wait_for are asyncio's.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["task.cancel", "wait_for"])
async def test_cancelled_while_waiting_asyncio(
    make_engine: Callable[..., Any], how: str, anyio_backend: str
) -> None:
    await _cancelled_while_waiting(make_engine, how, anyio_backend)


async def _cancelled_while_waiting(make_engine: Callable[..., Any], how: str, anyio_backend: str) -> None:
    engine = make_engine(1)
    held = await in_thread(engine.getconn)
    async with AsyncConnectionPool.over(engine, timeout=10) as pool:
        await _cancel_waiting_getconn(pool, how, anyio_backend)
        assert list(engine._used.values()) == [held]
        await in_thread(engine.putconn, held)
        await anyio.sleep(0.05)  # a late hand-off, if any, has gone back
        assert not engine._used
        async with pool.connection() as conn:  # the budget is whole
            assert await conn.fetchval("SELECT 1") == 1
        assert not engine._used
        engine_true(engine)


@pytest.mark.parametrize("where", ["checkout", "body", "return", "statement"])
async def test_cancelled_at_every_step(make_engine: Callable[..., Any], where: str) -> None:
    engine = make_engine(1)
    async with AsyncConnectionPool.over(engine, timeout=10) as pool:
        for delay in (0, 0.001, 0.005, 0.02):
            with anyio.CancelScope() as scope:
                if where == "checkout":
                    scope.cancel()
                    await pool.getconn()
                elif where == "body":
                    async with pool.connection():
                        scope.cancel()
                        await anyio.sleep(1)
                elif where == "return":
                    conn = await pool.getconn()
                    await conn.execute("SELECT 1")  # a transaction open: a thread rolls back
                    scope.cancel()
                    await pool.putconn(conn)
                else:
                    with anyio.move_on_after(delay):
                        async with pool.connection() as conn:
                            await conn.execute("SELECT pg_sleep(1)")
            await until(lambda: not engine._used and pool.get_stats()["pool_size"] == 0)
            engine_true(engine)
        assert await pool.fetchval("SELECT 1") == 1


# -- closing ----------------------------------------------------------------


async def test_face_close_returns_lent_connections_closed(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(2)
    pool = AsyncConnectionPool.over(engine)
    await pool.open()
    conn = await pool.getconn()
    await pool.close(timeout=0.1)
    assert not engine.closed
    assert not engine._used  # given back closed: the budget is whole
    assert conn.raw.closed if not conn.released else True
    with pytest.raises(PoolClosed):
        await pool.getconn()
    held = await in_thread(engine.getconn)  # threads go on
    await in_thread(engine.putconn, held)
    await pool.close()  # twice: fine


async def test_closeall_from_the_face_while_a_thread_holds_one(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(2)
    held = await in_thread(engine.getconn)
    async with AsyncConnectionPool.over(engine) as pool:
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")
        await pool.closeall()
        assert engine.closed
        assert held.closed
        with pytest.raises(PoolClosed):
            await pool.closeall()


async def test_closeall_from_a_thread_while_a_task_holds_one(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(2)
    async with AsyncConnectionPool.over(engine, timeout=5) as pool:
        conn = await pool.getconn()
        await conn.fetchval("SELECT 1")
        await in_thread(engine.closeall)
        await pool.putconn(conn)  # no error: the engine is closed, the connection is closed here
        with pytest.raises(PoolClosed):
            await pool.getconn()
        assert pool.get_stats()["pool_size"] == 0


async def test_closed_engine_wakes_a_waiting_task(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(1)
    held = await in_thread(engine.getconn)
    async with AsyncConnectionPool.over(engine, timeout=10) as pool:

        async def close_soon() -> None:
            await until(lambda: pool.get_stats()["requests_waiting"] == 1)
            await in_thread(engine.closeall)

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_soon)
            with pytest.raises(PoolClosed), anyio.fail_after(5):
                await pool.getconn()
    assert held.closed


async def test_a_dropped_face_gives_its_budget_back(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(1)

    async def use_and_drop() -> weakref.ref[AsyncConnectionPool]:
        pool = AsyncConnectionPool.over(engine)
        await pool.open()
        conn = await pool.getconn()
        await conn.fetchval("SELECT 1")
        del conn  # (reported as a leak; the pool goes with it)
        return weakref.ref(pool)

    with pytest.warns(ResourceWarning, match="never closed"):
        ref = await use_and_drop()
        await until(lambda: gc.collect() >= 0 and ref() is None)
    await until(lambda: not engine._used)
    engine_true(engine)


def test_package_texts_say_what_is_true() -> None:
    assert "over(" in (pgpool_async.__doc__ or "")
