"""The loop-native statement runner (pgpool_async._loop.native) against a real server.

Every comparison runs the same statement on psycopg2's own path (a cursor, in a
worker thread) and on the runner, and asserts the two agree: values,
descriptions, row counts, errors (class, pgcode, pgerror, diag). The conftest
guards stay on: a libpq network wait on the loop thread fails the test.
"""

from __future__ import annotations

import contextlib
import decimal
import gc
import os
import shutil
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from pgpool_async import _libpq
from pgpool_async._loop import native, pqcalls
from pgpool_async._loop.native import (
    LoopStatementRunner,
    NativeUnavailable,
    Result,
    unavailable_reason,
)
from pgpool_async.errors import PoolError
from pgpool_async.testing.faultproxy import FaultProxy
from pgpool_async.testing.throwaway import ThrowawayPostgres

from .conftest import _loop_guard_off, server_query
from .fix_dsn import with_params

T = TypeVar("T")

pytestmark = [pytest.mark.anyio, pytest.mark.single_io("the loop-native runner itself, without a pool")]


def _missing(what: str) -> None:
    """A missing component skips locally, fails in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run this test)")
    pytest.skip(what)


if unavailable_reason() is not None:  # pragma: no cover - Linux with psycopg2 finds it
    pytestmark = [pytestmark, pytest.mark.skipif(not os.environ.get("CI"), reason=str(unavailable_reason()))]


@pytest.fixture(autouse=True, params=["c", "ctypes"])
def libpq_calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every runner test twice: the per-statement libpq calls through the C module
    (``_pqfast``, what installs build) and through ctypes (where it is not built)."""
    if request.param == "ctypes":
        monkeypatch.setattr(native, "accelerator", lambda: None)
    elif not pqcalls.accelerated():
        _missing("the C module pgpool_async._loop._pqfast was not built (no C compiler at install?)")
    return str(request.param)


async def test_the_runner_takes_the_c_path_where_it_is_built(dsn: str, libpq_calls: str) -> None:
    """With the C module built (CI builds it), the runner's libpq calls go through
    it; its rows, NULLs and counts are what the ctypes path gives (every other
    test here compares both with psycopg2)."""
    raw = await connect(dsn)
    runner = LoopStatementRunner(raw)
    runner.enter()
    try:
        assert (runner._fast is not None) == (libpq_calls == "c")
        result = await runner.execute(
            "SELECT g, NULL::text, repeat('x', g) FROM generate_series(1, %s) g", (3,)
        )
        assert result.rows == [(1, None, "x"), (2, None, "xx"), (3, None, "xxx")]
        assert result.rowcount == 3
        assert (await runner.execute("SELECT 1 WHERE false")).rows == []
    finally:
        await runner.leave()
        raw.close()


async def traced(awaitable: Awaitable[T]) -> tuple[T, int, int]:
    """Await with tracemalloc on: the result, then the bytes Python's allocations
    still hold and the most they held meanwhile."""
    tracemalloc.start()
    try:
        result = await awaitable
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, retained, peak


async def connect(dsn: str, *, autocommit: bool = True) -> psycopg2.extensions.connection:
    def make() -> psycopg2.extensions.connection:
        conn = psycopg2.connect(dsn)
        conn.autocommit = autocommit
        return conn

    return await anyio.to_thread.run_sync(make)


@contextlib.asynccontextmanager
async def entered(dsn: str, *, autocommit: bool = True, **kwargs: Any) -> AsyncIterator[LoopStatementRunner]:
    raw = await connect(dsn, autocommit=autocommit)
    runner = LoopStatementRunner(raw, **kwargs)
    runner.enter()
    try:
        yield runner
    finally:
        if runner.entered and not raw.closed:
            await runner.leave()
        await anyio.to_thread.run_sync(raw.close)


def thread_result(raw: psycopg2.extensions.connection, sql: str, params: Any = None) -> dict[str, Any]:
    """What psycopg2 itself shows for a statement (run in a worker thread)."""
    with raw.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall() if cur.description is not None else []
        return {
            "rows": rows,
            "rowcount": cur.rowcount,
            "statusmessage": cur.statusmessage,
            "description": _columns(cur.description),
        }


