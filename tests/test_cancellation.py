"""Cancellation at any point never leaks a connection nor returns one mid-transaction."""

from __future__ import annotations

import asyncio
import random
import time

import anyio
import pytest

from pgpool_async import AsyncConnectionPool, PoolTimeout
from pgpool_async.testing.faultproxy import FaultProxy

from .conftest import server_query
from .fix_dsn import tcp_address

pytestmark = pytest.mark.asyncio


class Boom(Exception):
    pass


async def assert_pool_whole(pool: AsyncConnectionPool, dsn: str, app_name: str) -> None:
    """All maxconn connections can be lent at once; none is in a transaction."""
    with anyio.fail_after(10):  # connects and returns cut short by cancellations may still land
        while pool._ledger.opening_count or pool._ledger.returning_count:
            await anyio.sleep(0.01)
    conns = [await pool.getconn(timeout=5) for _ in range(pool.maxconn)]
    assert all(not c.raw.closed for c in conns)
    assert len({id(c.raw) for c in conns}) == pool.maxconn
    # Our maxconn backends are idle; the backend of a connection the pool closed
    # may linger a moment in pg_stat_activity, so allow it time to go.
    pids = {c.raw.get_backend_pid() for c in conns}
    with anyio.fail_after(10):
        while True:
            rows = server_query(
                dsn,
                "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
                (app_name,),
            )
            if {pid for pid, _ in rows} == pids:
                break
            await anyio.sleep(0.01)
    assert {state for _, state in rows} == {"idle"}
    for conn in conns:
        await pool.putconn(conn)


async def test_thousands_of_random_cancellations(dsn: str, app_name: str) -> None:
    server_query(dsn, "CREATE TABLE IF NOT EXISTS cancel_t (x int)")
    rng = random.Random(1234)
    outcomes = {"ok": 0, "cancelled": 0, "boom": 0, "timeout": 0}
    max_gap = 0.0

    async def ticker() -> None:
        nonlocal max_gap
        last = time.monotonic()
        while True:
            await anyio.sleep(0.001)
            now = time.monotonic()
            max_gap = max(max_gap, now - last)
            last = now

    async def one(i: int) -> None:
        deadline = rng.choice([0.0, 0.0005, 0.001, 0.002, 0.005, 0.02, 1.0])
        with anyio.move_on_after(deadline) as scope:
            try:
                async with pool.connection(timeout=rng.choice([0.01, 5.0])) as conn:
                    await conn.execute("INSERT INTO cancel_t VALUES (%s)", (i,))
                    if rng.random() < 0.2:
                        raise Boom
                    if rng.random() < 0.3:
                        await conn.fetchval("SELECT pg_sleep(0.001)")
                outcomes["ok"] += 1
            except Boom:
                outcomes["boom"] += 1
            except PoolTimeout:
                outcomes["timeout"] += 1
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1

    async with AsyncConnectionPool(2, 8, dsn, application_name=app_name) as pool:
        async with anyio.create_task_group() as outer:
            outer.start_soon(ticker)
            for batch in range(40):
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(one, batch * 50 + i)
            outer.cancel_scope.cancel()
        assert sum(outcomes.values()) >= 2000
        # Each kind of ending happened often (how often depends on the machine's load).
        assert outcomes["cancelled"] > 200 and outcomes["ok"] > 50 and outcomes["boom"] > 10
        await assert_pool_whole(pool, dsn, app_name)
        assert pool.get_stats()["requests_waiting"] == 0
    # A generous bound: the loop was never blocked by connects or queries.
    assert max_gap < 0.5, f"event loop stalled {max_gap:.3f} s"


async def test_asyncio_task_cancel_and_wait_for(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 3, dsn, application_name=app_name) as pool:

        async def hold() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                await asyncio.sleep(10)

        tasks = [asyncio.create_task(hold()) for _ in range(6)]
        await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):
            try:
                await asyncio.wait_for(pool.fetchval("SELECT pg_sleep(0.001)"), 0.0005)
            except (TimeoutError, asyncio.TimeoutError):
                pass
        await assert_pool_whole(pool, dsn, app_name)


async def test_cancel_while_worker_connects(dsn: str, app_name: str) -> None:
    """A connection that lands after its requester gave up goes to the pool."""
    with FaultProxy(*tcp_address(dsn)) as proxy:
        proxy.delay(connect=0.5)
        async with AsyncConnectionPool(0, 2, proxy.dsn(dsn), application_name=app_name) as pool:
            with anyio.move_on_after(0.1) as scope:
                await pool.getconn()
            assert scope.cancelled_caught
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0.1)
            with anyio.fail_after(10):
                while pool.get_stats()["pool_available"] < 1:
                    await anyio.sleep(0.01)
            proxy.passthrough()
            await assert_pool_whole(pool, dsn, app_name)


async def test_cancel_while_returning(dsn: str, app_name: str) -> None:
    """Cancelled during the rollback of a return: the return still completes."""
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        for _ in range(50):
            with anyio.CancelScope() as scope:
                conn = await pool.getconn()
                await conn.execute("SELECT 1")  # leaves a transaction open
                scope.cancel()
                await pool.putconn(conn)  # shielded rollback, then the cancel lands
            assert conn.released
        await assert_pool_whole(pool, dsn, app_name)


async def test_cancelled_query_is_cancelled_on_the_server(dsn: str, app_name: str) -> None:
    await cancel_a_long_query(dsn, app_name)


async def cancel_a_long_query(dsn: str, app_name: str) -> None:
    """A timeout around a long query ends it on the server: the caller is not
    held for the query's whole run, and the connection comes back clean.
    (Shared with the trio tests.)"""
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        started = time.monotonic()
        with anyio.move_on_after(0.2) as scope:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert time.monotonic() - started < 10  # generous: the query would take 30 s
        await assert_pool_whole(pool, dsn, app_name)
