"""OpenTelemetry spans and metrics of the pool, against the real SDK; the path
each statement takes (no silent fallback to threads).

The SDK's providers are put in the API's global slots for one test at a time
(and taken out after), as an app's ``set_tracer_provider`` would put them.
Every test runs on asyncio and trio, and (unless it passes ``io`` itself) with
``io="loop"`` and ``io="thread"``.
"""

from __future__ import annotations

import io as _io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg2
import psycopg2.extensions
import pytest
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_globals
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pgpool_async import AsyncConnectionPool, PoolConfigError, PoolTimeout

from .conftest import server_query

pytestmark = pytest.mark.anyio

POOL_SCOPE = "pgpool_async"
IDLE = {"db.client.connection.state": "idle"}
USED = {"db.client.connection.state": "used"}


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer: trace.Tracer

    def db_spans(self) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]

    def metrics(self) -> dict[str, list[Any]]:
        """Every data point by metric name."""
        points: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Otel]:
    """An SDK tracer and meter provider, set as the app's global ones for this test."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", tracer_provider)
    monkeypatch.setattr(metrics_globals, "_METER_PROVIDER", meter_provider)
    yield Otel(exporter, reader, tracer_provider.get_tracer("tests"))
    meter_provider.shutdown()
    tracer_provider.shutdown()


@pytest.fixture
def dbname(dsn: str) -> str:
    return str(server_query(dsn, "SELECT current_database()")[0][0])


def _check_db_span(span: ReadableSpan, parent: ReadableSpan | Any, dbname: str) -> None:
    attrs = span.attributes or {}
    assert span.kind is SpanKind.CLIENT
    assert span.instrumentation_scope is not None and span.instrumentation_scope.name == POOL_SCOPE, (
        span.instrumentation_scope
    )
    assert span.parent is not None, f"{span.name}: a root span"
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context is not None and span.context.trace_id == parent.get_span_context().trace_id
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["db.namespace"] == dbname
    assert attrs["server.address"]
    assert isinstance(attrs["server.port"], int)


async def _every_statement_api(pool: AsyncConnectionPool) -> list[tuple[str, str]]:
    """Run each public statement API once; the (operation, text) each should show."""
    expected: list[tuple[str, str]] = []
    assert await pool.fetchval("SELECT %s::int", (1,)) == 1
    expected.append(("SELECT", "SELECT %s::int"))
    assert await pool.execute("SELECT 2") == 1
    expected.append(("SELECT", "SELECT 2"))
    assert await pool.fetchone("SELECT 3") == (3,)
    expected.append(("SELECT", "SELECT 3"))
    assert await pool.fetchall("SELECT 4") == [(4,)]
    expected.append(("SELECT", "SELECT 4"))
    async with pool.connection() as conn:
        assert await conn.fetchval("SELECT %(x)s::int", {"x": 5}) == 5
        expected.append(("SELECT", "SELECT %(x)s::int"))
        await conn.execute("SELECT 6")
        expected.append(("SELECT", "SELECT 6"))
        assert await conn.fetchone("SELECT 7") == (7,)
        expected.append(("SELECT", "SELECT 7"))
        assert await conn.fetchall("SELECT 8") == [(8,)]
        expected.append(("SELECT", "SELECT 8"))
        async with conn.cursor() as cur:
            await cur.execute("SELECT %s::int", (9,))
            assert await cur.fetchone() == (9,)
            expected.append(("SELECT", "SELECT %s::int"))
        await conn.commit()
        expected.append(("COMMIT", "COMMIT"))
        await conn.execute("SELECT 10")
        expected.append(("SELECT", "SELECT 10"))
    expected.append(("COMMIT", "COMMIT"))  # the block's end
    return expected


async def test_one_span_per_statement_under_the_callers_span(otel: Otel, dsn: str, dbname: str) -> None:
    async with AsyncConnectionPool(1, 2, dsn) as pool:
        otel.exporter.clear()
        with otel.tracer.start_as_current_span("request") as request:
            expected = await _every_statement_api(pool)
        spans = otel.db_spans()
        assert [(s.attributes["db.operation.name"], s.attributes["db.query.text"]) for s in spans] == expected  # type: ignore[index]
        for span in spans:
            _check_db_span(span, request, dbname)
            assert span.name == f"{span.attributes['db.operation.name']} {dbname}"  # type: ignore[index]
            assert span.status.status_code is StatusCode.UNSET
        stats = pool.get_stats()
        ran = stats.get("statements_on_loop", 0) + stats.get("statements_in_threads", 0)
        assert ran >= len(expected)
        if pool.io == "thread":
            assert "statements_on_loop" not in stats
        else:  # every one of these runs on the loop (a plain cursor included)
            assert "statements_in_threads" not in stats, stats


async def test_executemany_callproc_and_copy(
    otel: Otel, dsn: str, dbname: str, no_wait_callback: None
) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        async with pool.connection() as conn:
            await conn.execute("CREATE TEMP TABLE t_copy (a int)")
            otel.exporter.clear()
            with otel.tracer.start_as_current_span("request") as request:
                async with conn.cursor() as cur:
                    await cur.executemany("INSERT INTO t_copy VALUES (%s)", [(1,), (2,)])
                    await cur.callproc("abs", (-3,))
                await conn.copy_expert("COPY t_copy TO STDOUT", _io.StringIO())
            spans = otel.db_spans()  # (before the block's COMMIT, outside the request)
        for span in spans:
            _check_db_span(span, request, dbname)
        texts = [s.attributes["db.query.text"] for s in spans]  # type: ignore[index]
        # executemany: one span per statement on the loop, one for the call in a thread
        # (as psycopg2's instrumentation does).
        inserts = texts.count("INSERT INTO t_copy VALUES (%s)")
        assert inserts == (1 if pool.io == "thread" else 2), texts
        assert texts[inserts:] == ["abs", "COPY t_copy TO STDOUT"], texts


async def test_an_error_carries_its_sqlstate(otel: Otel, dsn: str, dbname: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool:
        otel.exporter.clear()
        with otel.tracer.start_as_current_span("request") as request:
            with pytest.raises(psycopg2.errors.UndefinedTable):
                await pool.fetchval("SELECT * FROM no_such_table_here")
            async with pool.connection() as conn:
                with pytest.raises(psycopg2.errors.DivisionByZero):
                    await conn.fetchval("SELECT 1/0")
                await conn.rollback()
        failed = [s for s in otel.db_spans() if s.status.status_code is StatusCode.ERROR]
        assert [s.attributes["error.type"] for s in failed] == ["42P01", "22012"]  # type: ignore[index]
        assert [s.attributes["db.response.status_code"] for s in failed] == ["42P01", "22012"]  # type: ignore[index]
        for span in failed:
            _check_db_span(span, request, dbname)
            assert any(e.name == "exception" for e in span.events)


async def test_an_error_leaves_the_next_statement_of_the_same_text_clean(otel: Otel, dsn: str) -> None:
    """A statement's attributes are built once per text and shared: a failure's
    ``error.type`` goes on its own span and point only."""
    async with AsyncConnectionPool(1, 1, dsn, autocommit=True) as pool:
        otel.exporter.clear()
        for divisor in (0, 1, 0, 2):
            if divisor:
                assert await pool.fetchval("SELECT 2/%s", (divisor,)) == 2 // divisor
            else:
                with pytest.raises(psycopg2.errors.DivisionByZero):
                    await pool.fetchval("SELECT 2/%s", (divisor,))
        spans = [s for s in otel.db_spans() if s.attributes["db.query.text"] == "SELECT 2/%s"]  # type: ignore[index]
        assert ["error.type" in s.attributes for s in spans] == [True, False, True, False]  # type: ignore[operator]
        points = [
            p
            for p in otel.metrics()["db.client.operation.duration"]
            if p.attributes.get("db.operation.name") == "SELECT"
        ]
        assert sum(p.count for p in points if p.attributes.get("error.type") == "22012") == 2
        assert sum(p.count for p in points if "error.type" not in p.attributes) >= 2
        assert all("db.query.text" not in p.attributes for p in points)


async def test_telemetry_false_emits_nothing(otel: Otel, dsn: str) -> None:
    async with AsyncConnectionPool(1, 2, dsn, name="quiet", telemetry=False) as pool:
        with otel.tracer.start_as_current_span("request"):
            await _every_statement_api(pool)
        assert otel.db_spans() == []
        for name, points in otel.metrics().items():
            pools = {p.attributes.get("db.client.connection.pool.name") for p in points}
            assert "quiet" not in pools, name
        assert "db.client.operation.duration" not in otel.metrics()


async def test_no_provider_no_spans_and_same_results(dsn: str) -> None:
    """With the API but no SDK set up, the pool runs as without telemetry."""
    assert trace._TRACER_PROVIDER is None
    async with AsyncConnectionPool(1, 2, dsn) as pool:
        await _every_statement_api(pool)
        assert pool._telemetry.live() is False


# -- Psycopg2Instrumentor --------------------------------------------------------------


@pytest.fixture
def instrumented(otel: Otel) -> Iterator[Any]:
    """``Psycopg2Instrumentor().instrument()``, globally, undone after the test."""
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor

    instrumentor = Psycopg2Instrumentor()
    instrumentor.instrument()
    try:
        yield instrumentor
    finally:
        instrumentor.uninstrument()


async def test_psycopg2_instrumentor_keeps_the_loop_path_one_span_each(
    otel: Otel, instrumented: Any, dsn: str, dbname: str
) -> None:
    async with AsyncConnectionPool(1, 2, dsn) as pool:
        async with pool.connection() as conn:
            factory = conn.raw.cursor_factory
            assert factory is not None and factory.__name__ == "TracedCursorFactory"
        otel.exporter.clear()
        pool.pop_stats()
        with otel.tracer.start_as_current_span("request") as request:
            expected = await _every_statement_api(pool)
        spans = otel.db_spans()
        assert len(spans) == len(expected), [(s.name, s.instrumentation_scope) for s in spans]
        for span in spans:
            _check_db_span(span, request, dbname)
        stats = pool.get_stats()
        if pool.io != "thread":
            assert "statements_in_threads" not in stats, (
                stats
            )  # the instrumented connection stays on the loop
            assert stats["statements_on_loop"] >= len(expected)


@pytest.mark.single_io("passes io='thread' itself")
async def test_instrument_connection_in_configure(otel: Otel, dsn: str, dbname: str) -> None:
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor

    def configure(raw: psycopg2.extensions.connection) -> None:
        Psycopg2Instrumentor().instrument_connection(raw)

    for io in ("thread", "auto"):
        async with AsyncConnectionPool(1, 1, dsn, io=io, configure=configure) as pool:
            otel.exporter.clear()
            with otel.tracer.start_as_current_span("request") as request:
                expected = await _every_statement_api(pool)
            spans = otel.db_spans()
            assert len(spans) == len(expected), [(s.name, s.instrumentation_scope) for s in spans]
            for span in spans:
                _check_db_span(span, request, dbname)
            if io == "auto":
                assert "statements_in_threads" not in pool.get_stats()


# -- no silent fallback ----------------------------------------------------------------


class _OwnConnection(psycopg2.extensions.connection):
    """A connection class the pool does not know."""


class _OwnCursor(psycopg2.extensions.cursor):
    """A cursor factory the pool does not know."""


@pytest.mark.single_io("passes io itself")
@pytest.mark.parametrize(
    "options, reason",
    [
        ({"connection_factory": _OwnConnection}, "connection class tests.test_telemetry._OwnConnection"),
        ({"cursor_factory": _OwnCursor}, "cursor_factory tests.test_telemetry._OwnCursor"),
    ],
)
async def test_io_loop_refuses_what_it_cannot_run_and_auto_says_so(
    dsn: str, caplog: pytest.LogCaptureFixture, options: dict[str, Any], reason: str
) -> None:
    async with AsyncConnectionPool(1, 1, dsn, io="loop", name="strict", **options) as pool:
        with pytest.raises(PoolConfigError, match=reason):
            await pool.fetchval("SELECT 1")
        async with pool.connection() as conn:
            with pytest.raises(PoolConfigError, match="'strict' has io=\"loop\""):
                await conn.execute("SELECT 1")
    caplog.set_level(logging.INFO, logger="pgpool_async")
    async with AsyncConnectionPool(1, 1, dsn, io="auto", name="lenient", **options) as pool:
        for _ in range(3):
            assert await pool.fetchval("SELECT 1") == 1
        stats = pool.get_stats()
        assert stats["statements_in_threads"] == 3 and "statements_on_loop" not in stats
    said = [r for r in caplog.records if r.name == "pgpool_async" and "worker threads" in r.getMessage()]
    assert len(said) == 1, said  # once per pool and reason
    assert said[0].levelno == logging.INFO
    assert "'lenient'" in said[0].getMessage() and reason in said[0].getMessage()


@pytest.mark.single_io("passes io itself")
async def test_a_proxied_connection_is_refused_by_io_loop_and_logged_by_auto(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection wrapped in a proxy (as ddtrace and Elastic APM wrap psycopg2's)."""
    import wrapt

    class Proxy(wrapt.ObjectProxy):  # type: ignore[misc]
        pass

    connect = psycopg2.connect
    monkeypatch.setattr(psycopg2, "connect", lambda *args, **kwargs: Proxy(connect(*args, **kwargs)))
    async with AsyncConnectionPool(1, 1, dsn, io="loop") as pool:
        with pytest.raises(PoolConfigError, match=r"wrapped by .*Proxy, a proxy the pool does not know"):
            await pool.fetchval("SELECT 1")
    caplog.set_level(logging.INFO, logger="pgpool_async")
    async with AsyncConnectionPool(1, 1, dsn, io="auto", name="proxied") as pool:
        assert await pool.fetchval("SELECT 1") == 1
        assert await pool.fetchval("SELECT 2") == 2
        assert pool.get_stats()["statements_in_threads"] == 2
    said = [r.getMessage() for r in caplog.records if "worker threads" in r.getMessage()]
    assert len(said) == 1 and "'proxied'" in said[0] and "a proxy" in said[0], said


