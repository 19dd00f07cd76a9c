"""aiopg's pool tests, ported to this pool's API in our own words.

Source: aio-libs/aiopg ``tests/test_pool.py``, read at commit eabd521. Each test
names the one it ports. aiopg's ``size``/``freesize`` are our ``pool_size`` and
``pool_available``; ``acquire``/``release`` are ``getconn``/``putconn``;
``on_connect`` is ``configure``; ``terminate`` is ``closeall``; ``pool_recycle``
is ``max_lifetime``. aiopg-only features (echo, cursors from the pool, unlimited
size) have no counterpart. Where we differ on purpose, tests/PEERS.md says why;
a test failing because of a defect of issue 7 carries a strict xfail naming it.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import weakref
from typing import Any

import anyio
import anyio.to_thread
import psycopg2.extensions
import pytest

from pgpool_async import AsyncConnection, AsyncConnectionPool, PoolClosed, PoolConfigError, PoolTimeout

from .conftest import server_query
from .gates import assert_pool_sound, in_use, poll, pool_threads, wait_backends

pytestmark = pytest.mark.anyio


@pytest.fixture
def make(dsn: str, app_name: str) -> Any:
    """``make(minconn, maxconn, **options)``: an unopened pool on the test server."""

    def make(minconn: int, maxconn: int, **options: Any) -> AsyncConnectionPool:
        options.setdefault("name", f"ap-{uuid.uuid4().hex[:10]}")
        options.setdefault("timeout", 5)
        return AsyncConnectionPool(minconn, maxconn, dsn, application_name=app_name, **options)

    return make


def size(pool: AsyncConnectionPool) -> tuple[int, int]:
    """aiopg's (size, freesize)."""
    stats = pool.get_stats()
    return stats["pool_size"], stats["pool_available"]


async def test_create_pool(make: Any) -> None:
    """Ports test_create_pool (our sizes are explicit; see PEERS.md)."""
    async with make(1, 10) as pool:
        assert (pool.minconn, pool.maxconn, pool.timeout) == (1, 10, 5)
        assert size(pool) == (1, 1)


async def test_create_pool2(make: Any) -> None:
    """Ports test_create_pool2."""
    async with make(5, 20) as pool:
        assert size(pool) == (5, 5)


async def test_acquire(make: Any) -> None:
    """Ports test_acquire."""
    async with make(1, 10) as pool:
        conn = await pool.getconn()
        assert isinstance(conn, AsyncConnection)
        assert not conn.closed
        assert await conn.fetchone("SELECT 1") == (1,)
        await pool.putconn(conn)


async def test_release(make: Any) -> None:
    """Ports test_release."""
    async with make(10, 10) as pool:
        conn = await pool.getconn()
        assert size(pool) == (10, 9)
        await pool.putconn(conn)
        assert size(pool) == (10, 10)
        assert conn.released


async def test_release_closed(make: Any) -> None:
    """Ports test_release_closed: a connection closed by its user frees its slot
    on return, and minconn is refilled (in the background, here)."""
    async with make(10, 10) as pool:
        conn = await pool.getconn()
        await conn.run_sync(lambda raw: raw.close())
        await pool.putconn(conn)
        assert in_use(pool) < 2  # its slot is free, or already being refilled
        await poll(lambda: size(pool) == (10, 10), 10, "minconn refilled")
        again = await pool.getconn()
        assert size(pool) == (10, 9)
        await pool.putconn(again)


async def test_bad_context_manager_usage(make: Any) -> None:
    """Ports test_bad_context_manager_usage: the pool is an async context manager only."""
    pool = make(1, 1)
    with pytest.raises((TypeError, AttributeError)):
        with pool:
            pass


async def test_context_manager(make: Any) -> None:
    """Ports test_context_manager."""
    async with make(10, 10) as pool:
        async with pool.connection() as conn:
            assert isinstance(conn, AsyncConnection)
            assert size(pool) == (10, 9)
        assert size(pool) == (10, 10)


async def test_clear(make: Any) -> None:
    """Ports test_clear as drain(): the idle connections are replaced."""
    async with make(2, 2) as pool:
        async with pool.connection() as a, pool.connection() as b:
            before = {a.raw.get_backend_pid(), b.raw.get_backend_pid()}
        await pool.drain()
        await poll(lambda: size(pool) == (2, 2), 10, "minconn reopened")
        async with pool.connection() as a, pool.connection() as b:
            assert not before & {a.raw.get_backend_pid(), b.raw.get_backend_pid()}


