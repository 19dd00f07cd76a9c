"""The async pool on a real server: lending, waiting, returning, errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import threading
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest

from pgpool_async import (
    AsyncConnection,
    AsyncConnectionPool,
    ConnectionReleased,
    PoolClosed,
    PoolConfigError,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)

from .conftest import backends, server_query, wait_backends_gone
from .fix_dsn import with_params
from .gates import (
    SETTLE,
    Escape,
    assert_pool_sound,
    in_use,
    poll,
    pool_kwargs,
    pool_threads,
    unique,
    wait_backends,
    wait_closed_down,
)

pytestmark = pytest.mark.anyio


async def ensure_waiting(pool: AsyncConnectionPool, n: int) -> None:
    """Wait until ``n`` requests are queued: deterministic, no sleeps."""
    with anyio.fail_after(10):
        while pool.get_stats()["requests_waiting"] < n:
            await anyio.sleep(0.001)


async def test_issue_example(dsn: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS t_example; CREATE TABLE t_example (x int)")
    async with AsyncConnectionPool(1, 10, dsn, timeout=5) as pool:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO t_example VALUES (%s)", (1,))
            assert await conn.fetchval("SELECT count(*) FROM t_example") == 1
        # Committed: another session sees it.
        assert server_query(dsn, "SELECT count(*) FROM t_example") == [(1,)]
        with pytest.raises(ZeroDivisionError):
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO t_example VALUES (2)")
                1 / 0  # noqa: B018
        assert server_query(dsn, "SELECT count(*) FROM t_example") == [(1,)]
        assert await pool.fetchval("SELECT count(*) FROM t_example") == 1
        assert await pool.execute("INSERT INTO t_example VALUES (3)") == 1
        assert await pool.fetchall("SELECT x FROM t_example ORDER BY x") == [(1,), (3,)]
        assert await pool.fetchone("SELECT x FROM t_example WHERE x = 3") == (3,)
    assert pool.closed


async def test_no_io_before_open(dsn: str) -> None:
    pool = AsyncConnectionPool(2, 4, "host=127.0.0.1 port=1")  # nothing listens there
    assert pool.get_stats()["pool_size"] == 0
    assert "not open" in repr(pool)
    with pytest.raises(PoolError, match="is not open"):
        await pool.getconn()
    await pool.close()
    await pool.close()  # twice is fine


async def test_fifo_waiting(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        held = await pool.getconn()
        order: list[int] = []

        async def waiter(i: int) -> None:
            async with pool.connection():
                order.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(waiter, i)
                await ensure_waiting(pool, i + 1)
            await pool.putconn(held)
        assert order == [0, 1, 2, 3, 4]
        assert pool.get_stats()["requests_queued"] == 5


async def test_timeout_says_how_long(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, timeout=5) as pool:
        held = await pool.getconn()
        with pytest.raises(PoolTimeout, match=r"after 0\.20 sec") as info:
            await pool.getconn(timeout=0.2)
        assert info.value.__cause__ is None
        assert pool.get_stats()["requests_waiting"] == 0
        await pool.putconn(held)
        async with pool.connection(timeout=1) as conn:  # still usable
            assert await conn.fetchval("SELECT 1") == 1
        assert pool.get_stats()["requests_errors"] == 1


async def test_max_waiting(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, max_waiting=2) as pool:
        held = await pool.getconn()
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(pool.fetchval, "SELECT 1")
            await ensure_waiting(pool, 2)
            with pytest.raises(TooManyRequests, match="max_waiting=2"):
                await pool.getconn()
            await pool.putconn(held)


async def test_open_unreachable_raises_timeout_with_cause() -> None:
    pool = AsyncConnectionPool(1, 2, "host=127.0.0.1 port=1 dbname=x", timeout=0.5)
    with pytest.raises(PoolTimeout, match="couldn't open 1 connection") as info:
        await pool.open()
    assert isinstance(info.value.__cause__, psycopg2.OperationalError)
    assert pool.closed
    with pytest.raises(PoolClosed, match="cannot be reopened"):
        await pool.open()


async def test_bad_input() -> None:
    with pytest.raises(PoolConfigError, match="minconn \\(5\\) is greater than maxconn \\(2\\)"):
        AsyncConnectionPool(5, 2, "dbname=x")
    with pytest.raises(PoolConfigError, match="maxconn must be >= 1"):
        AsyncConnectionPool(0, -1, "dbname=x")
    with pytest.raises(PoolConfigError, match="timeout must be > 0"):
        AsyncConnectionPool(1, 2, "dbname=x", timeout=-1)
    with pytest.raises(PoolConfigError, match="max_waiting"):
        AsyncConnectionPool(1, 2, "dbname=x", max_waiting=-3)
    with pytest.raises(PoolConfigError, match="fix the DSN"):
        AsyncConnectionPool(1, 2, "not a dsn")
    with pytest.raises(PoolConfigError, match="drop async=True"):
        AsyncConnectionPool(1, 2, "dbname=x", async_=True)


async def test_misuse(dsn: str) -> None:
    async with AsyncConnectionPool(0, 2, dsn) as pool, AsyncConnectionPool(0, 2, dsn) as other:
        conn = await pool.getconn()
        with pytest.raises(PoolError, match="not a member of this pool"):
            await other.putconn(conn)
        with pytest.raises(PoolError, match="takes the AsyncConnection"):
            await pool.putconn(conn.raw)  # type: ignore[arg-type]
        await pool.putconn(conn)
        with pytest.raises(ConnectionReleased, match="returned to the pool"):
            await pool.putconn(conn)
        with pytest.raises(ConnectionReleased):
            await conn.fetchval("SELECT 1")
        with pytest.raises(ConnectionReleased):
            conn.raw  # noqa: B018
        assert await pool.fetchval("SELECT 2") == 2  # the pool is still fine
    with pytest.raises(PoolClosed, match="connection pool is closed"):
        await pool.getconn()
    with pytest.raises(PoolClosed):
        async with pool.connection():
            pass


async def test_closeall_semantics(dsn: str, app_name: str) -> None:
    pool = AsyncConnectionPool(1, 3, dsn, application_name=app_name)
    await pool.open()
    held = await pool.getconn()
    await pool.closeall()
    assert held.raw.closed  # the seed: closeall closes connections in use
    wait_backends_gone(dsn, app_name)
    with pytest.raises(PoolClosed):
        await pool.closeall()
    await pool.putconn(held)  # after close: closed quietly, no error
    await pool.close()


async def test_close_waits_for_lent_connections_and_fails_waiters(dsn: str) -> None:
    pool = AsyncConnectionPool(1, 1, dsn)
    await pool.open()
    held = await pool.getconn()
    results: list[Any] = []

    async def wait_for_one() -> None:
        try:
            await pool.getconn()
        except PoolClosed as exc:
            results.append(exc)

    async def give_back_later() -> None:
        await anyio.sleep(0.1)
        await pool.putconn(held)
        results.append("returned")

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_one)
        await ensure_waiting(pool, 1)
        tg.start_soon(give_back_later)
        await pool.close(timeout=10)
    assert isinstance(results[0], PoolClosed)
    assert results[1] == "returned"
    assert pool.get_stats()["pool_size"] == 0


async def test_keys_and_close_flag(dsn: str) -> None:
    async with AsyncConnectionPool(0, 3, dsn) as pool:
        a = await pool.getconn(key="reports")
        assert await pool.getconn(key="reports") is a
        b = await pool.getconn(key="admin")
        assert b.raw is not a.raw
        await pool.putconn(a, key="reports")
        raw_b = b.raw
        await pool.putconn(b, close=True)
        assert raw_b.closed
        assert pool.get_stats()["pool_available"] == 1
        assert pool.get_stats()["pool_size"] == 1


async def test_connection_factories(dsn: str) -> None:
    async with AsyncConnectionPool(0, 2, dsn, connection_factory=psycopg2.extras.RealDictConnection) as pool:
        assert await pool.fetchone("SELECT 1 AS one") == {"one": 1}
        assert await pool.fetchval("SELECT 5 AS five") == 5
    async with AsyncConnectionPool(0, 2, dsn, connection_factory=psycopg2.extras.DictConnection) as pool:
        row = await pool.fetchone("SELECT 1 AS one")
        assert row["one"] == 1 and row[0] == 1
    async with AsyncConnectionPool(0, 2, dsn, cursor_factory=psycopg2.extras.RealDictCursor) as pool:
        assert await pool.fetchall("SELECT 1 AS a") == [{"a": 1}]


async def test_rollback_on_return_and_stats(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")
        assert backends(dsn, app_name)[0][0] == "idle in transaction"
        await pool.putconn(conn)
        assert backends(dsn, app_name)[0][0] == "idle"
        stats = pool.pop_stats()
        for key in (
            "pool_min",
            "pool_max",
            "pool_size",
            "pool_available",
            "requests_waiting",
            "requests_num",
            "usage_ms",
            "connections_num",
        ):
            assert key in stats, key
        assert stats["requests_num"] == 1 and stats["connections_num"] == 1
        assert "requests_num" not in pool.get_stats()  # popped


async def test_broken_connection_discarded(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        conn = await pool.getconn()
        raw = conn.raw
        await conn.run_sync(lambda c: c.close())
        await pool.putconn(conn)
        assert pool.get_stats()["returns_bad"] == 1
        assert await pool.fetchval("SELECT 1") == 1  # a new connection took the slot
        assert raw.closed


async def test_terminated_idle_connection_replaced(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(2, 2, dsn, application_name=app_name) as pool:
        server_query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )
        server_query(dsn, "SELECT pg_sleep(0.1)")
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.get_stats()["connections_lost"] == 2


async def test_repr_and_errors_never_show_password(dsn: str) -> None:
    pool = AsyncConnectionPool(1, 2, with_params(dsn, password="s3cr3t-pw"), name="web")
    assert "s3cr3t" not in repr(pool)
    async with pool:
        conn = await pool.getconn()
        text = repr(pool)
        assert "Requests: 1 active, 0 queued" in text and "Connections: 0 idle, 1 in use" in text
        assert "'web'" in text and "s3cr3t" not in text
        with pytest.raises(PoolTimeout) as info:
            await _exhaust(pool)
        assert "s3cr3t" not in str(info.value)
        await pool.putconn(conn)
    bad = AsyncConnectionPool(1, 1, "host=127.0.0.1 port=1 password=s3cr3t-pw", timeout=0.3)
    with pytest.raises(PoolTimeout) as info:
        await bad.open()
    assert "s3cr3t" not in str(info.value) and "s3cr3t" not in repr(bad)


async def _exhaust(pool: AsyncConnectionPool) -> None:
    extra = await pool.getconn()
    try:
        await pool.getconn(timeout=0.05)
    finally:
        await pool.putconn(extra)


async def test_own_thread_limiter(dsn: str) -> None:
    """The default anyio limiter full (as FastAPI's sync code can make it): the pool
    keeps working, returns included."""
    default = anyio.to_thread.current_default_thread_limiter()
    default.total_tokens = 1
    release = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, release.wait)
            with anyio.fail_after(10):
                while default.borrowed_tokens < 1:
                    await anyio.sleep(0.001)
            async with AsyncConnectionPool(1, 2, dsn) as pool:
                async with pool.connection() as conn:
                    assert await conn.fetchval("SELECT 1") == 1  # commit needed on exit
                assert await pool.fetchval("SELECT 2") == 2
            release.set()
    finally:
        release.set()
        default.total_tokens = 40


async def test_autocommit_option(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, autocommit=True, application_name=app_name) as pool:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            assert backends(dsn, app_name)[0][0] == "idle"  # no transaction left open
            assert conn.raw.autocommit


async def test_connect_timeout_default_and_override(dsn: str) -> None:
    pool = AsyncConnectionPool(1, 1, dsn, timeout=7.5)
    assert pool._connect_kwargs["connect_timeout"] == 8
    pool = AsyncConnectionPool(1, 1, with_params(dsn, connect_timeout=3))
    assert "connect_timeout" not in pool._connect_kwargs
    pool = AsyncConnectionPool(1, 1, dsn, timeout=math.inf)
    assert pool._connect_kwargs["connect_timeout"] == 2


async def test_grows_on_demand_and_keeps_idle(dsn: str) -> None:
    async with AsyncConnectionPool(1, 4, dsn) as pool:
        conns: list[AsyncConnection] = [await pool.getconn() for _ in range(4)]
        assert pool.get_stats()["pool_size"] == 4
        for conn in conns:
            await pool.putconn(conn)
        assert pool.get_stats()["pool_available"] == 4  # kept, not closed above minconn


async def test_one_operation_at_a_time_in_call_order(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        order: list[int] = []

        async def call(i: int) -> None:
            await conn.fetchval("SELECT pg_sleep(0.01)")
            order.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, i)
                await anyio.lowlevel.checkpoint()  # queue them in order
            # A caller cancelled while waiting for its turn leaves the queue cleanly.
            with anyio.move_on_after(0.005):
                await conn.fetchval("SELECT 1")
        assert order == [0, 1, 2, 3, 4]
        assert not conn.loan.turn.locked()
        assert await conn.fetchval("SELECT 7") == 7


async def test_served_waiters_do_not_pile_up(dsn: str) -> None:
    """Deadlines of served requests are dropped: memory stays bounded in a busy pool."""
    async with AsyncConnectionPool(1, 1, dsn) as pool:

        async def use() -> None:
            async with pool.connection():
                await anyio.lowlevel.checkpoint()

        for _ in range(20):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(use)
        assert pool.get_stats()["requests_queued"] > 500
        assert len(pool._waiting._deadlines) < 200


async def test_pools_follow_pool_io(dsn: str, pool_io: str | None) -> None:
    """conftest runs this module once per io: a pool built without io= really uses it."""
    assert pool_io in ("loop", "thread")
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        assert pool.io == pool_io
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            assert conn.loan.on_loop == (pool_io == "loop")


# -- returns, close() and a dropped pool (the defects issue 7 listed: 1, 2, 6, 8, 9) -----------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_task_cancel_during_putconn_keeps_the_slot(anyio_backend: str, dsn: str, app_name: str) -> None:
    """The issue's own reproduction: putconn() cancelled by ``task.cancel()``
    while it rolls back. The return must still complete (by the pool)."""
    pool = AsyncConnectionPool(1, 1, dsn, **pool_kwargs(app_name))
    try:
        await pool.open()
        conn = await pool.getconn()
        await conn.execute("SELECT 1")  # a transaction is open: putconn rolls back
        task = asyncio.ensure_future(pool.putconn(conn))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await poll(lambda: in_use(pool) == 0, SETTLE, lambda: f"slot back: {pool.get_stats()}")
        async with pool.connection(timeout=2) as again:
            assert await again.fetchval("SELECT 1") == 1
    finally:
        with anyio.move_on_after(5, shield=True):
            await pool.close(timeout=0.1)


def _rollback_escapes_once() -> tuple[type[psycopg2.extensions.connection], list[bool]]:
    armed = [False]

    class EscapingRollback(psycopg2.extensions.connection):
        def rollback(self) -> None:
            if armed[0]:
                armed[0] = False
                raise Escape
            super().rollback()

    return EscapingRollback, armed


async def test_rollback_raising_baseexception_keeps_the_slot(
    anyio_backend: str, dsn: str, app_name: str
) -> None:
    """The return's rollback raises a BaseException (not an Exception): the
    connection may be discarded, but its slot must come back."""
    factory, armed = _rollback_escapes_once()
    # (a connection class of the test's own runs in threads: io="loop" would refuse it)
    pool = AsyncConnectionPool(1, 1, dsn, connection_factory=factory, **pool_kwargs(app_name, io="auto"))
    try:
        await pool.open()
        conn = await pool.getconn()
        await conn.execute("SELECT 1")
        armed[0] = True
        with contextlib.suppress(Escape):
            await pool.putconn(conn)
        assert not armed[0], "the rollback was not reached"
        await assert_pool_sound(pool, dsn, app_name, timeout=SETTLE)
    finally:
        with anyio.move_on_after(5, shield=True):
            await pool.close(timeout=0.1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_close_timed_out_by_wait_for_is_never_half_done(
    anyio_backend: str, dsn: str, app_name: str
) -> None:
    """close() cut by ``asyncio.wait_for`` while a connection is lent: either it
    finishes in the background (once the connection is back: no backend, no
    thread left) or the pool stays open and whole."""
    pool = AsyncConnectionPool(2, 2, dsn, **pool_kwargs(app_name))
    try:
        await pool.open()
        conn = await pool.getconn()
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await asyncio.wait_for(pool.close(), 0.1)
        await assert_pool_sound(pool, dsn, app_name, [conn], timeout=SETTLE)
    finally:
        with anyio.move_on_after(5, shield=True):
            await pool.close(timeout=0.1)


async def test_unclosed_pool_warns_and_stops(anyio_backend: str, dsn: str, app_name: str) -> None:
    """Opened, used and dropped without close(): when collected it warns with a
    ResourceWarning, and its threads and connections go."""
    name = unique("unclosed-")

    async def use_and_drop() -> weakref.ref[AsyncConnectionPool]:
        pool = AsyncConnectionPool(1, 2, dsn, name=name, application_name=app_name)
        await pool.open()
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        return weakref.ref(pool)

    # The last reference goes when use_and_drop() returns: that is when it warns.
    with pytest.warns(ResourceWarning, match="never closed"):
        ref = await use_and_drop()
        await poll(lambda: gc.collect() >= 0 and ref() is None, SETTLE, "the dropped pool collected")
    try:
        await wait_backends(dsn, app_name, 0, SETTLE)
        await poll(lambda: not pool_threads(name), SETTLE, "its threads stopped")
    finally:
        pool = ref()
        if pool is not None:
            with anyio.move_on_after(5, shield=True):
                await pool.close(timeout=0.1)
            del pool


async def test_too_many_requests_names_the_pool(anyio_backend: str, dsn: str, app_name: str) -> None:
    options = pool_kwargs(app_name, max_waiting=1)
    async with AsyncConnectionPool(1, 1, dsn, **options) as pool:
        held = await pool.getconn()
        async with anyio.create_task_group() as group:
            group.start_soon(pool.fetchval, "SELECT 1")  # the one allowed to wait
            await poll(lambda: pool.get_stats()["requests_waiting"] == 1, 10, "one waiting")
            with pytest.raises(TooManyRequests) as info:
                await pool.getconn()
            await pool.putconn(held)
    assert options["name"] in str(info.value)
    assert "max_waiting=1" in str(info.value)


async def _close_under_the_body(dsn: str, app_name: str) -> tuple[BaseException | None, int]:
    """An INSERT inside ``async with pool.connection()``; close(timeout=0.2) meanwhile;
    then the block ends. Returns (what the block raised, rows committed)."""
    table = unique("t_close_")
    server_query(dsn, f"CREATE TABLE {table} (x int)")
    inserted, closed = anyio.Event(), anyio.Event()
    raised: list[BaseException | None] = [None]
    pool = AsyncConnectionPool(1, 1, dsn, **pool_kwargs(app_name))

    async def body() -> None:
        try:
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                inserted.set()
                await closed.wait()
        except Exception as exc:
            raised[0] = exc

    try:
        await pool.open()
        async with anyio.create_task_group() as group:
            group.start_soon(body)
            await inserted.wait()
            await pool.close(timeout=0.2)
            closed.set()
        rows = server_query(dsn, f"SELECT count(*) FROM {table}")[0][0]
        await wait_closed_down(pool, dsn, app_name, SETTLE)
        return raised[0], rows
    finally:
        with anyio.move_on_after(5, shield=True):
            await pool.close(timeout=0.1)
        server_query(dsn, f"DROP TABLE {table}")


async def test_close_never_loses_a_transaction_silently(anyio_backend: str, dsn: str, app_name: str) -> None:
    """Either the block raises, or its row is committed; never a clean exit and no row."""
    raised, rows = await _close_under_the_body(dsn, app_name)
    assert raised is not None or rows == 1, "the block ended normally and its INSERT was lost"


async def test_close_under_a_block_raises(anyio_backend: str, dsn: str, app_name: str) -> None:
    """The behaviour chosen (see tests/PEERS.md; psycopg_pool commits instead, as
    its close() never closes a lent connection): close(timeout) closes a lent
    connection once its timeout has passed, and the block then raises PoolClosed
    saying its transaction was not committed."""
    raised, rows = await _close_under_the_body(dsn, app_name)
    assert isinstance(raised, PoolClosed), raised
    assert "NOT committed" in str(raised)
    assert rows == 0
