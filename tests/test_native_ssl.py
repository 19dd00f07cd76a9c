"""The pool's loop-native statements (io="loop") over TLS: a throwaway server with
``ssl=on`` and a self-signed certificate (``ThrowawayPostgres(ssl=True)``).

Under TLS, OpenSSL may hold decrypted bytes the socket no longer shows as
readable: results bigger than one TLS record (16 kB) must still come back whole,
and a cancelled statement must still be cancelled on the server.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import anyio
import psycopg2.errors
import pytest

from pgpool_async import AsyncConnectionPool
from pgpool_async._loop.native import unavailable_reason
from pgpool_async.testing.throwaway import ThrowawayPostgres

from .conftest import server_query
from .fix_dsn import with_params

pytestmark = [pytest.mark.anyio, pytest.mark.single_io("every pool here passes io='loop' itself")]


def _missing(what: str) -> None:
    """A missing component skips locally, fails in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run this test)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def ssl_server() -> Iterator[ThrowawayPostgres]:
    if unavailable_reason() is not None:  # pragma: no cover - Linux with psycopg2 finds it
        _missing(f"the loop-native path is unavailable here: {unavailable_reason()}")
    if shutil.which("openssl") is None:
        _missing("openssl is not installed (apt-get install openssl): no certificate for the server")
    with ThrowawayPostgres(ssl=True) as server:
        yield server


@pytest.fixture
def ssl_dsn(ssl_server: ThrowawayPostgres, app_name: str) -> str:
    """TLS required, and the certificate checked against the one the server made."""
    return with_params(
        ssl_server.dsn, application_name=app_name, sslmode="verify-full", sslrootcert=ssl_server.ssl_cert_file
    )


async def test_statements_run_on_the_loop_over_tls(ssl_dsn: str) -> None:
    async with AsyncConnectionPool(1, 2, ssl_dsn, io="loop") as pool:
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
            assert conn.loan.on_loop
            assert await conn.fetchall("SELECT %s::int, %s::text", (7, "seven")) == [(7, "seven")]
            async with conn.transaction():
                assert await conn.execute("CREATE TEMP TABLE t (x int)") == -1
                assert await conn.execute("INSERT INTO t SELECT generate_series(1, 5)") == 5
            assert await conn.fetchval("SELECT sum(x) FROM t") == 15
            assert conn.loan.on_loop
        assert await pool.fetchval("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()") in (
            "TLSv1.2",
            "TLSv1.3",
        )


@pytest.mark.parametrize(
    "sql, rows, last",
    [
        # 20k rows of 1.3 kB of text: ~26 MB in ~1,600 TLS records.
        ("SELECT g, repeat(md5(g::text), 40) FROM generate_series(1, 20000) g", 20_000, 20_000),
        # Rows each wider than a TLS record.
        ("SELECT g, repeat('x', 100000) FROM generate_series(1, 50) g", 50, 50),
    ],
    ids=["20k-rows", "wide-rows"],
)
async def test_a_result_bigger_than_a_tls_record_comes_back_whole(
    ssl_dsn: str, sql: str, rows: int, last: int
) -> None:
    async with AsyncConnectionPool(1, 1, ssl_dsn, io="loop") as pool:
        async with pool.connection() as conn:
            with anyio.fail_after(60):
                got = await conn.fetchall(sql)
            assert conn.loan.on_loop
            assert len(got) == rows
            assert [r[0] for r in got] == list(range(1, rows + 1))
            assert got[-1][0] == last
            # Every value complete: the server's own sum of lengths agrees.
            total = await conn.fetchval(f"SELECT sum(length(s)) FROM ({sql}) AS q(g, s)")
            assert sum(len(r[1]) for r in got) == total
            assert await conn.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("autocommit", [False, True], ids=["tx", "autocommit"])
async def test_a_cancelled_statement_is_cancelled_on_the_server_over_tls(
    ssl_dsn: str, autocommit: bool
) -> None:
    dsn = ssl_dsn
    async with AsyncConnectionPool(1, 1, dsn, io="loop", autocommit=autocommit) as pool:
        async with pool.connection() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert conn.loan.on_loop
            started = time.monotonic()
            with anyio.move_on_after(0.3) as scope:
                await conn.execute("SELECT pg_sleep(30)")
            assert scope.cancelled_caught
            assert time.monotonic() - started < 10  # the server's cancel ended it, not the sleep
            assert not conn.closed
            # The sleep no longer runs on the server.
            [(state, query)] = await anyio.to_thread.run_sync(
                server_query, dsn, "SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,)
            )
            assert state in ("idle", "idle in transaction (aborted)"), (state, query)
            if not autocommit:
                # As with psycopg2: the cancel failed the transaction; end it to go on.
                with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
                    await conn.fetchval("SELECT 1")
                await conn.rollback()
            # Reusable at once, on the loop, on the same backend.
            assert await conn.fetchval("SELECT 42") == 42
            assert conn.loan.on_loop
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        # Back in the pool, idle, the same connection serves the next loan.
        assert await pool.fetchval("SELECT pg_backend_pid()") == pid
        rows = await anyio.to_thread.run_sync(
            server_query,
            dsn,
            "SELECT state, ssl FROM pg_stat_activity JOIN pg_stat_ssl USING (pid) WHERE pid = %s",
            (pid,),
        )
        assert rows == [("idle", True)]
