"""psycopg2's own view of a pooled connection stays the truth, on both io paths.

Each test runs once per io (the ``pool_io`` fixture): what psycopg2 would do with
the same calls is what both paths must do. Also the two guarantees psycopg2 does
not give: a block that ends on a failed transaction, or with a statement never
awaited, raises instead of reporting a commit that did not happen.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import anyio
import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import psycopg2.extras
import pytest

from pgpool_async import AsyncConnectionPool, StatementNotAwaited, TransactionFailed, extras
from pgpool_async.copying import copy_out_stream

from .conftest import server_query

pytestmark = pytest.mark.anyio


@pytest.fixture
def table(dsn: str) -> Any:
    name = f"t_fidelity_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    server_query(dsn, f"CREATE TABLE {name} (x int)")
    yield name
    server_query(dsn, f"DROP TABLE IF EXISTS {name}")


def rows(dsn: str, table: str) -> list[int]:
    return [r[0] for r in server_query(dsn, f"SELECT x FROM {table} ORDER BY x")]


def psycopg2_view(raw: ext.connection) -> tuple[int, int]:
    return raw.status, raw.get_transaction_status()


# -- a swallowed error never exits as committed ----------------------------------------------


async def test_a_connection_block_ending_on_a_failed_transaction_raises_and_keeps_nothing(
    dsn: str, table: str
) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        with pytest.raises(
            TransactionFailed, match=r"DivisionByZero: division by zero.*nothing was committed"
        ):
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                try:
                    await conn.execute("SELECT 1 / 0")
                except psycopg2.errors.DivisionByZero:
                    pass  # swallowed: the transaction is failed all the same
        assert rows(dsn, table) == []
        # The connection came back clean.
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            assert conn.raw.status == ext.STATUS_BEGIN


async def test_a_transaction_block_ending_on_a_failed_transaction_raises(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        with pytest.raises(TransactionFailed, match="UndefinedTable"):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                try:
                    await conn.execute("SELECT * FROM no_such_table_here")
                except psycopg2.errors.UndefinedTable:
                    pass
        assert conn.raw.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
    assert rows(dsn, table) == []


async def test_a_savepoint_block_ending_failed_rolls_back_to_it_and_the_outer_commits(
    dsn: str, table: str
) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            with pytest.raises(TransactionFailed):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (2)")
                    try:
                        await conn.execute("SELECT 1 / 0")
                    except psycopg2.errors.DivisionByZero:
                        pass
            await conn.execute(f"INSERT INTO {table} VALUES (3)")
    assert rows(dsn, table) == [1, 3]


# -- statements never awaited never commit silently --------------------------------------------


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
async def test_a_statement_never_awaited_rolls_the_block_back_naming_it(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        with pytest.raises(StatementNotAwaited, match=r"conn\.execute\(\).*rolled back"):
            async with pool.connection() as conn:
                forgotten = conn.execute(f"INSERT INTO {table} VALUES (1)")
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
        forgotten.close()
        assert rows(dsn, table) == []
        assert await pool.fetchval("SELECT 1") == 1


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_psycopg2s_execute_batch_given_an_async_cursor_commits_nothing(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        with pytest.raises(StatementNotAwaited, match=r"cursor\.execute\(\).*pgpool_async\.extras"):
            async with pool.connection() as conn, conn.cursor() as cur:
                psycopg2.extras.execute_batch(
                    cur, f"INSERT INTO {table} VALUES (%s)", [(i,) for i in range(10)]
                )
    assert rows(dsn, table) == []


async def test_extras_run_psycopg2s_helpers_in_the_blocks_transaction(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        async with pool.connection() as conn:
            await extras.execute_batch(conn, f"INSERT INTO {table} VALUES (%s)", ((i,) for i in range(5)))
            returned = await extras.execute_values(
                conn, f"INSERT INTO {table} VALUES %s RETURNING x", [(i,) for i in range(5, 8)], fetch=True
            )
            assert returned == [(5,), (6,), (7,)]
            assert rows(dsn, table) == []  # not committed before the block ends
    assert rows(dsn, table) == list(range(8))


# -- psycopg2's state after the loop path ------------------------------------------------------


async def test_set_session_deferrable_then_psycopg2_code_in_one_transaction(dsn: str, table: str) -> None:
    """The report pattern: SERIALIZABLE READ ONLY DEFERRABLE, statements on the
    pool's path then psycopg2 code, one transaction, nothing aborted."""
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        await conn.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True)
        before = await conn.fetchval("SELECT txid_current()")

        def psycopg2_code(raw: ext.connection) -> tuple[Any, ...]:
            with raw.cursor() as cur:
                cur.execute("SELECT txid_current(), current_setting('transaction_deferrable')")
                row = cur.fetchone()
            with raw.cursor("named") as named:
                named.execute("SELECT 1")
                (one,) = named.fetchone()
            return (*row, one)

        assert await conn.run_sync(psycopg2_code) == (before, "on", 1)
        await conn.commit()


