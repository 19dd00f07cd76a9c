"""The same pool under trio, through anyio's pytest plugin."""

from __future__ import annotations

import random

import anyio
import pytest

from pgpool_async import AsyncConnectionPool, PoolClosed, PoolTimeout

from .conftest import backends, server_query
from .test_cancellation import cancel_a_long_query

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def test_basic_and_timeout_on_trio(dsn: str) -> None:
    import trio.lowlevel

    assert trio.lowlevel.in_trio_run()
    server_query(dsn, "DROP TABLE IF EXISTS t_trio; CREATE TABLE t_trio (x int)")
    async with AsyncConnectionPool(1, 2, dsn, timeout=5) as pool:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO t_trio VALUES (1)")
        assert await pool.fetchval("SELECT count(*) FROM t_trio") == 1
        a, b = await pool.getconn(), await pool.getconn()
        with pytest.raises(PoolTimeout, match=r"after 0\.10 sec"):
            await pool.getconn(timeout=0.1)
        await pool.putconn(a)
        await pool.putconn(b)
    with pytest.raises(PoolClosed):
        await pool.getconn()


async def test_random_cancellation_on_trio(dsn: str, app_name: str) -> None:
    rng = random.Random(7)

    async def one() -> None:
        with anyio.move_on_after(rng.choice([0.0, 0.001, 0.003, 1.0])):
            async with pool.connection(timeout=2) as conn:
                await conn.execute("SELECT pg_sleep(0.001)")

    async with AsyncConnectionPool(1, 4, dsn, application_name=app_name) as pool:
        for _ in range(10):
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(one)
        with anyio.fail_after(10):
            while pool._ledger.opening_count or pool._ledger.returning_count:
                await anyio.sleep(0.01)
        conns = [await pool.getconn(timeout=5) for _ in range(4)]
        assert "idle in transaction" not in [s for s, _ in backends(dsn, app_name)]
        for conn in conns:
            await pool.putconn(conn)


async def test_cancelled_query_is_cancelled_on_the_server_on_trio(dsn: str, app_name: str) -> None:
    await cancel_a_long_query(dsn, app_name)