async def test_initial_empty(make: Any) -> None:
    """Ports test_initial_empty: with minconn 0 the pool grows as lent and keeps
    returned connections idle."""
    async with make(0, 10) as pool:
        assert size(pool) == (0, 0)
        async with pool.connection():
            assert size(pool) == (1, 0)
        assert size(pool) == (1, 1)
        one = await pool.getconn()
        assert size(pool) == (1, 0)
        two = await pool.getconn()
        assert size(pool) == (2, 0)
        await pool.putconn(one)
        assert size(pool) == (2, 1)
        await pool.putconn(two)
        assert size(pool) == (2, 2)


async def test_parallel_tasks(make: Any) -> None:
    """Ports test_parallel_tasks and test_parallel_tasks_more (which connection
    comes next differs: see PEERS.md)."""
    async with make(0, 3) as pool:
        conns: list[AsyncConnection] = []

        async def take() -> None:
            conns.append(await pool.getconn())

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(take)
        assert size(pool) == (3, 0)
        raws = [c.raw for c in conns]
        for i, conn in enumerate(conns):
            await pool.putconn(conn)
            assert size(pool) == (3, i + 1)
        assert not any(raw.closed for raw in raws)
        again = await pool.getconn()
        assert again.raw is raws[-1]  # the most recently returned
        await pool.putconn(again)


async def test_fill_free(make: Any) -> None:
    """Ports test_fill_free and test_connect_from_acquire."""
    async with make(0, 10) as pool:
        async with pool.connection():
            assert size(pool) == (1, 0)
            with anyio.fail_after(5):
                conn = await pool.getconn()
            assert size(pool) == (2, 0)
            await pool.putconn(conn)
            assert size(pool) == (2, 1)
        assert size(pool) == (2, 2)


async def test_create_pool_with_timeout(make: Any) -> None:
    """Ports test_create_pool_with_timeout (the timeout is for waiting, not queries)."""
    async with make(0, 1, timeout=0.1) as pool:  # minconn 0: open() does not race 0.1 s
        assert pool.timeout == 0.1


async def test_concurrency(make: Any) -> None:
    """Ports test_concurrency."""
    async with make(2, 4) as pool:
        one, two = await pool.getconn(), await pool.getconn()
        assert size(pool) == (2, 0)
        await pool.putconn(one)
        await pool.putconn(two)


@pytest.mark.parametrize("sizes", [(-1, 10), (5, 2)])
async def test_invalid_sizes(sizes: tuple[int, int], dsn: str) -> None:
    """Ports test_invalid_minsize and test_invalid__maxsize."""
    with pytest.raises(PoolConfigError):
        AsyncConnectionPool(sizes[0], sizes[1], dsn)


async def test_true_parallel_tasks(make: Any) -> None:
    """Ports test_true_parallel_tasks: with maxconn 1, two tasks share one
    connection, never two."""
    biggest, least_free = 0, 100
    async with make(0, 1) as pool:

        async def inner() -> None:
            nonlocal biggest, least_free
            conn = await pool.getconn()
            biggest, least_free = max(biggest, size(pool)[0]), min(least_free, size(pool)[1])
            await anyio.sleep(0.01)
            await pool.putconn(conn)

        async with anyio.create_task_group() as group:
            group.start_soon(inner)
            group.start_soon(inner)
    assert (biggest, least_free) == (1, 0)


async def test_wait_closed(make: Any) -> None:
    """Ports test_wait_closed: close() waits for the lent connections to come back."""
    ops: list[str] = []
    pool = make(10, 10)
    await pool.open()
    one, two = await pool.getconn(), await pool.getconn()

    async def give_back(conn: AsyncConnection) -> None:
        await pool.putconn(conn)
        ops.append("release")

    async def close() -> None:
        await pool.close()
        ops.append("closed")

    async with anyio.create_task_group() as group:
        group.start_soon(close)
        await poll(lambda: pool.closed, 10, "closing")
        group.start_soon(give_back, one)
        group.start_soon(give_back, two)
    assert ops == ["release", "release", "closed"]
    assert size(pool)[1] == 0


async def test_cannot_acquire_after_closing(make: Any) -> None:
    """Ports test_cannot_acquire_after_closing."""
    pool = make(1, 1)
    await pool.open()
    await pool.close()
    with pytest.raises(PoolClosed):
        await pool.getconn()


async def test_terminate_with_acquired_connections(make: Any, dsn: str, app_name: str) -> None:
    """Ports test_terminate_with_acquired_connections: closeall() closes lent ones too."""
    pool = make(1, 1)
    await pool.open()
    conn = await pool.getconn()
    raw = conn.raw
    await pool.closeall()
    assert raw.closed
    await wait_backends(dsn, app_name, 0)


async def test_release_closed_connection(make: Any) -> None:
    """Ports test_release_closed_connection."""
    async with make(1, 1) as pool:
        conn = await pool.getconn()
        await conn.run_sync(lambda raw: raw.close())
        await pool.putconn(conn)