def _columns(description: Any) -> Any:
    if description is None:
        return None
    return [
        (
            c.name,
            c.type_code,
            c.display_size,
            c.internal_size,
            c.precision,
            c.scale,
            c.null_ok,
            c.table_oid,
            c.table_column,
        )
        for c in description
    ]


def native_view(result: Result) -> dict[str, Any]:
    return {
        "rows": result.rows,
        "rowcount": result.rowcount,
        "statusmessage": result.statusmessage,
        "description": _columns(result.description),
    }


def _plain(value: Any) -> Any:
    """Comparable values: bytes for memoryview (bytea), a marker for NaN (never equal to itself)."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, (float, decimal.Decimal)) and value != value:
        return "NaN"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


class LoopTicker:
    """Records the longest gap between two wake-ups of the event loop, in wall
    time and in CPU time of the loop thread less the garbage collector's pauses:
    the latter is work the code under test did without yielding (other processes
    on a shared machine, and Python's GC, which stalls any thread holding the GIL
    whichever path converts rows, do not count)."""

    def __init__(self) -> None:
        self.max_wall = 0.0
        self.max_cpu = 0.0
        self._gc_cpu = 0.0
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.thread_time()
        else:
            self._gc_cpu += time.thread_time() - self._gc_started

    async def run(self) -> None:
        gc.callbacks.append(self._on_gc)
        try:
            wall, cpu, gc_cpu = time.perf_counter(), time.thread_time(), self._gc_cpu
            while True:
                await anyio.sleep(0.001)
                now_wall, now_cpu, now_gc = time.perf_counter(), time.thread_time(), self._gc_cpu
                self.max_wall = max(self.max_wall, now_wall - wall)
                self.max_cpu = max(self.max_cpu, (now_cpu - cpu) - (now_gc - gc_cpu))
                wall, cpu, gc_cpu = now_wall, now_cpu, now_gc
        finally:
            gc.callbacks.remove(self._on_gc)


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[LoopTicker]:
    ticker = LoopTicker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.01)
        yield ticker
        tg.cancel_scope.cancel()


# -- availability ---------------------------------------------------------------------------


def test_psycopg2s_own_libpq_is_found() -> None:
    path = _libpq.libpq_path()
    assert path is not None, _libpq.unavailable_reason()
    assert "libpq" in os.path.basename(path)
    lib = _libpq.libpq_gil()
    assert lib is not None
    assert lib.PQlibVersion() == psycopg2.extensions.libpq_version()


# -- values -----------------------------------------------------------------------------------

TYPE_QUERIES: list[tuple[str, Any]] = [
    ("SELECT 1, -2::bigint, 32767::smallint, 2147483647", None),
    (
        "SELECT 1.5::numeric(10,2), 'NaN'::numeric, 3.25::float8, 1e-7::float4, "
        "12345678901234567890::numeric",
        None,
    ),
    ("SELECT %s::text, %s, ''::text, 'a''b'", ("héllo wörld ✓ 𝄞", "日本語")),
    ("SELECT %s::bytea, ''::bytea", (psycopg2.Binary(bytes(range(256))),)),
    ("SELECT ARRAY[1,2,NULL], ARRAY['a','b c',NULL]::text[], '{{1,2},{3,4}}'::int[], '{}'::int[]", None),
    ('SELECT \'{"a": [1, 2.5, null, "x"]}\'::json, \'{"b": true}\'::jsonb', None),
    (
        "SELECT '2024-02-29 12:34:56.789'::timestamp, '2024-02-29 12:34:56+02'::timestamptz, "
        "'2024-02-29'::date, '12:34:56'::time, '1 day 02:03:04'::interval, 'infinity'::date",
        None,
    ),
    ("SELECT NULL, NULL::int, NULL::text, NULL::bytea, NULL::int[], true, false", None),
    ("SELECT '11111111-2222-3333-4444-555555555555'::uuid, '192.168.0.1/24'::inet, 'xyz'::name", None),
    ("SELECT %(a)s + %(b)s AS total, %(s)s AS s", {"a": 40, "b": 2, "s": "%s 100%"}),
    ("SELECT g, g::text, g * 1.5 FROM generate_series(1, 1000) g", None),
    ("SELECT 1 WHERE false", None),
    ('SELECT \'a\' AS "Weird Name", 2 AS "ünï"', None),
    ("SELECT '(1,2)'::point, 'red'::text, 'U&\"\\0041\"'", None),
]


async def test_values_as_psycopg2_converts_them(dsn: str) -> None:
    async with entered(dsn) as runner:
        other = await connect(dsn)
        try:
            for sql, params in TYPE_QUERIES:
                expected = await anyio.to_thread.run_sync(thread_result, other, sql, params)
                got = native_view(await runner.execute(sql, params))
                assert _plain(got) == _plain(expected), sql
        finally:
            other.close()


async def test_statements_without_rows(dsn: str) -> None:
    table = f"t_native_{os.getpid()}"
    statements = [
        "DROP TABLE IF EXISTS {t}",
        "CREATE TABLE {t} (id serial PRIMARY KEY, v text)",
        "INSERT INTO {t} (v) SELECT 'x' FROM generate_series(1, 7)",
        "UPDATE {t} SET v = 'y' WHERE id > 3",
        "DELETE FROM {t} WHERE id > 5",
        "INSERT INTO {t} (v) VALUES ('z') RETURNING id, v",
        "SET application_name = 'native-test'",
    ]
    async with entered(dsn) as runner:
        other = await connect(dsn)
        try:
            for sql in statements:
                got = native_view(await runner.execute(sql.format(t=table)))
                expected = await anyio.to_thread.run_sync(thread_result, other, sql.format(t=table + "_t"))
                for view in (got, expected):  # the two tables differ by their OIDs only
                    view["description"] = view["description"] and [c[:7] for c in view["description"]]
                assert got == expected, sql
            result = await runner.execute(f"SELECT count(*), count(*) FILTER (WHERE v = 'y') FROM {table}")
            assert result.rows == [(6, 2)]
        finally:
            other.close()
            server_query(dsn, f"DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_t")


async def test_typecasters_registered_on_the_connection_and_cursor(dsn: str) -> None:
    tagged = psycopg2.extensions.new_type(
        (23,), "TAGGED_INT", lambda v, c: None if v is None else ("int", int(v))
    )
    upper = psycopg2.extensions.new_type((25,), "UPPER_TEXT", lambda v, c: None if v is None else v.upper())
    async with entered(dsn) as runner:
        raw = runner.raw
        psycopg2.extensions.register_type(tagged, raw)
        cursor = raw.cursor()
        psycopg2.extensions.register_type(upper, cursor)
        sql = "SELECT 7, 'abc'::text, NULL::int, ARRAY[1,2]"
        plain = await runner.execute(sql)
        assert plain.rows == [(("int", 7), "abc", None, [1, 2])]
        with_cursor = await runner.execute(sql, cursor=cursor)
        assert with_cursor.rows == [(("int", 7), "ABC", None, [1, 2])]
        other = await connect(dsn)
        try:
            psycopg2.extensions.register_type(tagged, other)

            def on_thread() -> Any:
                cur = other.cursor()
                psycopg2.extensions.register_type(upper, cur)
                cur.execute(sql)
                return cur.fetchall()

            assert await anyio.to_thread.run_sync(on_thread) == with_cursor.rows
        finally:
            other.close()


# -- errors -----------------------------------------------------------------------------------

DIAG_FIELDS = [
    "column_name",
    "constraint_name",
    "context",
    "datatype_name",
    "internal_position",
    "internal_query",
    "message_detail",
    "message_hint",
    "message_primary",
    "schema_name",
    "severity",
    "severity_nonlocalized",
    "source_file",
    "source_function",
    "source_line",
    "sqlstate",
    "statement_position",
    "table_name",
]


def _error_view(exc: psycopg2.Error) -> dict[str, Any]:
    return {
        "class": type(exc),
        "str": str(exc),
        "pgcode": exc.pgcode,
        "pgerror": exc.pgerror,
        **{f"diag.{name}": getattr(exc.diag, name) for name in DIAG_FIELDS},
    }


async def test_errors_equal_psycopg2s(dsn: str) -> None:
    table = f"t_native_err_{os.getpid()}"
    server_query(
        dsn, f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, v int CHECK (v > 0))"
    )
    failing = [
        "SELECT * FROM no_such_table_here",
        "SELEC 1",
        "SELECT 1 / 0",
        f"INSERT INTO {table} VALUES (1, 1), (1, 2)",
        f"INSERT INTO {table} VALUES (5, -1)",
        "SELECT 'abc'::int",
        "DO $$ BEGIN RAISE EXCEPTION 'custom' USING DETAIL = 'the detail', HINT = 'a hint', "
        "ERRCODE = 'P0001'; END $$",
        "DO $$ BEGIN RAISE EXCEPTION 'unknown code' USING ERRCODE = 'ZZ123'; END $$",
        "SELECT 1; SELECT * FROM no_such_table_either; SELECT 2",
        "",
        "   ",
    ]
    async with entered(dsn) as runner:
        other = await connect(dsn)
        try:
            for sql in failing:
                with pytest.raises(psycopg2.Error) as on_thread:
                    await anyio.to_thread.run_sync(thread_result, other, sql)
                with pytest.raises(psycopg2.Error) as on_loop:
                    await runner.execute(sql)
                assert _error_view(on_loop.value) == _error_view(on_thread.value), sql
                if on_loop.value.pgcode:
                    assert on_loop.value.cursor is None  # the one documented difference
            # The connection is still usable after every error.
            assert (await runner.execute("SELECT 1")).rows == [(1,)]
        finally:
            other.close()
            server_query(dsn, f"DROP TABLE IF EXISTS {table}")


async def test_copy_through_execute_is_refused_and_the_connection_stays_usable(dsn: str) -> None:
    async with entered(dsn) as runner:
        with pytest.raises(psycopg2.ProgrammingError, match=r"can't execute COPY TO: use the copy_to\(\)"):
            await runner.execute("COPY (SELECT g FROM generate_series(1, 50000) g) TO STDOUT")
        await runner.execute("CREATE TEMP TABLE copy_target (x int)")
        with pytest.raises(
            psycopg2.ProgrammingError, match=r"can't execute COPY FROM: use the copy_from\(\)"
        ):
            await runner.execute("COPY copy_target FROM STDIN")
        assert (await runner.execute("SELECT count(*) FROM copy_target")).rows == [(0,)]


# -- transactions -----------------------------------------------------------------------------


async def test_without_autocommit_a_transaction_opens_as_psycopg2s_would(dsn: str) -> None:
    table = f"t_native_tx_{os.getpid()}"
    server_query(dsn, f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int)")
    try:
        async with entered(dsn, autocommit=False) as runner:
            assert not runner.in_transaction
            await runner.execute(f"INSERT INTO {table} VALUES (1)")
            assert runner.in_transaction
            assert server_query(dsn, f"SELECT count(*) FROM {table}") == [(0,)]  # not committed yet
            await runner.rollback()
            assert not runner.in_transaction
            await runner.execute(f"INSERT INTO {table} VALUES (2)")
            await runner.commit()
            assert server_query(dsn, f"SELECT x FROM {table}") == [(2,)]
            await runner.commit()  # nothing open: nothing sent, like psycopg2
            # A failed statement leaves the transaction failed until rolled back.
            with pytest.raises(psycopg2.errors.DivisionByZero):
                await runner.execute("SELECT 1 / 0")
            with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
                await runner.execute("SELECT 1")
            await runner.rollback()
            assert (await runner.execute("SELECT 1")).rows == [(1,)]
            await runner.rollback()
            # The same when the first statement does not even parse (BEGIN went with it).
            with pytest.raises(psycopg2.errors.SyntaxError):
                await runner.execute("wat")
            assert runner.in_transaction
            with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
                await runner.execute("SELECT 1")
            await runner.rollback()
            assert not runner.in_transaction
    finally:
        server_query(dsn, f"DROP TABLE IF EXISTS {table}")


async def test_begin_carries_psycopg2s_session_characteristics(dsn: str) -> None:
    raw = await connect(dsn, autocommit=False)
    try:
        await anyio.to_thread.run_sync(
            lambda: raw.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True)
        )
        runner = LoopStatementRunner(raw)
        runner.enter()
        result = await runner.execute(
            "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'), "
            "current_setting('transaction_deferrable')"
        )
        assert result.rows == [("serializable", "on", "on")]
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            await runner.execute("CREATE TEMP TABLE nope (x int)")
        await runner.rollback()
        await runner.leave()
    finally:
        await anyio.to_thread.run_sync(raw.close)


async def test_leaving_mid_transaction_hands_it_to_psycopg2(dsn: str) -> None:
    table = f"t_native_handoff_{os.getpid()}"
    server_query(dsn, f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int)")
    raw = await connect(dsn, autocommit=False)
    try:
        runner = LoopStatementRunner(raw)
        runner.enter()
        await runner.execute(f"INSERT INTO {table} VALUES (1)")
        await runner.leave()
        # psycopg2's view is now true: it is in a transaction, and its rollback undoes the loop's insert.
        assert raw.status == psycopg2.extensions.STATUS_BEGIN
        assert not any("already a transaction" in n for n in raw.notices)

        def psycopg2_side() -> list[Any]:
            with raw.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (2)")
                cur.execute(f"SELECT x FROM {table} ORDER BY x")
                rows = cur.fetchall()
            raw.rollback()
            return rows

        assert await anyio.to_thread.run_sync(psycopg2_side) == [(1,), (2,)]
        assert server_query(dsn, f"SELECT count(*) FROM {table}") == [(0,)]
        # And once more, committed by psycopg2.
        runner.enter()
        await runner.execute(f"INSERT INTO {table} VALUES (3)")
        await runner.leave()
        await anyio.to_thread.run_sync(raw.commit)
        assert server_query(dsn, f"SELECT x FROM {table}") == [(3,)]
        # psycopg2 with a transaction of its own: the runner takes it over as it is,
        # and psycopg2's rollback() after it undoes both sides' work.
        await anyio.to_thread.run_sync(thread_result, raw, f"INSERT INTO {table} VALUES (4)")
        assert raw.status == psycopg2.extensions.STATUS_BEGIN
        runner.enter()
        await runner.execute(f"INSERT INTO {table} VALUES (5)")
        assert raw.status == psycopg2.extensions.STATUS_BEGIN
        await runner.leave()
        await anyio.to_thread.run_sync(raw.rollback)
        assert server_query(dsn, f"SELECT x FROM {table}") == [(3,)]
    finally:
        await anyio.to_thread.run_sync(raw.close)
        server_query(dsn, f"DROP TABLE IF EXISTS {table}")


async def test_a_failed_transaction_is_handed_to_psycopg2_as_it_is(dsn: str) -> None:
    raw = await connect(dsn, autocommit=False)
    try:
        runner = LoopStatementRunner(raw)
        runner.enter()
        with pytest.raises(psycopg2.errors.UndefinedTable):
            await runner.execute("SELECT * FROM no_such_table_here")
        await runner.leave()
        # psycopg2 sees what it would have after running the statement itself.
        assert raw.status == psycopg2.extensions.STATUS_BEGIN
        assert raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            await anyio.to_thread.run_sync(thread_result, raw, "SELECT 1")
        await anyio.to_thread.run_sync(raw.rollback)
        assert raw.status == psycopg2.extensions.STATUS_READY
        assert raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        await anyio.to_thread.run_sync(raw.close)


async def test_autocommit_connection_with_an_sql_begin_stays_psycopg2s_usual_view(dsn: str) -> None:
    async with entered(dsn) as runner:
        raw = runner.raw
        await runner.execute("BEGIN")
        await runner.execute("CREATE TEMP TABLE in_tx (x int)")
        await runner.leave()
        # Exactly what psycopg2 shows after execute("BEGIN") in autocommit mode.
        assert raw.autocommit
        assert raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        await anyio.to_thread.run_sync(thread_result, raw, "ROLLBACK")
        runner.enter()
        with pytest.raises(psycopg2.errors.UndefinedTable):
            await runner.execute("SELECT * FROM in_tx")


async def test_misuse_is_refused(dsn: str) -> None:
    raw = await connect(dsn)
    try:
        runner = LoopStatementRunner(raw)
        with pytest.raises(PoolError, match="not entered"):
            await runner.execute("SELECT 1")
        runner.enter()
        with pytest.raises(PoolError, match="already entered"):
            runner.enter()
        results: list[Any] = []

        async def slow() -> None:
            results.append(await runner.execute("SELECT pg_sleep(0.2)"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await anyio.sleep(0.05)
            with pytest.raises(PoolError, match="another statement is running"):
                await runner.execute("SELECT 1")
        assert len(results) == 1
        await runner.leave()
        await runner.leave()  # twice is fine
        with pytest.raises(ValueError, match="cancel_grace"):
            LoopStatementRunner(raw, cancel_grace=0)
    finally:
        await anyio.to_thread.run_sync(raw.close)
    async_conn = await anyio.to_thread.run_sync(lambda: psycopg2.connect(dsn, async_=True))
    try:
        with pytest.raises(NativeUnavailable, match="asynchronous"):
            LoopStatementRunner(async_conn).enter()
    finally:
        async_conn.close()
    closed = LoopStatementRunner(raw)
    with pytest.raises(NativeUnavailable, match="closed"):
        closed.enter()


# -- cancellation ----------------------------------------------------------------------------


async def test_a_cancelled_statement_is_cancelled_on_the_server(dsn: str, app_name: str) -> None:
    async with entered(with_params(dsn, application_name=app_name)) as runner:
        async with ticking() as ticker:
            started = time.monotonic()
            with anyio.move_on_after(0.2) as scope:
                await runner.execute("SELECT pg_sleep(30)")
            elapsed = time.monotonic() - started
        assert scope.cancelled_caught
        assert elapsed < runner.cancel_grace + 1.0  # ended by the server's cancel, not the sleep
        assert not runner.raw.closed
        assert ticker.max_wall < 0.5
        # The statement is over on the server, and the connection works as before.
        states = server_query(
            dsn, "SELECT state, query FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        )
        assert [s for s, _ in states] == ["idle"], states
        assert (await runner.execute("SELECT 42")).rows == [(42,)]


async def test_many_cancellations_leave_the_connection_consistent(dsn: str) -> None:
    async with entered(dsn) as runner:
        for i in range(30):
            with anyio.move_on_after(0.001 * (i % 7)):
                await runner.execute("SELECT pg_sleep(0.01), %s", (i,))
            assert (await runner.execute("SELECT %s", (i,))).rows == [(i,)]
        assert not runner.raw.closed


async def test_an_unanswered_cancel_closes_the_connection_within_the_grace(dsn: str) -> None:
    params = psycopg2.extensions.parse_dsn(dsn)
    with (
        _loop_guard_off(),
        FaultProxy(params.get("host", "127.0.0.1"), int(params.get("port", 5432))) as proxy,
    ):
        raw = await connect(proxy.dsn(dsn))
        runner = LoopStatementRunner(raw, cancel_grace=0.5)
        runner.enter()
        try:
            async with ticking() as ticker:
                statement_started = time.monotonic()

                async def blackhole_soon() -> None:
                    await anyio.sleep(0.1)
                    proxy.blackhole()

                with anyio.move_on_after(0.3) as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(blackhole_soon)
                        await runner.execute("SELECT pg_sleep(30)")
                elapsed = time.monotonic() - statement_started
            assert scope.cancelled_caught
            assert elapsed < 0.3 + 0.5 + 1.0
            assert raw.closed
            assert ticker.max_wall < 0.5
            with pytest.raises(psycopg2.InterfaceError, match="connection already closed"):
                await runner.execute("SELECT 1")
        finally:
            proxy.passthrough()
            raw.close()


async def test_a_query_larger_than_the_socket_buffers_is_sent_in_turns(dsn: str) -> None:
    big = "x" * (16 * 1024 * 1024)  # libpq cannot send it at once: PQflush, wait writable, again
    async with entered(dsn) as runner:
        async with ticking() as ticker:
            result = await runner.execute("SELECT length(%s), 1", (big,))
        assert result.rows == [(len(big), 1)]
        assert ticker.max_wall < 0.5
        assert (await runner.execute("SELECT 2")).rows == [(2,)]
        # Cancelled while still sending: the connection is drained or closed, never half-used.
        with anyio.move_on_after(0.005):
            await runner.execute("SELECT length(%s)", (big,))
        if not runner.raw.closed:
            assert (await runner.execute("SELECT 3")).rows == [(3,)]


# -- large results ------------------------------------------------------------------------------


async def test_a_cursors_rows_are_converted_as_they_are_fetched(dsn: str) -> None:
    """As psycopg2: a value its typecaster refuses raises at the fetch of its row,
    the rows before and after it come back, and typecasters run for fetched rows only."""
    seen: list[str] = []

    def picky(value: str | None, cur: Any) -> Any:
        seen.append(value or "")
        if value == "bad":
            raise ValueError("a value the caster refuses")
        return value

    async with entered(dsn) as runner:
        raw = runner.raw
        caster = psycopg2.extensions.new_type((25,), "PICKY", picky)
        cur = raw.cursor()
        psycopg2.extensions.register_type(caster, cur)
        result = await runner.execute("SELECT unnest(ARRAY['a', 'bad', 'c', 'd'])", cursor=cur)
        assert seen == []  # nothing converted at execute
        assert result.fetch(0, 1, []) == [("a",)]
        with pytest.raises(ValueError, match="refuses"):
            result.fetch(1, 2, [])
        assert result.fetch(2, 3, []) == [("c",)]
        assert seen == ["a", "bad", "c"]  # row "d" never fetched, never converted


async def test_a_large_result_never_stalls_the_loop_and_holds_no_extra_copies(dsn: str) -> None:
    sql = "SELECT g, g::text || 'abc', g * 1.5 FROM generate_series(1, 200000) g"
    async with entered(dsn) as runner:
        # (describe=False: every row converted before execute returns, as the pool's
        # fetchall does; a cursor's converts as it fetches)
        async with ticking() as ticker:
            result = await runner.execute(sql, describe=False)
        assert len(result.rows) == 200_000
        assert result.rows[-1] == (200_000, "200000abc", 300_000.0)
        # CPU time of the loop thread between two ticks: work done without yielding.
        assert ticker.max_cpu < 0.050, ticker.max_cpu
        assert ticker.max_wall < 0.5, ticker.max_wall
        del result
        # Memory: while converting, Python holds the rows being built and little else.
        result, retained, peak = await traced(runner.execute(sql, describe=False))
        assert len(result.rows) == 200_000
        assert peak < retained * 1.2, (peak, retained)


# -- failures ---------------------------------------------------------------------------------


async def test_a_killed_backend_closes_the_connection(dsn: str, app_name: str) -> None:
    async with entered(with_params(dsn, application_name=app_name)) as runner:
        other = await connect(with_params(dsn, application_name=f"{app_name}-t"))
        try:
            for name in (app_name, f"{app_name}-t"):
                server_query(
                    dsn,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    (name,),
                )
            with pytest.raises(psycopg2.Error) as on_thread:
                await anyio.to_thread.run_sync(thread_result, other, "SELECT 1")
            with pytest.raises(psycopg2.Error) as on_loop:
                await runner.execute("SELECT 1")
            assert type(on_loop.value) is type(on_thread.value)
            assert isinstance(on_loop.value, psycopg2.OperationalError)
            assert on_loop.value.pgcode == on_thread.value.pgcode
            assert str(on_loop.value) == str(on_thread.value)
            assert runner.raw.closed
            assert not runner.entered
            with pytest.raises(psycopg2.InterfaceError):
                await runner.execute("SELECT 1")
        finally:
            other.close()


# -- notices and notifications ----------------------------------------------------------------


async def test_notices_and_notifications_reach_psycopg2_after_leaving(dsn: str) -> None:
    channel = f"native_{os.getpid()}"
    async with entered(dsn) as runner:
        raw = runner.raw
        await runner.execute(f"LISTEN {channel}")
        await runner.execute("DO $$ BEGIN RAISE NOTICE 'hello from the loop'; END $$")
        server_query(dsn, f"NOTIFY {channel}, 'payload-1'")
        await runner.execute("SELECT 1")  # reads the notification into libpq
        server_query(dsn, f"NOTIFY {channel}, 'payload-2'")
        await anyio.sleep(0.1)
        await runner.leave()
        assert any("hello from the loop" in n for n in raw.notices)
        payloads = [n.payload for n in raw.notifies]
        if "payload-2" not in payloads:
            await anyio.to_thread.run_sync(lambda: (time.sleep(0.2), raw.poll()))
            payloads = [n.payload for n in raw.notifies]
        assert payloads == ["payload-1", "payload-2"]
        runner.enter()
        await runner.execute(f"UNLISTEN {channel}")


# -- SSL ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssl_dsn() -> Iterator[str]:
    """A throwaway server with SSL on, its certificate self-signed (openssl)."""
    if shutil.which("openssl") is None:
        _missing("openssl is not installed (apt-get install openssl)")
    with ThrowawayPostgres(ssl=True) as server:
        yield with_params(server.dsn, sslmode="require")


async def test_over_ssl(ssl_dsn: str) -> None:
    async with entered(ssl_dsn) as runner:
        assert (await runner.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).rows == [
            (True,)
        ]
        other = await connect(ssl_dsn)
        try:
            # Rows wider than a TLS record, so OpenSSL holds data the socket no longer shows.
            for sql in (
                "SELECT g, repeat(md5(g::text), 40) FROM generate_series(1, 20000) g",
                "SELECT repeat('x', 100000), g FROM generate_series(1, 50) g",
            ):
                expected = await anyio.to_thread.run_sync(thread_result, other, sql)
                with anyio.fail_after(30):
                    got = native_view(await runner.execute(sql))
                assert got == expected
        finally:
            other.close()
        with anyio.move_on_after(0.2) as scope:
            await runner.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert (await runner.execute("SELECT 1")).rows == [(1,)]


# -- uvloop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
async def test_on_uvloop(dsn: str, anyio_backend: Any) -> None:
    try:
        import uvloop
    except ImportError:
        _missing("uvloop is not installed (pip install uvloop)")
    import asyncio

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    async with entered(dsn) as runner:
        other = await connect(dsn)
        try:
            for sql, params in TYPE_QUERIES:
                expected = await anyio.to_thread.run_sync(thread_result, other, sql, params)
                assert _plain(native_view(await runner.execute(sql, params))) == _plain(expected), sql
        finally:
            other.close()
        with anyio.move_on_after(0.2) as scope:
            await runner.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        result = await runner.execute("SELECT g FROM generate_series(1, 100000) g")
        assert len(result.rows) == 100_000


# -- many tasks, many connections ----------------------------------------------------------------


async def test_fifty_tasks_over_ten_connections(dsn: str) -> None:
    raws = [await connect(dsn) for _ in range(10)]
    runners = [LoopStatementRunner(raw) for raw in raws]
    for runner in runners:
        runner.enter()
    free = list(runners)
    available = anyio.Semaphore(len(runners))
    done: list[int] = []

    async def task(n: int) -> None:
        for i in range(20):
            async with available:
                runner = free.pop()
                try:
                    assert (await runner.execute("SELECT %s", (n * 1000 + i,))).rows == [(n * 1000 + i,)]
                finally:
                    free.append(runner)
        done.append(n)

    try:
        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(task, n)
        assert sorted(done) == list(range(50))
    finally:
        for runner in runners:
            await runner.leave()
        for raw in raws:
            raw.close()
