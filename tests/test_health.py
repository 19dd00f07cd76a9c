"""Health and lifecycle: checks, hooks, lifetimes, refills, resize, drain, close."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import psycopg2
import pytest

from pgpool_async import AsyncConnectionPool, PoolConfigError, PoolTimeout
from pgpool_async.testing.faultproxy import FaultProxy

from .conftest import server_query
from .fix_dsn import tcp_address
from .gates import pool_kwargs

pytestmark = pytest.mark.anyio


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` to hold, polling; fail after ``timeout``."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def pids(dsn: str, app_name: str) -> set[int]:
    rows = server_query(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,))
    return {r[0] for r in rows}


async def test_check_runs_only_after_idle_and_discards_failures(dsn: str) -> None:
    calls: list[int] = []

    def check(raw: Any) -> None:
        calls.append(raw.get_backend_pid())
        if len(calls) == 1:
            raise psycopg2.OperationalError("pretend this one is dead")

    async with AsyncConnectionPool(2, 2, dsn, check=check, check_idle=0.2) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        assert calls == []  # fresh connections are not checked
        await anyio.sleep(0.3)
        assert await pool.fetchval("SELECT 2") == 2
        # The first check failed: that connection was dropped, the next one checked and used.
        assert len(calls) == 2 and calls[0] != calls[1]
        assert pool.get_stats()["connections_lost"] == 1
        await until(lambda: pool.get_stats()["pool_size"] == 2)  # refilled in the background


async def test_builtin_check_catches_terminated_backends(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(3, 3, dsn, check=True, check_idle=0, application_name=app_name) as pool:
        before = pids(dsn, app_name)
        server_query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )
        results = [await pool.fetchval("SELECT 1") for _ in range(20)]
        assert results == [1] * 20
        assert pids(dsn, app_name).isdisjoint(before)


async def test_configure_and_reset_hooks(dsn: str) -> None:
    resets: list[int] = []

    def configure(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SET search_path TO pg_catalog, public")

    def reset(raw: Any) -> None:
        resets.append(1)
        with raw.cursor() as cur:
            cur.execute("RESET work_mem")

    async with AsyncConnectionPool(1, 1, dsn, configure=configure, reset=reset) as pool:
        async with pool.connection() as conn:
            assert await conn.fetchval("SHOW search_path") == "pg_catalog, public"
            await conn.execute("SET work_mem = '7MB'")
        assert resets == [1]
        assert await pool.fetchval("SHOW work_mem") != "7MB"


async def test_failing_configure_on_a_real_server(dsn: str) -> None:
    def configure(raw: Any) -> None:
        raise RuntimeError("cannot set up")

    pool = AsyncConnectionPool(1, 1, dsn, configure=configure, timeout=0.5)
    with pytest.raises(PoolTimeout) as info:
        await pool.open()
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_failing_reset_discards(dsn: str) -> None:
    def reset(raw: Any) -> None:
        raise RuntimeError("reset failed")

    async with AsyncConnectionPool(1, 1, dsn, reset=reset) as pool:
        conn = await pool.getconn()
        raw = conn.raw
        await pool.putconn(conn)
        assert raw.closed
        assert pool.get_stats()["returns_bad"] == 1
        assert await pool.fetchval("SELECT 1") == 1


async def test_max_lifetime_replaces_in_background(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(3, 3, dsn, max_lifetime=0.3, application_name=app_name) as pool:
        first = pids(dsn, app_name)
        expiries = {slot.expires_at for slot in pool._ledger._idle}
        assert len(expiries) == 3  # jitter: not all at once
        await anyio.sleep(0.6)
        await until(lambda: pool.get_stats()["pool_size"] == 3 and pids(dsn, app_name).isdisjoint(first))
        assert await pool.fetchval("SELECT 1") == 1


async def test_lent_connection_past_lifetime_closed_on_return(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, max_lifetime=0.2) as pool:
        conn = await pool.getconn()
        raw = conn.raw
        await anyio.sleep(0.3)
        await pool.putconn(conn)
        assert raw.closed
        assert await pool.fetchval("SELECT 1") == 1


async def test_max_idle_shrinks_to_minconn(dsn: str) -> None:
    async with AsyncConnectionPool(1, 4, dsn, max_idle=0.2) as pool:
        conns = [await pool.getconn() for _ in range(4)]
        for conn in conns:
            await pool.putconn(conn)
        assert pool.get_stats()["pool_size"] == 4
        await until(lambda: pool.get_stats()["pool_size"] == 1)


async def test_minconn_refilled_by_background_task(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(3, 5, dsn, application_name=app_name) as pool:
        server_query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )
        await until(lambda: len(pids(dsn, app_name)) == 0)
        assert await pool.fetchval("SELECT 1") == 1  # finds them broken, refills
        await until(lambda: len(pids(dsn, app_name)) == 3)
        assert pool.get_stats()["connections_lost"] == 3


async def test_reconnect_failed_and_waiters_time_out_with_cause(dsn: str) -> None:
    failed: list[AsyncConnectionPool] = []
    with FaultProxy(*tcp_address(dsn)) as proxy:
        async with AsyncConnectionPool(
            2, 2, proxy.dsn(dsn), reconnect_timeout=0.5, reconnect_failed=failed.append, timeout=5
        ) as pool:
            proxy.refuse()
            proxy.sever()
            with pytest.raises(PoolTimeout, match=r"after 0\.30 sec") as info:
                await pool.fetchval("SELECT 1", timeout=0.3)
            assert isinstance(info.value.__cause__, psycopg2.OperationalError)
            await until(lambda: failed == [pool, pool])
            attempts = pool.get_stats()["connections_errors"]
            assert attempts < 40  # backoff: no storm of attempts
            proxy.passthrough()
            assert await pool.fetchval("SELECT 1", timeout=5) == 1


async def test_resize(dsn: str) -> None:
    async with AsyncConnectionPool(1, 2, dsn) as pool:
        a, b = await pool.getconn(), await pool.getconn()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.1)
        await pool.resize(2, 3)
        c = await pool.getconn(timeout=5)
        assert pool.maxconn == 3 and pool.minconn == 2
        for conn in (a, b, c):
            await pool.putconn(conn)
        assert pool.get_stats()["pool_size"] == 3
        await pool.resize(1, 1)
        assert pool.get_stats()["pool_size"] == 1
        with pytest.raises(PoolConfigError):
            await pool.resize(3, 2)
        assert pool.maxconn == 1


async def test_drain_replaces_every_connection(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(2, 3, dsn, application_name=app_name) as pool:
        lent = await pool.getconn()
        lent_raw = lent.raw
        before = pids(dsn, app_name)
        await pool.drain()
        await pool.putconn(lent)
        assert lent_raw.closed
        await until(lambda: pool.get_stats()["pool_size"] == 2 and pids(dsn, app_name).isdisjoint(before))


async def test_close_timeout_closes_unreturned(dsn: str) -> None:
    pool = AsyncConnectionPool(1, 1, dsn)
    await pool.open()
    conn = await pool.getconn()
    with anyio.fail_after(5):
        await pool.close(timeout=0.2)
    assert conn.raw.closed
    await pool.putconn(conn)  # quietly


async def test_leak_warning_names_the_taker(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgpool_async")
    async with AsyncConnectionPool(1, 2, dsn, leak_threshold=0.1) as pool:
        conn = await pool.getconn()
        await until(lambda: pool.get_stats().get("connections_leaked", 0) == 1)
        text = caplog.text
        assert "test_health.py" in text and "test_leak_warning_names_the_taker" in text
        assert await pool.fetchval("SELECT 1") == 1
        await pool.putconn(conn)


async def test_dropped_connection_recovered(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    import gc

    caplog.set_level(logging.WARNING, logger="pgpool_async")
    async with AsyncConnectionPool(1, 1, dsn, leak_threshold=30) as pool:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")  # leaves a transaction open
        del conn
        gc.collect()
        assert await pool.fetchval("SELECT 1", timeout=5) == 1
        assert "garbage-collected without being returned" in caplog.text
        assert "test_dropped_connection_recovered" in caplog.text


async def test_no_password_in_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pgpool_async")
    pool = AsyncConnectionPool(1, 1, "host=127.0.0.1 port=1 user=u password=hunter2-secret", timeout=0.3)
    with pytest.raises(PoolTimeout) as info:
        await pool.open()
    assert caplog.records, "connection failures are logged"
    for text in (caplog.text, str(info.value), repr(pool), repr(info.value.__cause__)):
        assert "hunter2" not in text


async def test_bad_health_options() -> None:
    with pytest.raises(PoolConfigError, match="check must be"):
        AsyncConnectionPool(1, 1, "dbname=x", check="yes")  # type: ignore[arg-type]
    with pytest.raises(PoolConfigError, match="max_lifetime must be > 0"):
        AsyncConnectionPool(1, 1, "dbname=x", max_lifetime=0)
    with pytest.raises(PoolConfigError, match="configure must be a callable"):
        AsyncConnectionPool(1, 1, "dbname=x", configure=42)  # type: ignore[arg-type]
    with pytest.raises(PoolConfigError, match="leak_threshold"):
        AsyncConnectionPool(1, 1, "dbname=x", leak_threshold=-1)


# -- check and reset hooks that fail (the defects issue 7 listed: 3, 4) ------------------------


async def test_failing_check_backs_off(anyio_backend: str, dsn: str, app_name: str) -> None:
    """``check`` always fails, ``check_idle=0``, one request waits 0.5 s: the pool
    replaces the connection with backoff (psycopg_pool: about 5 attempts in a
    second), not back to back (today: hundreds)."""
    checks = 0

    def check(raw: Any) -> None:
        nonlocal checks
        checks += 1
        raise RuntimeError("unfit")

    async with AsyncConnectionPool(1, 1, dsn, **pool_kwargs(app_name, check=check, check_idle=0)) as pool:
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.5)
        opened = pool.get_stats()["connections_num"]
    assert checks >= 1
    # Generous: backoff starting at 0.1 s gives about 4 in 0.5 s.
    assert opened <= 15, f"{opened} connections opened in 0.5 s ({checks} checks)"


async def test_failing_reset_is_logged(
    anyio_backend: str, dsn: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    def reset(raw: Any) -> None:
        raise RuntimeError("reset-hook-failed-7")

    caplog.set_level(logging.DEBUG, logger="pgpool_async")
    async with AsyncConnectionPool(1, 1, dsn, **pool_kwargs(app_name, reset=reset)) as pool:
        async with pool.connection() as conn:
            pid = conn.raw.get_backend_pid()
        async with pool.connection() as conn:
            assert conn.raw.get_backend_pid() != pid  # discarded, never lent again
        assert pool.get_stats()["returns_bad"] == 2
    warned = [
        r
        for r in caplog.records
        if r.name.startswith("pgpool_async")
        and r.levelno >= logging.WARNING
        and "reset-hook-failed-7" in r.getMessage() + repr(r.exc_info[1] if r.exc_info else "")
    ]
    assert warned, [r.getMessage() for r in caplog.records]


async def test_discard_all_reset_works_without_autocommit(
    anyio_backend: str, dsn: str, app_name: str
) -> None:
    """The obvious hook, in a non-autocommit pool: the connection is reset and kept."""

    def reset(raw: Any) -> None:
        raw.cursor().execute("DISCARD ALL")

    async with AsyncConnectionPool(1, 1, dsn, **pool_kwargs(app_name, reset=reset)) as pool:
        async with pool.connection() as conn:
            pid = conn.raw.get_backend_pid()
            await conn.execute("SET search_path TO pg_catalog")  # committed on the way out
        async with pool.connection() as conn:
            assert conn.raw.get_backend_pid() == pid  # kept: the reset worked
            assert await conn.fetchval("SHOW search_path") != "pg_catalog"  # and reset it
        assert pool.get_stats().get("returns_bad", 0) == 0
