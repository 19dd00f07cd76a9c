"""Multi-host DSNs against a real primary and streaming standby.

The pair comes from :mod:`pgpool_async.testing.standby` (``pg_basebackup -R`` with
the throwaway server's binaries). Without pg_basebackup these tests skip with the
reason; with ``CI`` set they fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg2
import psycopg2.errors
import pytest

from pgpool_async import AsyncConnectionPool, CommitOutcomeUnknown, PoolTimeout
from pgpool_async.testing import ComponentMissing, skip_or_fail
from pgpool_async.testing.standby import PrimaryStandby
from pgpool_async.testing.throwaway import ThrowawayPostgres, run_sql

from .conftest import server_query
from .fix_dsn import with_params


def _pair(synchronous: bool) -> Iterator[PrimaryStandby]:
    pair = PrimaryStandby(synchronous=synchronous)
    try:
        pair.start()
    except ComponentMissing as exc:
        pair.destroy()
        skip_or_fail(str(exc))
    try:
        run_sql(pair.primary.dsn, "CREATE TABLE acked (id bigint PRIMARY KEY)")
        yield pair
    finally:
        pair.destroy()


@pytest.fixture
def sync_pair() -> Iterator[PrimaryStandby]:
    """Primary + synchronous standby: an acknowledged commit is on both."""
    yield from _pair(synchronous=True)


@pytest.fixture
def async_pair() -> Iterator[PrimaryStandby]:
    yield from _pair(synchronous=False)


class _Load:
    """Tasks looping one statement; each event: (start, end, error name or None, result)."""

    def __init__(self, pool: AsyncConnectionPool, tasks: int, statement: Any) -> None:
        self.pool = pool
        self.tasks = tasks
        self.statement = statement
        self.events: list[tuple[float, float, str | None, Any]] = []
        self.stop = False

    async def _worker(self, index: int) -> None:
        n = 0
        while not self.stop:
            n += 1
            started = time.monotonic()
            try:
                result = await self.statement(self.pool, index * 10_000_000 + n)
                error = None
            except Exception as exc:
                result, error = None, type(exc).__name__
                await anyio.sleep(0.01)  # errors are fast: don't spin
            self.events.append((started, time.monotonic(), error, result))

    async def run(self, scenario: Any) -> None:
        async with anyio.create_task_group() as group:
            for index in range(self.tasks):
                group.start_soon(self._worker, index)
            try:
                await scenario()
            finally:
                self.stop = True

    def errors(self) -> list[tuple[float, float, str | None, Any]]:
        return [e for e in self.events if e[2] is not None]

    def ok(self) -> list[tuple[float, float, str | None, Any]]:
        return [e for e in self.events if e[2] is None]


async def _insert(pool: AsyncConnectionPool, ident: int) -> tuple[int, int]:
    """Insert ``ident``; (ident, port of the server that acknowledged it)."""
    port = await pool.fetchval("INSERT INTO acked VALUES (%s) RETURNING inet_server_port()", (ident,))
    return ident, port


def _in_thread(func: Any, *args: Any) -> Any:
    return anyio.to_thread.run_sync(lambda: func(*args))


pytestmark = [pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the fault tests are about the pool, not the loop; trio runs the quick ones


@pytest.mark.slow
async def test_crash_and_promote(sync_pair: PrimaryStandby) -> None:
    """The primary crashes under 8 writers and the standby is promoted: errors only
    for statements in flight (at most one per task), writes resume within 1 s of the
    promotion, and every acknowledged write is on the new primary."""
    tasks = 8
    marks: dict[str, float] = {}
    dsn = sync_pair.multi_host_dsn("read-write")
    async with AsyncConnectionPool(2, tasks, dsn, timeout=10) as pool:
        load = _Load(pool, tasks, _insert)

        async def scenario() -> None:
            await anyio.sleep(0.5)
            marks["crash"] = time.monotonic()
            await _in_thread(sync_pair.crash_primary)
            marks["promoted"] = await _in_thread(sync_pair.promote)
            await anyio.sleep(1.5)

        await load.run(scenario)
    assert sync_pair.standby is not None
    errors = load.errors()
    assert len(errors) <= tasks, errors
    assert all(e[0] < marks["promoted"] for e in errors), errors
    resumed = [e[1] for e in load.ok() if e[0] >= marks["crash"]]
    assert resumed and min(resumed) <= marks["promoted"] + 1.0, (marks, resumed[:3])
    acked = {e[3][0] for e in load.ok()}
    rows = await _in_thread(run_sql, sync_pair.standby.dsn, "SELECT id FROM acked")
    missing = acked - {r[0] for r in rows}
    assert len(acked) > 20 and not missing, (len(acked), sorted(missing)[:5])


@pytest.mark.slow
async def test_fenced_primary_pool_moves_to_the_promoted_standby(async_pair: PrimaryStandby) -> None:
    """The primary is fenced (kept up, read-only, sessions kept) and the standby
    promoted: fewer than 20 writes fail, writes resume within 1 s of the promotion,
    and from then on every write goes to the new primary."""
    assert async_pair.standby is not None
    marks: dict[str, float] = {}
    dsn = async_pair.multi_host_dsn("read-write")
    async with AsyncConnectionPool(2, 8, dsn, timeout=10) as pool:
        load = _Load(pool, 8, _insert)

        async def scenario() -> None:
            await anyio.sleep(0.5)
            marks["fence"] = time.monotonic()
            await _in_thread(async_pair.fence_primary)
            marks["promoted"] = await _in_thread(async_pair.promote)
            await anyio.sleep(1.5)

        await load.run(scenario)
    errors = load.errors()
    assert len(errors) < 20, (len(errors), errors[:5])
    assert {e[2] for e in errors} <= {"ReadOnlySqlTransaction", "PoolTimeout"}, errors
    resumed = [e[1] for e in load.ok() if e[0] >= marks["fence"] and e[3][1] == async_pair.standby.port]
    assert resumed and min(resumed) <= marks["promoted"] + 1.0, (marks, resumed[:3])
    late = [e for e in load.events if e[0] >= marks["promoted"] + 1.0]
    assert len(late) > 10 and all(e[2] is None and e[3][1] == async_pair.standby.port for e in late)


@pytest.mark.slow
async def test_standby_pool_leaves_a_promoted_standby(async_pair: PrimaryStandby) -> None:
    """A read pool (``prefer-standby``) reads from the standby; once it is promoted,
    each connection to it serves at most one more read (the one whose reply says
    it is no longer in recovery), and the pool reconnects to the remaining server."""
    assert async_pair.standby is not None
    standby_port = async_pair.standby.port
    maxconn = 4
    marks: dict[str, float] = {}

    async def read(pool: AsyncConnectionPool, _: int) -> tuple[int, bool]:
        row = await pool.fetchone("SELECT inet_server_port(), pg_is_in_recovery()")
        return row[0], row[1]

    dsn = async_pair.multi_host_dsn("prefer-standby")
    async with AsyncConnectionPool(2, maxconn, dsn, timeout=10, autocommit=True) as pool:
        load = _Load(pool, 8, read)

        async def scenario() -> None:
            await anyio.sleep(0.5)
            marks["promote"] = time.monotonic()
            marks["promoted"] = await _in_thread(async_pair.promote)
            await anyio.sleep(1.0)

        await load.run(scenario)
    assert load.errors() == []
    before = [e[3] for e in load.events if e[1] < marks["promote"]]
    assert len(before) > 10 and all(r == (standby_port, True) for r in before)
    stale = [e for e in load.events if e[3] == (standby_port, False)]
    assert len(stale) <= maxconn, f"{len(stale)} reads from the promoted standby"
    late = [e[3] for e in load.events if e[0] >= marks["promoted"] + 0.5]
    assert len(late) > 10 and all(r == (async_pair.primary.port, False) for r in late)


@pytest.mark.slow
async def test_check_read_write_refuses_a_fenced_server() -> None:
    """``check="read-write"`` (checked at every loan with ``check_idle=0``) never
    lends a connection to a server that turned read-only; it does again once the
    server accepts writes."""

    def start() -> ThrowawayPostgres:
        return ThrowawayPostgres().start()

    server = await _in_thread(start)
    try:
        async with AsyncConnectionPool(1, 2, server.dsn, timeout=1, check="read-write", check_idle=0) as pool:
            assert await pool.fetchval("SELECT 1") == 1
            await _in_thread(run_sql, server.dsn, "ALTER SYSTEM SET default_transaction_read_only = on")
            await _in_thread(run_sql, server.dsn, "SELECT pg_reload_conf()")
            # Each backend applies a reload asynchronously: once the pool's one has,
            # every loan is refused (PoolTimeout); until then loans still succeed.
            refused = False
            with anyio.fail_after(10):
                while not refused:
                    try:
                        await pool.fetchval("SELECT 1")
                    except PoolTimeout:
                        refused = True
            with pytest.raises(PoolTimeout):
                await pool.fetchval("SELECT 1")  # and it stays refused
            await _in_thread(run_sql, server.dsn, "ALTER SYSTEM RESET default_transaction_read_only")
            await _in_thread(run_sql, server.dsn, "SELECT pg_reload_conf()")
            # Lent again once the reload reaches a backend and the check backoff
            # (which grew while every check failed) lets a new connection open.
            with anyio.fail_after(10):
                while True:
                    try:
                        value = await pool.fetchval("SELECT current_setting('transaction_read_only')")
                        break
                    except PoolTimeout:
                        pass
            assert value == "off"
    finally:
        await _in_thread(server.destroy)


@pytest.mark.slow
async def test_check_standby_refuses_a_promoted_standby(async_pair: PrimaryStandby) -> None:
    """``check="standby"`` (every loan with ``check_idle=0``) lends connections to
    the standby until it is promoted, then none."""
    assert async_pair.standby is not None
    async with AsyncConnectionPool(
        1, 2, async_pair.standby.dsn, timeout=1, check="standby", check_idle=0, autocommit=True
    ) as pool:
        assert await pool.fetchval("SELECT pg_is_in_recovery()") is True
        await _in_thread(async_pair.promote)
        with pytest.raises(PoolTimeout):
            await pool.fetchval("SELECT pg_is_in_recovery()")


@pytest.mark.anyio
async def test_a_read_only_transaction_of_the_caller_retires_nothing(dsn: str, app_name: str) -> None:
    """``ReadOnlySqlTransaction`` from a transaction the caller made read-only says
    nothing about the server: with ``target_session_attrs=read-write`` the pool keeps
    the connection (the same backend serves the next loan)."""
    rw_dsn = with_params(dsn, target_session_attrs="read-write", application_name=app_name)
    async with AsyncConnectionPool(1, 1, rw_dsn, timeout=5) as pool:
        async with pool.connection() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            async with pool.connection() as conn:
                await conn.set_session(readonly=True)
                await conn.execute("CREATE TEMP TABLE never (x int)")
        assert await pool.fetchval("SELECT pg_backend_pid()") == pid
        assert pool.get_stats().get("connections_lost", 0) == 0


# -- COMMIT lost with the connection -------------------------------------------------------


@pytest.fixture
def slow_commit_table(dsn: str) -> str:
    """A table whose COMMIT takes 5 s (a deferred constraint trigger sleeps)."""
    server_query(
        dsn,
        """
        DROP TABLE IF EXISTS t_slow_commit;
        CREATE TABLE t_slow_commit (id int);
        CREATE OR REPLACE FUNCTION pgpool_slow_commit() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t_slow_commit
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pgpool_slow_commit();
        """,
    )
    return "t_slow_commit"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("how", ["commit", "transaction", "pool.execute"])
async def test_commit_lost_with_the_connection_has_unknown_outcome(
    dsn: str, slow_commit_table: str, app_name: str, how: str
) -> None:
    """The server session ends while COMMIT runs: CommitOutcomeUnknown, which is an
    OperationalError (old handlers still catch it) caused by psycopg2's error."""
    autocommit = how == "transaction"
    async with AsyncConnectionPool(
        1, 1, dsn, timeout=5, application_name=app_name, autocommit=autocommit
    ) as pool:
        conn = await pool.getconn()
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()")

            async def terminate_soon() -> None:
                await anyio.sleep(0.5)  # the COMMIT is sleeping in the trigger by then
                await _in_thread(server_query, dsn, "SELECT pg_terminate_backend(%s)", (pid,))

            error: BaseException | None = None
            async with anyio.create_task_group() as group:
                group.start_soon(terminate_soon)
                try:
                    if how == "commit":
                        await conn.execute(f"INSERT INTO {slow_commit_table} VALUES (1)")
                        await conn.commit()
                    elif how == "pool.execute":
                        # The one-hop helper's COMMIT leaves with the statement (loop path)
                        # or after it (thread path): lost either way, outcome unknown.
                        await pool.putconn(conn)
                        try:
                            await pool.execute(f"INSERT INTO {slow_commit_table} VALUES (1)")
                        finally:
                            conn = await pool.getconn()
                    else:
                        async with conn.transaction():
                            await conn.execute(f"INSERT INTO {slow_commit_table} VALUES (1)")
                except psycopg2.Error as exc:
                    error = exc
            assert isinstance(error, CommitOutcomeUnknown), repr(error)
            assert "may or may not have been committed" in str(error)
            assert isinstance(error, psycopg2.OperationalError)
            assert isinstance(error.__cause__, psycopg2.OperationalError)
        finally:
            await pool.putconn(conn)
        # The pool replaces the lost connection.
        assert await pool.fetchval("SELECT 1") == 1
