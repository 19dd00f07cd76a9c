"""AsyncConnectionPool(io="auto"): the facade's statements on the loop-native path.

The same semantics as the thread path (connection() commits on success and
rolls back on error, run_sync sees the loop path's transaction, savepoints,
one-hop helpers), checked against a real server on asyncio and trio. The
guards of conftest stay on: a libpq network wait on the loop fails the test.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest

from pgpool_async import AsyncConnectionPool, PoolConfigError
from pgpool_async._loop.native import unavailable_reason

from .conftest import server_query

pytestmark = [pytest.mark.anyio, pytest.mark.single_io("every pool here passes io= itself")]

if unavailable_reason() is not None:  # pragma: no cover - Linux with psycopg2 finds it
    pytestmark = [pytestmark, pytest.mark.skipif(not os.environ.get("CI"), reason=str(unavailable_reason()))]


@pytest.fixture
def table(dsn: str) -> Any:
    name = f"t_native_pool_{os.getpid()}"
    server_query(dsn, f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (x int)")
    yield name
    server_query(dsn, f"DROP TABLE IF EXISTS {name}")


def rows(dsn: str, table: str) -> list[int]:
    return [r[0] for r in server_query(dsn, f"SELECT x FROM {table} ORDER BY x")]


async def test_io_loop_opens_where_available(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, io="loop") as pool:
        assert await pool.fetchval("SELECT 1") == 1


def test_io_option_is_checked() -> None:
    with pytest.raises(PoolConfigError, match='io must be "auto", "loop" or "thread"'):
        AsyncConnectionPool(1, 1, "dbname=x", io="fast")
    assert AsyncConnectionPool(1, 1, "dbname=x").io == "auto"
    assert "io=auto" in repr(AsyncConnectionPool(1, 1, "dbname=x", io="auto"))


@pytest.mark.parametrize("autocommit", [False, True])
async def test_connection_block_semantics_on_the_loop(dsn: str, table: str, autocommit: bool) -> None:
    async with AsyncConnectionPool(1, 2, dsn, io="auto", autocommit=autocommit) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            assert "io=loop" in repr(conn)
        assert rows(dsn, table) == [1]
        with pytest.raises(ValueError):
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
                raise ValueError
        assert rows(dsn, table) == [1] if not autocommit else [1, 2]
        async with pool.connection() as conn:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (3)")
                with pytest.raises(psycopg2.errors.DivisionByZero):
                    async with conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES (4)")
                        await conn.execute("SELECT 1 / 0")
                assert "io=loop" in repr(conn)
        assert 3 in rows(dsn, table) and 4 not in rows(dsn, table)
        assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE x = 3") == 1


async def test_run_sync_sees_and_commits_the_loops_transaction(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, io="auto") as pool:
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")

            def in_thread(raw: psycopg2.extensions.connection) -> list[Any]:
                assert raw.status == psycopg2.extensions.STATUS_BEGIN  # psycopg2 knows
                with raw.cursor() as cur:
                    cur.execute(f"INSERT INTO {table} VALUES (2)")
                    cur.execute(f"SELECT x FROM {table} ORDER BY x")
                    return cur.fetchall()

            assert await conn.run_sync(in_thread) == [(1,), (2,)]
            assert rows(dsn, table) == []  # not committed yet
            # Statements go back to the loop, in the same transaction.
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 2
            assert "io=loop" in repr(conn)
        assert rows(dsn, table) == [1, 2]
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (3)")
            await conn.run_sync(lambda raw: raw.rollback())
        assert rows(dsn, table) == [1, 2]


@pytest.mark.parametrize("io", ["auto", "thread"])
async def test_one_hop_helpers(dsn: str, table: str, io: str) -> None:
    async with AsyncConnectionPool(1, 2, dsn, io=io) as pool:
        assert await pool.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)") == 3
        assert pool.get_stats()["pool_on_loop"] == (1 if io == "auto" else 0)
        assert rows(dsn, table) == [1, 2, 3]
        assert await pool.fetchval(f"SELECT sum(x) FROM {table}") == 6
        assert await pool.fetchone(f"SELECT x FROM {table} WHERE x > %s ORDER BY x", (1,)) == (2,)
        assert await pool.fetchall(f"SELECT x FROM {table} ORDER BY x") == [(1,), (2,), (3,)]
        assert await pool.fetchval(f"SELECT x FROM {table} WHERE false") is None
        # As on the thread path: fetch* of a statement without rows raises, saying
        # that it ran and was committed (one round trip: one implicit transaction).
        with pytest.raises(psycopg2.ProgrammingError, match=r"no results to fetch.*was committed"):
            await pool.fetchone(f"INSERT INTO {table} VALUES (9)")
        assert rows(dsn, table) == [1, 2, 3, 9]
        with pytest.raises(psycopg2.errors.DuplicateTable):
            await pool.execute("CREATE TABLE pg_class_copy (x int); CREATE TABLE pg_class_copy (x int)")
        assert server_query(dsn, "SELECT to_regclass('pg_class_copy') IS NULL") == [(True,)]


@pytest.mark.parametrize("io", ["auto", "thread"])
async def test_one_hop_helpers_commit_as_one_implicit_transaction(dsn: str, table: str, io: str) -> None:
    """With psycopg2's default session characteristics the helpers send the statement
    alone (asyncpg's way): the server commits the whole string as one transaction.
    Set characteristics still open it with psycopg2's BEGIN text, on both paths."""
    async with AsyncConnectionPool(1, 1, dsn, io=io) as pool:
        # The statement string is one transaction: the second INSERT's failure undoes the first.
        with pytest.raises(psycopg2.errors.UniqueViolation):
            await pool.execute(
                f"CREATE UNIQUE INDEX ON {table} (x); INSERT INTO {table} VALUES (1); "
                f"INSERT INTO {table} VALUES (1)"
            )
        assert rows(dsn, table) == []
        assert server_query(dsn, f"SELECT count(*) FROM pg_indexes WHERE tablename = '{table}'") == [(0,)]
        # Nothing was left open by the failure, and psycopg2's view is unchanged.
        async with pool.connection() as conn:
            assert await conn.run_sync(lambda raw: (raw.autocommit, raw.get_transaction_status())) == (
                False,
                psycopg2.extensions.TRANSACTION_STATUS_IDLE,
            )
            await conn.fetchval("SELECT 1")  # a block still opens a transaction
            assert await conn.run_sync(lambda raw: raw.get_transaction_status()) == (
                psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            )
        # No transaction block: a statement that refuses one runs, as with asyncpg.
        await pool.execute(f"VACUUM {table}")
    assert pool.get_stats().get("returns_bad", 0) == 0

    def serializable(raw: psycopg2.extensions.connection) -> None:
        raw.set_session(isolation_level="SERIALIZABLE", readonly=True)

    async with AsyncConnectionPool(1, 1, dsn, io=io, configure=serializable) as pool:
        assert await pool.fetchval("SHOW transaction_isolation") == "serializable"
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            await pool.execute(f"INSERT INTO {table} VALUES (2)")
        with pytest.raises(psycopg2.errors.ActiveSqlTransaction):
            await pool.execute(f"VACUUM {table}")  # inside psycopg2's BEGIN, as before
    assert rows(dsn, table) == []


async def test_cursor_factory_and_cursors_use_threads(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(
        1, 1, dsn, io="auto", cursor_factory=psycopg2.extras.RealDictCursor
    ) as pool:
        assert await pool.fetchone("SELECT 1 AS a") == {"a": 1}
        async with pool.connection() as conn:
            assert await conn.fetchall("SELECT 2 AS b") == [{"b": 2}]
            assert "io=thread" in repr(conn)
    async with AsyncConnectionPool(1, 1, dsn, io="auto") as pool:
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            async with conn.cursor() as cur:
                await cur.execute(f"SELECT x FROM {table}")
                assert await cur.fetchall() == [(1,)]
        assert rows(dsn, table) == [1]


def _cursor_view(cur: Any) -> dict[str, Any]:
    return {
        "rowcount": cur.rowcount,
        "rownumber": cur.rownumber,
        "statusmessage": cur.statusmessage,
        "query": cur.query,
        "description": None if cur.description is None else [(d.name, d.type_code) for d in cur.description],
    }


@pytest.mark.parametrize("autocommit", [False, True])
async def test_plain_cursors_run_on_the_loop_like_psycopg2(dsn: str, table: str, autocommit: bool) -> None:
    """A plain client-side cursor's execute/executemany run on the loop (no thread
    hop) and look like psycopg2's cursor afterwards; run_sync code in the same loan
    sees the same transaction."""
    seen: dict[str, list[Any]] = {}
    for io in ("thread", "auto"):
        server_query(dsn, f"TRUNCATE {table}")
        views: list[Any] = []
        async with AsyncConnectionPool(1, 1, dsn, io=io, autocommit=autocommit) as pool:
            async with pool.connection() as conn, conn.cursor() as cur:
                await cur.executemany(f"INSERT INTO {table} VALUES (%s)", [(1,), (2,), (3,)])
                views.append(_cursor_view(cur))
                with pytest.raises(psycopg2.ProgrammingError, match="no results to fetch"):
                    await cur.fetchone()
                await cur.execute(f"SELECT x, x::text AS t FROM {table} WHERE x > %s ORDER BY x", (1,))
                assert ("io=loop" in repr(conn)) is (io == "auto")
                views.append(_cursor_view(cur))
                views.append(await cur.fetchone())
                views.append(_cursor_view(cur))
                views.append(await cur.fetchmany(5))
                views.append(await cur.fetchone())
                views.append(await cur.fetchall())
                await cur.execute(f"UPDATE {table} SET x = x + 10 WHERE x < 3")
                views.append(_cursor_view(cur))
                # psycopg2 code in the same loan sees (and could commit) the same transaction.
                views.append(await conn.run_sync(lambda raw: _count(raw, table)))
                await conn.commit()
                await cur.execute("SELECT %s::int", (None,))
                views.append(await cur.fetchall())
                with pytest.raises(psycopg2.errors.DivisionByZero):
                    await cur.execute("SELECT 1/0")
                if not autocommit:
                    await conn.rollback()
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 3
        seen[io] = views
    assert seen["auto"] == seen["thread"]


def _count(raw: Any, table: str) -> int:
    with raw.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table} WHERE x > 10")
        return int(cur.fetchone()[0])


async def test_a_cancelled_statement_leaves_a_reusable_pool(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, io="auto") as pool:
        for _ in range(3):
            with anyio.move_on_after(0.1) as scope:
                await pool.fetchval("SELECT pg_sleep(30)")
            assert scope.cancelled_caught
            assert await pool.fetchval("SELECT 7") == 7


async def test_getconn_putconn_mid_transaction_rolls_back(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, io="auto") as pool:
        conn = await pool.getconn()
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        await pool.putconn(conn)
        assert rows(dsn, table) == []
        conn = await pool.getconn()
        with pytest.raises(psycopg2.errors.UndefinedTable):
            await conn.execute("SELECT * FROM no_such_table_here")
        await pool.putconn(conn)  # a failed transaction: rolled back on the loop, not handed over
        assert await pool.fetchval("SELECT 1") == 1


async def test_notifications_after_loop_statements(dsn: str) -> None:
    channel = f"native_pool_{os.getpid()}"
    async with AsyncConnectionPool(1, 1, dsn, io="auto", autocommit=True) as pool:
        async with pool.connection() as conn:
            await conn.listen(channel)
            await conn.execute("SELECT 1")  # back on the loop path
            server_query(dsn, f"NOTIFY {channel}, 'hi'")
            async for note in conn.notifies(timeout=5, stop_after=1):
                assert note.payload == "hi"
            await conn.unlisten(channel)


async def test_a_connection_dropped_unreturned_is_recovered(dsn: str) -> None:
    import gc

    async with AsyncConnectionPool(1, 1, dsn, io="auto", leak_threshold=30) as pool:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")  # on the loop, and a transaction left open
        assert "io=loop" in repr(conn)
        del conn
        gc.collect()
        assert await pool.fetchval("SELECT 1", timeout=5) == 1
        conn = await pool.getconn()
        await conn.execute("SELECT 1")
        await conn.commit()  # idle now: the connection itself is reused
        raw = conn.raw
        del conn
        gc.collect()
        assert await pool.fetchval("SELECT 2", timeout=5) == 2
        assert not raw.closed


async def test_an_idle_connection_stays_on_the_loop_between_loans(dsn: str, app_name: str) -> None:
    """The runner stays entered while its connection is idle: the next loan starts on
    the loop; psycopg2 code in between lets it go first; a backend killed while idle
    is seen by the loop (no peek needed) and never lent."""
    async with AsyncConnectionPool(1, 1, dsn, io="auto", application_name=app_name) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.get_stats()["pool_on_loop"] == 1
        async with pool.connection() as conn:
            assert conn.loan.on_loop  # before any statement of this loan
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            # psycopg2 code: the runner lets the connection go (psycopg2's state is
            # already true, the transaction the loop opened included); the next
            # statement takes it back to the loop, inside the same transaction.
            assert await conn.run_sync(lambda raw: raw.get_backend_pid()) == pid
            assert not conn.loan.on_loop
            assert await conn.fetchval("SELECT 2") == 2
            assert conn.loan.on_loop
            assert conn.raw.status == psycopg2.extensions.STATUS_BEGIN
            await conn.commit()
            assert await conn.fetchval("SELECT 3") == 3
            assert conn.loan.on_loop
        server_query(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        with anyio.fail_after(5):
            while True:  # until the loop has seen the server hang up
                await anyio.sleep(0.02)
                slot = pool._ledger._idle[0] if pool._ledger._idle else None
                if slot is None or not slot.runner.quiet:
                    break
        lost = pool.get_stats().get("connections_lost", 0)
        assert await pool.fetchval("SELECT pg_backend_pid()") != pid  # a new connection
        assert pool.get_stats()["connections_lost"] == lost + 1
        slots = list(pool._ledger.open_slots())
        assert [s.runner.entered for s in slots] == [True]
    # Closing the pool lets every runner go before its connection is closed.
    assert [(s.runner.entered, s.raw.closed) for s in slots] == [(False, True)]