async def test_after_a_failed_statement_psycopg2_gets_the_failed_transaction(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        with pytest.raises(psycopg2.errors.DivisionByZero):
            await conn.execute("SELECT 1 / 0")
        assert psycopg2_view(conn.raw) == (ext.STATUS_BEGIN, ext.TRANSACTION_STATUS_INERROR)
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            await conn.run_sync(lambda raw: raw.cursor().execute("SELECT 1"))
        await conn.run_sync(lambda raw: raw.rollback())
        assert await conn.fetchval("SELECT 2") == 2


async def test_commit_sent_as_sql_is_psycopg2s_business(dsn: str, table: str) -> None:
    """psycopg2 tracks the transaction in its own status: after a COMMIT sent as
    SQL it sends no BEGIN, so the next statement commits on its own, and its
    rollback() undoes nothing."""
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await conn.execute("COMMIT")
            assert psycopg2_view(conn.raw) == (ext.STATUS_BEGIN, ext.TRANSACTION_STATUS_IDLE)
            await conn.execute(f"INSERT INTO {table} VALUES (2)")
            await conn.rollback()
            assert conn.raw.status == ext.STATUS_READY
        assert rows(dsn, table) == [1, 2]
        # The next borrower gets psycopg2's BEGIN again (its rollback undoes its insert).
        async with pool.connection() as conn:
            await conn.execute("COMMIT")  # left "begun" by psycopg2, idle on the server
        async with pool.connection() as conn:
            assert conn.raw.status == ext.STATUS_READY
            await conn.execute(f"INSERT INTO {table} VALUES (3)")
            await conn.rollback()
        assert rows(dsn, table) == [1, 2]


async def test_begin_sent_as_sql_in_autocommit_is_rolled_back_on_return(dsn: str, table: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, autocommit=True) as pool:
        async with pool.connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await conn.commit()  # psycopg2 in autocommit: sends nothing
            assert conn.raw.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS
        assert rows(dsn, table) == []
        async with pool.connection() as conn:
            assert conn.raw.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
            await conn.execute(f"INSERT INTO {table} VALUES (2)")
        assert rows(dsn, table) == [2]


@pytest.mark.usefixtures("no_wait_callback")
async def test_one_hop_calls_after_thread_work_and_copy_stay_usable(dsn: str, table: str) -> None:
    """The README's FastAPI routes without FastAPI, on a pool of one: a read, a
    loan whose psycopg2 code commits, a COPY stream, then a read again."""
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        conn = await pool.getconn()

        def report(raw: ext.connection) -> Any:
            with raw.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {table}")
                (count,) = cur.fetchone()
            raw.commit()
            return count

        assert await conn.run_sync(report) == 0
        await pool.putconn(conn)
        chunks = [chunk async for chunk in copy_out_stream(pool, f"COPY {table} TO STDOUT")]
        assert b"".join(chunks) == b""
        for _ in range(3):
            assert await pool.fetchval("SELECT 1") == 1


# -- the rest of psycopg2's behaviour -------------------------------------------------------------


async def test_notices_reach_a_sink_set_in_configure_before_close(dsn: str) -> None:
    sink: list[str] = []

    def configure(raw: ext.connection) -> None:
        raw.notices = sink

    async with AsyncConnectionPool(1, 1, dsn, configure=configure) as pool:
        for i in range(3):
            await pool.execute(f"DO $$BEGIN RAISE NOTICE 'note {i}'; END$$")
    assert [n.strip() for n in sink] == ["NOTICE:  note 0", "NOTICE:  note 1", "NOTICE:  note 2"]


async def test_a_cursor_factory_set_after_a_statement_takes_effect_at_once(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        assert await conn.fetchall("SELECT 1 AS one") == [(1,)]
        conn.raw.cursor_factory = psycopg2.extras.RealDictCursor
        assert await conn.fetchall("SELECT 1 AS one") == [{"one": 1}]
        conn.raw.cursor_factory = None
        assert await conn.fetchall("SELECT 1 AS one") == [(1,)]


async def test_a_server_ended_connection_is_marked_as_psycopg2_marks_it(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        async with pool.connection() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.commit()
            server_query(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
            await anyio.sleep(0.1)
            with pytest.raises(psycopg2.OperationalError):
                await conn.fetchval("SELECT 1")
            assert conn.raw.closed == 2
        assert await pool.fetchval("SELECT 1") == 1


async def test_cursor_fetches_and_attributes_as_psycopg2(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        async with conn.cursor() as cur:
            await cur.execute("SELECT generate_series(1, 5)")
            assert await cur.fetchmany(2) == [(1,), (2,)]
            assert await cur.fetchmany(-1) == [(3,), (4,), (5,)]
            assert await cur.fetchone() is None
            await cur.scroll(0, "absolute")
            assert await cur.fetchone() == (1,)
            with pytest.raises(psycopg2.ProgrammingError, match="out of bounds"):
                await cur.scroll(10)
            await cur.executemany("SELECT 1", [])
            assert (cur.rowcount, cur.statusmessage, cur.query) == (
                0,
                "SELECT 5",
                b"SELECT generate_series(1, 5)",
            )
            with pytest.raises(psycopg2.errors.DivisionByZero):
                await cur.execute("SELECT 1 / %s", (0,))
            assert (cur.query, cur.statusmessage, cur.rowcount) == (b"SELECT 1 / 0", "", -1)
        await conn.rollback()
