"""The pool's loop-native statements (io="loop") on uvloop.

uvloop implements ``add_reader`` and futures in C, with its own ordering of
callbacks: the loop-native runner's reader callback, its futures and its
cancellation path run here on a ``uvloop.Loop`` (anyio's asyncio backend with
``use_uvloop``, which runs the test in ``asyncio.Runner(loop_factory=uvloop.new_event_loop)``).
The conftest guards stay on (blockbuster, the libpq wait guard).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import anyio
import psycopg2.errors
import pytest

from pgpool_async import AsyncConnectionPool
from pgpool_async._loop.native import unavailable_reason

from .conftest import backends

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.single_io("every pool here passes io='loop' itself"),
    pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]),
    # uvloop runs its loop in C, where pytest-timeout's SIGALRM is never seen: a hang
    # must end the run (the thread method) rather than stall it.
    pytest.mark.timeout(120, method="thread"),
]


def _missing(what: str) -> None:
    """A missing component skips locally, fails in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run this test)")
    pytest.skip(what)


@pytest.fixture(autouse=True)
def _on_uvloop(anyio_backend: Any) -> None:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - in the test extra (not on Windows)
        _missing("uvloop is not installed (pip install uvloop)")
    if unavailable_reason() is not None:  # pragma: no cover - Linux with psycopg2 finds it
        _missing(f"the loop-native path is unavailable here: {unavailable_reason()}")


def _assert_uvloop() -> None:
    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def assert_clean(pool: AsyncConnectionPool, dsn: str, app_name: str, timeout: float = 10.0) -> None:
    """Every connection back and idle in the pool, its backend idle on the server
    (no statement left running, no transaction left open), the stats consistent."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pool.get_stats()
        states = await anyio.to_thread.run_sync(backends, dsn, app_name)
        if (
            stats["pool_available"] == stats["pool_size"]
            and stats["requests_waiting"] == 0
            and len(states) == stats["pool_size"]
            and all(state == "idle" for state, _ in states)
        ):
            return
        assert time.monotonic() < deadline, f"not clean: {stats}, backends {states}"
        await anyio.sleep(0.02)


async def test_statements_and_transactions_on_uvloop(dsn: str, app_name: str) -> None:
    _assert_uvloop()
    table = f"t_uvloop_{os.getpid()}"
    async with AsyncConnectionPool(1, 3, dsn, io="loop", application_name=app_name) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await pool.execute(f"CREATE TABLE {table} (x int)")
        try:
            async with pool.connection() as conn:
                assert await conn.fetchall("SELECT %s::int, %s::text", (1, "one")) == [(1, "one")]
                assert conn.loan.on_loop
                assert await conn.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)") == 3
            # Committed on success.
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 3
            # Rolled back on error.
            with pytest.raises(psycopg2.errors.DivisionByZero):
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (10)")
                    await conn.execute("SELECT 1 / 0")
            assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE x = 10") == 0
            # A savepoint rolled back inside a committed transaction.
            async with pool.connection() as conn:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (20)")
                    with pytest.raises(psycopg2.errors.UniqueViolation):
                        async with conn.transaction():
                            await conn.execute(f"INSERT INTO {table} VALUES (21)")
                            await conn.execute("DO $$ BEGIN RAISE unique_violation; END $$")
                    assert await conn.fetchval("SELECT 1") == 1
                    assert conn.loan.on_loop
            assert await pool.fetchall(f"SELECT x FROM {table} WHERE x >= 20") == [(20,)]

            # Many tasks over a few connections.
            async def task(n: int) -> int:
                async with pool.connection() as conn:
                    return int(await conn.fetchval("SELECT %s + 0", (n,)))

            results = await asyncio.gather(*(task(n) for n in range(50)))
            assert results == list(range(50))
        finally:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await assert_clean(pool, dsn, app_name)


@pytest.mark.parametrize("autocommit", [False, True], ids=["tx", "autocommit"])
async def test_wait_for_cancels_a_statement_on_uvloop(dsn: str, app_name: str, autocommit: bool) -> None:
    _assert_uvloop()
    async with AsyncConnectionPool(
        1, 1, dsn, io="loop", application_name=app_name, autocommit=autocommit
    ) as pool:
        started = time.monotonic()
        # The one-hop helper: the connection goes back to the pool by itself.
        with pytest.raises(asyncio.TimeoutError):  # the builtin TimeoutError from 3.11 on
            await asyncio.wait_for(pool.execute("SELECT pg_sleep(30)"), 0.2)
        assert time.monotonic() - started < 10  # cancelled on the server, not slept out
        await assert_clean(pool, dsn, app_name)
        assert await pool.fetchval("SELECT 1") == 1
        # Inside a loan: the connection stays usable after the cancel.
        async with pool.connection() as conn:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(30)"), 0.2)
            assert not conn.closed
            if not autocommit:
                await conn.rollback()  # the cancel failed the transaction, as on psycopg2
            assert await conn.fetchval("SELECT 2") == 2
            assert conn.loan.on_loop
        await assert_clean(pool, dsn, app_name)
        stats = pool.get_stats()
        assert stats["pool_size"] == 1 and stats["pool_available"] == 1
        assert stats.get("returns_bad", 0) == 0 and stats.get("connections_lost", 0) == 0


async def test_task_cancel_cancels_a_statement_on_uvloop(dsn: str, app_name: str) -> None:
    _assert_uvloop()
    async with AsyncConnectionPool(1, 2, dsn, io="loop", application_name=app_name) as pool:
        running = asyncio.Event()

        async def sleeper() -> None:
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")
                assert conn.loan.on_loop
                running.set()
                await conn.execute("SELECT pg_sleep(30)")

        async def helper_sleeper() -> None:
            await pool.execute("SELECT pg_sleep(30)")

        for body in (sleeper, helper_sleeper):
            task = asyncio.get_running_loop().create_task(body())
            if body is sleeper:
                await asyncio.wait_for(running.wait(), 10)
            await asyncio.sleep(0.2)
            assert not task.done()
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - started < 10
            await assert_clean(pool, dsn, app_name)
            # The next loans run on the loop again, on a clean connection.
            async with pool.connection() as conn:
                assert await conn.fetchval("SELECT current_setting('transaction_isolation')") is not None
                assert await conn.fetchval("SELECT 3") == 3
                assert conn.loan.on_loop
            await assert_clean(pool, dsn, app_name)
        stats = pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"] >= 1
        assert stats["requests_num"] >= 4
        assert stats.get("connections_leaked", 0) == 0