@pytest.mark.single_io("passes io itself")
async def test_psycopg2s_own_classes_run_in_threads_and_are_logged(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg2.extras

    caplog.set_level(logging.INFO, logger="pgpool_async")
    async with AsyncConnectionPool(
        1, 1, dsn, io="loop", name="dicts", connection_factory=psycopg2.extras.RealDictConnection
    ) as pool:
        assert await pool.fetchone("SELECT 1 AS a") == {"a": 1}
        assert pool.get_stats()["statements_in_threads"] == 1
    assert any("RealDictConnection" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


# -- metrics ---------------------------------------------------------------------------


def _value(points: list[Any], pool: str, **attrs: str) -> Any:
    found = [
        p
        for p in points
        if p.attributes.get("db.client.connection.pool.name") == pool
        and all(p.attributes.get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, (pool, attrs, points)
    return found[0]


async def test_metrics_move_as_the_pool_lends_waits_times_out_and_opens(otel: Otel, dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, name="metered", timeout=5) as pool:
        m = otel.metrics()
        assert _value(m["db.client.connection.create_time"], "metered").count == 1
        assert _value(m["db.client.connection.max"], "metered").value == 1
        assert _value(m["db.client.connection.idle.min"], "metered").value == 1
        assert _value(m["db.client.connection.idle.max"], "metered").value == 1
        assert _value(m["db.client.connection.count"], "metered", **IDLE).value == 1
        assert _value(m["db.client.connection.count"], "metered", **USED).value == 0

        waited = anyio.Event()
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")
            m = otel.metrics()
            used = _value(m["db.client.connection.count"], "metered", **USED)
            assert used.value == 1
            assert _value(m["db.client.connection.pending_requests"], "metered").value == 0

            async def wait_for_it() -> None:
                async with pool.connection() as other:
                    await other.fetchval("SELECT 2")
                waited.set()

            async with anyio.create_task_group() as group:
                group.start_soon(wait_for_it)
                while not pool.get_stats().get("requests_waiting"):
                    await anyio.sleep(0.01)
                assert _value(otel.metrics()["db.client.connection.pending_requests"], "metered").value == 1
                with pytest.raises(PoolTimeout):
                    await pool.getconn(timeout=0.05)  # queues behind the first waiter, times out
                await anyio.sleep(0.05)
                await conn.commit()
                # leaving the block returns conn: the waiter gets it
                group.cancel_scope.deadline = anyio.current_time() + 10
                await _return_and_wait(pool, conn, waited)
        m = otel.metrics()
        assert _value(m["db.client.connection.timeouts"], "metered").value == 1
        wait = _value(m["db.client.connection.wait_time"], "metered")
        assert wait.count >= 2 and wait.max >= 0.05  # the waiter queued at least that long
        assert _value(m["db.client.connection.use_time"], "metered").count >= 2
        durations = m["db.client.operation.duration"]
        assert sum(p.count for p in durations) >= 2
        assert all(p.attributes["db.system.name"] == "postgresql" for p in durations)
        assert all("db.query.text" not in p.attributes for p in durations)


async def _return_and_wait(pool: AsyncConnectionPool, conn: Any, waited: anyio.Event) -> None:
    await pool.putconn(conn)
    await waited.wait()


async def test_the_sql_commenter_is_honoured(otel: Otel, dsn: str) -> None:
    """``instrument(enable_commenter=True)``: the statement the server runs carries
    the traceparent of the pool's span for it, on both paths."""
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor

    instrumentor = Psycopg2Instrumentor()
    instrumentor.instrument(enable_commenter=True)
    try:
        async with AsyncConnectionPool(1, 1, dsn) as pool:
            otel.exporter.clear()
            with otel.tracer.start_as_current_span("request"):
                seen = [await pool.fetchval("SELECT current_query()")]
                async with pool.connection() as conn:
                    seen.append(await conn.fetchval("SELECT current_query()"))
                    async with conn.cursor() as cur:
                        await cur.execute("SELECT current_query()")
                        seen.append((await cur.fetchone())[0])
            spans = [s for s in otel.db_spans() if s.attributes["db.query.text"] == "SELECT current_query()"]  # type: ignore[index]
            assert len(spans) == 3
            for query, span in zip(seen, spans, strict=True):
                assert span.context is not None
                ctx = span.context
                traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
                assert f"traceparent='{traceparent}'" in query, query
            # (the three, and the block's COMMIT)
            assert pool.get_stats().get("statements_in_threads", 0) == (4 if pool.io == "thread" else 0)
    finally:
        instrumentor.uninstrument()


@pytest.mark.single_io("runs a child process with the default io")
def test_without_opentelemetry_the_package_imports_and_runs(dsn: str) -> None:
    """``opentelemetry`` made unimportable before pgpool_async is imported: a pool
    runs statements, counts them, and telemetry is simply off."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import asyncio\n"
        "from pgpool_async import AsyncConnectionPool\n"
        "from pgpool_async import _telemetry\n"
        "assert _telemetry._otel_trace is None\n"
        "async def main():\n"
        "    async with AsyncConnectionPool(1, 1, sys.argv[1]) as pool:\n"
        "        assert await pool.fetchval('SELECT 41 + 1') == 42\n"
        "        async with pool.connection() as conn, conn.cursor() as cur:\n"
        "            await cur.execute('SELECT 1')\n"
        "        assert not pool._telemetry.enabled and not pool._telemetry.live()\n"
        "        stats = pool.get_stats()\n"
        "        print(stats.get('statements_on_loop', 0) + stats.get('statements_in_threads', 0))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, dsn], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 3  # (fetchval, the cursor's execute, the block's COMMIT)
