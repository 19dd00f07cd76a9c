"""A cancelled caller of ``run_sync`` cancels the statement its function is running,
on the server, whatever way it was cancelled (an anyio scope on asyncio and trio,
``task.cancel()``, ``asyncio.wait_for``), and the pool stays whole. Real server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import psycopg2.extensions
import pytest

from pgpool_async import AsyncConnectionPool

from .conftest import server_query

pytestmark = [pytest.mark.anyio]

SLEEP = 20  # seconds the server would sleep if nobody cancelled it
BOUND = 6.0  # seconds a cancelled call may take: the cancel's grace and a margin


def sleeper(raw: Any) -> None:
    with raw.cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", (SLEEP,))


async def _assert_cancelled_on_the_server(dsn: str, app_name: str, pool: AsyncConnectionPool) -> None:
    rows = await anyio.to_thread.run_sync(
        lambda: server_query(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND query LIKE 'SELECT pg_sleep%%' AND state = 'active'",
            (app_name,),
        )
    )
    assert rows[0][0] == 0
    assert await pool.fetchval("SELECT 1") == 1  # the pool is whole


@pytest.mark.parametrize("where", ["pool", "connection"])
async def test_a_scope_cancels_run_sync_on_the_server(dsn: str, app_name: str, where: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name, timeout=5) as pool:
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            if where == "pool":
                await pool.run_sync(sleeper)
            else:
                async with pool.connection() as conn:
                    await conn.run_sync(sleeper)
        assert scope.cancelled_caught
        assert time.monotonic() - started < BOUND
        await _assert_cancelled_on_the_server(dsn, app_name, pool)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["task.cancel", "wait_for"])
async def test_asyncio_cancels_run_sync_on_the_server(dsn: str, app_name: str, how: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name, timeout=5) as pool:
        started = time.monotonic()
        if how == "wait_for":
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.run_sync(sleeper), 0.5)
        else:

            async def in_a_block() -> None:
                async with pool.connection() as conn:
                    await conn.run_sync(sleeper)

            task = asyncio.ensure_future(in_a_block())
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert time.monotonic() - started < BOUND
        await _assert_cancelled_on_the_server(dsn, app_name, pool)


async def test_the_function_sees_psycopg2s_query_canceled(dsn: str) -> None:
    seen: list[BaseException] = []

    def records(raw: Any) -> None:
        try:
            sleeper(raw)
        except BaseException as exc:
            seen.append(exc)
            raise

    async with AsyncConnectionPool(1, 1, dsn, timeout=5) as pool:
        with anyio.move_on_after(0.5):
            await pool.run_sync(records)
    assert len(seen) == 1 and isinstance(seen[0], psycopg2.extensions.QueryCanceledError), seen