async def test_release_terminated_pool(make: Any) -> None:
    """Ports test_release_terminated_pool and ..._with_wait_release: returning
    to a pool closed meanwhile is quiet."""
    pool = make(1, 1)
    await pool.open()
    conn = await pool.getconn()
    await pool.closeall()
    await pool.putconn(conn)
    assert conn.released


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_close_with_acquired_connections(make: Any, dsn: str, app_name: str) -> None:
    """Ports test_close_with_acquired_connections: close() cannot finish while a
    connection is lent, so ``wait_for`` times out -- and leaves no half-closed
    pool behind once the connection comes back."""
    pool = make(1, 1)
    await pool.open()
    try:
        conn = await pool.getconn()
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await asyncio.wait_for(pool.close(), 0.1)
        await assert_pool_sound(pool, dsn, app_name, [conn], timeout=1.0)
    finally:
        with anyio.move_on_after(5, shield=True):
            await pool.close(timeout=0.1)


async def test___del__(make: Any) -> None:
    """Ports test___del__: an open pool dropped without close() warns."""
    pool = make(1, 1)
    await pool.open()
    name = pool.name
    ref = weakref.ref(pool)
    try:
        with pytest.warns(ResourceWarning, match="never closed"):
            del pool  # the last reference: it warns now
            await poll(lambda: gc.collect() >= 0 and ref() is None, 1.0, "the dropped pool collected")
        await poll(lambda: not pool_threads(name), 1.0, "its threads stopped")
    finally:
        left = ref()
        if left is not None:
            with anyio.move_on_after(5, shield=True):
                await left.close(timeout=0.1)
            del left


async def test_connection_closed_after_timeout(make: Any) -> None:
    """Ports test_connection_closed_after_timeout, where we differ (PEERS.md): a
    timed-out query is cancelled on the server and its connection kept."""
    async with make(1, 1) as pool:
        with anyio.move_on_after(0.1) as scope:
            async with pool.connection() as conn:
                first = conn.raw.get_backend_pid()
                await conn.execute("SELECT pg_sleep(10)")
        assert scope.cancelled_caught
        assert size(pool) == (1, 1)
        async with pool.connection() as conn:
            assert conn.raw.get_backend_pid() == first
            assert await conn.fetchone("SELECT 1") == (1,)


async def test_connection_in_good_state_after_timeout_in_transaction(
    make: Any, dsn: str, app_name: str
) -> None:
    """Ports test_connection_in_good_state_after_timeout_in_transaction."""
    async with make(1, 1) as pool:
        with anyio.move_on_after(0.1):
            async with pool.connection() as conn:
                await conn.execute("BEGIN")
                await conn.execute("SELECT pg_sleep(10)")
        async with pool.connection() as conn:
            assert await conn.fetchone("SELECT 1") == (1,)
        states = await wait_backends(dsn, app_name, 1)
        assert states == ["idle"]


async def test_drop_connection_if_timedout(make: Any, dsn: str, app_name: str) -> None:
    """Ports test_drop_connection_if_timedout: every backend terminated behind
    the pool's back; the next request still gets a working connection."""
    async with make(3, 3) as pool:
        await anyio.to_thread.run_sync(
            server_query,
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )
        await wait_backends(dsn, app_name, 0)
        async with pool.connection() as conn:
            assert await conn.fetchone("SELECT 1") == (1,)


@pytest.mark.parametrize("minconn", [0, 1])
async def test_pool_on_connect(make: Any, minconn: int) -> None:
    """Ports test_pool_on_connect: ``configure`` runs once per connection."""
    calls = 0

    def configure(raw: Any) -> None:
        nonlocal calls
        with raw.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == [(1,)]
        calls += 1

    async with make(minconn, 1, configure=configure) as pool:
        for _ in range(2):
            assert await pool.fetchone("SELECT 1") == (1,)
    assert calls == 1


async def test_acquire_timeout_no_connections_available(make: Any) -> None:
    """Ports test_acquire_timeout_no_connections_available."""
    async with make(1, 1, timeout=5) as pool, pool.connection():
        with pytest.raises(PoolTimeout):
            async with pool.connection(timeout=0.1):
                pytest.fail("should not be here")


async def test_release_with_invalid_status(make: Any) -> None:
    """Ports test_release_with_invalid_status, where we differ (PEERS.md): a
    connection returned inside a transaction is rolled back and kept, quietly."""
    async with make(10, 10) as pool:
        conn = await pool.getconn()
        raw = conn.raw
        await conn.execute("BEGIN")
        assert raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        await pool.putconn(conn)
        assert size(pool) == (10, 10)
        assert not raw.closed
        assert raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
