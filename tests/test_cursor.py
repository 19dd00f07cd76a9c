"""Cursors, server-side streaming, transactions and session settings, off the loop."""

from __future__ import annotations

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest

from pgpool_async import AsyncConnectionPool

from .conftest import backends, server_query

pytestmark = pytest.mark.anyio


async def test_cursor_api(dsn: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS cur_t; CREATE TABLE cur_t (a int, b text)")
    async with AsyncConnectionPool(1, 2, dsn) as pool, pool.connection() as conn:
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO cur_t VALUES (%s, %s)", [(i, str(i)) for i in range(10)])
            assert cur.rowcount == 10
            assert cur.mogrify("SELECT %s", (1,)) == b"SELECT 1"
            await cur.execute("SELECT a, b FROM cur_t ORDER BY a")
            assert [d.name for d in cur.description] == ["a", "b"]
            assert await cur.fetchone() == (0, "0")
            assert await cur.fetchmany(2) == [(1, "1"), (2, "2")]
            rest = [row async for row in cur]
            assert rest[0] == (3, "3") and len(rest) == 7
            await cur.execute("SELECT a FROM cur_t WHERE a < 2 ORDER BY a")
            assert await cur.fetchall() == [(0,), (1,)]
            assert await cur.callproc("abs", (-5,)) == (-5,)
            assert await cur.fetchone() == (5,)
        assert cur.closed


async def test_cursor_factories(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        async with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            await cur.execute("SELECT 1 AS one")
            assert await cur.fetchone() == {"one": 1}
        async with conn.cursor(cursor_factory=psycopg2.extras.NamedTupleCursor) as cur:
            await cur.execute("SELECT 2 AS two")
            assert (await cur.fetchone()).two == 2


async def test_server_side_cursor_streams(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        async with pool.connection() as conn, conn.cursor("big") as cur:
            cur.itersize = 500
            assert cur.server_side
            await cur.execute("SELECT g FROM generate_series(1, 20000) g")
            total, count = 0, 0
            async for (g,) in cur:
                total += g
                count += 1
                if count == 1:
                    # Streaming: only the first itersize rows came from the server.
                    assert cur.rowcount == 500
            assert count == 20000 and total == 20000 * 20001 // 2
        assert backends(dsn, app_name)[0][0] == "idle"


async def test_transactions_and_savepoints(dsn: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS tx_t; CREATE TABLE tx_t (x int)")
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        async with pool.connection() as conn:
            async with conn.transaction():
                await conn.execute("INSERT INTO tx_t VALUES (1)")
                with pytest.raises(ZeroDivisionError):
                    async with conn.transaction():
                        await conn.execute("INSERT INTO tx_t VALUES (2)")
                        1 / 0  # noqa: B018
                async with conn.transaction():
                    await conn.execute("INSERT INTO tx_t VALUES (3)")
            assert server_query(dsn, "SELECT x FROM tx_t ORDER BY x") == [(1,), (3,)]
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO tx_t VALUES (4)")
                    raise RuntimeError
            assert server_query(dsn, "SELECT count(*) FROM tx_t") == [(2,)]


async def test_transaction_in_autocommit_and_session_reset(dsn: str, app_name: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS tx_ac; CREATE TABLE tx_ac (x int)")
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        async with pool.connection() as conn:
            await conn.set_session(autocommit=True, readonly=True)
            assert conn.autocommit
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                await conn.execute("INSERT INTO tx_ac VALUES (1)")
            await conn.set_session(readonly=False)
            with pytest.raises(KeyError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO tx_ac VALUES (1)")
                    assert backends(dsn, app_name)[0][0] == "idle in transaction"
                    raise KeyError
            assert server_query(dsn, "SELECT count(*) FROM tx_ac") == [(0,)]
        async with pool.connection() as conn:  # the same connection, settings restored
            assert not conn.autocommit
            assert conn.raw.readonly is None
