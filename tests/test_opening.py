"""Opening connections: fail fast on what cannot heal, and an outage logged
once when it starts and once when it ends (real servers, a real proxy)."""

from __future__ import annotations

import logging
import time

import anyio
import psycopg2
import psycopg2.extensions
import pytest

from pgpool_async import AsyncConnectionPool, PoolTimeout
from pgpool_async.testing.faultproxy import FaultProxy

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
