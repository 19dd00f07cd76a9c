"""Opening connections: fail fast on what cannot heal, and an outage logged
once when it starts and once when it ends (real servers, a real proxy)."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import anyio.lowlevel
import psycopg2
import psycopg2.extensions
import pytest

from pgpool_async import AsyncConnectionPool, PoolTimeout
from pgpool_async.testing.faultproxy import FaultProxy

from .fix_dsn import tcp_address
from .gates import Escape, pool_kwargs

pytestmark = pytest.mark.anyio


def _with(dsn: str, **changes: str) -> str:
    params = {**psycopg2.extensions.parse_dsn(dsn), **changes}
    return psycopg2.extensions.make_dsn(**params)


@pytest.mark.parametrize("what", ["dbname", "user"])
async def test_open_fails_at_once_when_retrying_cannot_help(
    anyio_backend: str, dsn: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown database or role: open() raises psycopg2's error at once, not
    PoolTimeout after the whole (30 s) timeout; the pool ends closed."""
    pool = AsyncConnectionPool(2, 4, _with(dsn, **{what: "no_such_thing_here"}), timeout=30)
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="no_such_thing_here"):
        await pool.open()
    assert time.monotonic() - started < 5  # generous: a connect or two, never the 30 s timeout
    assert pool.closed
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "pgpool_async"]
    assert len(warnings) <= 1, [r.getMessage() for r in warnings]
    if what == "dbname":
        assert "database 'no_such_thing_here'" in caplog.text  # named as the database, not the user


async def test_an_outage_logs_one_warning_when_it_starts_and_one_when_it_ends(
    anyio_backend: str, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    params = psycopg2.extensions.parse_dsn(dsn)
    caplog.set_level(logging.DEBUG, logger="pgpool_async")
    with FaultProxy(params["host"], int(params["port"])) as proxy:
        proxy.refuse()
        pool = AsyncConnectionPool(1, 1, proxy.dsn(dsn), timeout=20, name="outage")
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.open)
            with anyio.fail_after(10):
                while pool.get_stats().get("connections_errors", 0) < 4:
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(proxy.passthrough)
        try:
            assert await pool.fetchval("SELECT 1") == 1
        finally:
            await pool.close()
    ours = [r for r in caplog.records if r.name == "pgpool_async"]
    started = [r for r in ours if r.levelno == logging.WARNING and "cannot connect" in r.getMessage()]
    ended = [r for r in ours if r.levelno == logging.WARNING and "again after" in r.getMessage()]
    attempts = [r for r in ours if r.levelno == logging.DEBUG and "failed again" in r.getMessage()]
    assert len(started) == 1 and len(ended) == 1, [r.getMessage() for r in ours]
    assert len(attempts) >= 3  # every later attempt at DEBUG only
    assert all("\n" not in r.getMessage() for r in started)  # one line, not libpq's several


async def test_a_down_server_times_out_open_with_the_cause(anyio_backend: str, dsn: str) -> None:
    """Refused connections are transient: retried with backoff until the timeout,
    then PoolTimeout with the last connect error as its cause."""
    params = psycopg2.extensions.parse_dsn(dsn)
    with FaultProxy(params["host"], int(params["port"])) as proxy:
        proxy.refuse()
        pool = AsyncConnectionPool(1, 1, proxy.dsn(dsn), timeout=1)
        with pytest.raises(PoolTimeout) as info:
            await pool.open()
    assert isinstance(info.value.__cause__, psycopg2.OperationalError)
    assert pool.get_stats()["connections_num"] < 30  # backed off, no storm


# -- background opening: reconnect_failed, a hook's BaseException (issue 7's defects 5, 7) ------


async def test_async_reconnect_failed_is_awaited(anyio_backend: str, dsn: str, app_name: str) -> None:
    called = anyio.Event()
    seen: list[AsyncConnectionPool] = []

    async def failed(pool: AsyncConnectionPool) -> None:
        await anyio.lowlevel.checkpoint()  # a real coroutine: it must be awaited to get here
        seen.append(pool)
        called.set()

    with FaultProxy(*tcp_address(dsn)) as proxy:
        options = pool_kwargs(app_name, reconnect_timeout=0.2, reconnect_failed=failed)
        async with AsyncConnectionPool(1, 1, proxy.dsn(dsn), **options) as pool:
            proxy.refuse()
            await pool.drain()  # the idle one is replaced: refilling minconn now fails
            with anyio.fail_after(2):  # reconnect_timeout is 0.2 s
                await called.wait()
            assert seen == [pool]


async def test_background_failure_is_logged_and_the_rest_keep_running(
    anyio_backend: str, dsn: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook raises a BaseException in a background connect: it is logged with
    its traceback, the deadline sweeper still ends a wait at its timeout, and the
    pool keeps opening connections."""
    calls = 0

    def configure(raw: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Escape

    caplog.set_level(logging.WARNING, logger="pgpool_async")
    async with AsyncConnectionPool(0, 1, dsn, **pool_kwargs(app_name, configure=configure)) as pool:
        with anyio.fail_after(2):  # its deadline is 0.3 s: the sweeper must still run
            try:
                async with pool.connection(timeout=0.3) as conn:
                    await conn.execute("SELECT 1")
            except PoolTimeout:
                pass
        assert calls >= 1
        with anyio.fail_after(10):
            async with pool.connection(timeout=5) as conn:  # the pool still grows
                assert await conn.fetchval("SELECT 1") == 1
    assert any(r.exc_info and isinstance(r.exc_info[1], Escape) for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
