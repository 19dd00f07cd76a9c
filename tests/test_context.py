"""Tracers' context reaches the pool's threads (OpenTelemetry, ddtrace, Sentry).

Tracers keep the current span in :mod:`contextvars`. Every call the pool runs in
a thread of its own (statements, connects, the ``configure``/``check``/``reset``
hooks, returns) must run in a copy of the calling task's context, taken when the
call was handed over: else a database span made in a worker thread starts a
trace of its own instead of joining the caller's.

A ``connection_factory`` records ``request_id.get()`` where psycopg2 runs: in
its constructor (the connect) and in its cursors' ``execute``; the hooks record
it too. Every test runs on asyncio and trio.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import psycopg2.extensions
import pytest

from pgpool_async import AsyncConnectionPool
from pgpool_async._thread.offload import Offloader

pytestmark = [pytest.mark.anyio, pytest.mark.single_io("passes io='thread' itself")]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="(none)")

#: (where, request_id.get() there, the thread's ident)
Seen = list[tuple[str, str, int]]


def _note(seen: Seen, where: str) -> None:
    seen.append((where, request_id.get(), threading.get_ident()))


def _recording_connection(seen: Seen) -> type[psycopg2.extensions.connection]:
    """A psycopg2 connection class that notes the context of its connect and of
    each statement (``execute``, with the statement's text)."""

    class Cursor(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> None:
            _note(seen, f"execute {query}")
            super().execute(query, vars)

    class Connection(psycopg2.extensions.connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _note(seen, "connect")
            self.cursor_factory = Cursor

    return Connection


def _hook(seen: Seen, where: str) -> Callable[[psycopg2.extensions.connection], None]:
    def hook(raw: psycopg2.extensions.connection) -> None:
        _note(seen, where)

    return hook


def _off_loop(seen: Seen, loop_thread: int) -> Seen:
    """Every entry was made in a thread other than the event loop's (a worker)."""
    assert seen, "nothing was recorded"
    assert all(ident != loop_thread for _, _, ident in seen), seen
    return seen


async def test_statements_run_in_the_callers_context(dsn: str) -> None:
    """``pool.fetchval``/``execute``, ``conn.fetchval``/``execute``, a cursor's
    ``execute`` and ``conn.run_sync``, with io="thread"."""
    seen: Seen = []
    loop_thread = threading.get_ident()
    async with AsyncConnectionPool(
        1, 2, dsn, io="thread", connection_factory=_recording_connection(seen)
    ) as pool:
        seen.clear()
        request_id.set("pool.fetchval")
        assert await pool.fetchval("SELECT 1") == 1
        request_id.set("pool.execute")
        await pool.execute("SELECT 2")
        async with pool.connection() as conn:
            request_id.set("conn.fetchval")
            assert await conn.fetchval("SELECT 3") == 3
            request_id.set("conn.execute")
            await conn.execute("SELECT 4")
            request_id.set("cursor.execute")
            async with conn.cursor() as cur:
                await cur.execute("SELECT 5")
                assert await cur.fetchone() == (5,)
            request_id.set("conn.run_sync")
            assert await conn.run_sync(lambda raw: request_id.get()) == "conn.run_sync"
        executed = [(where, value) for where, value, _ in _off_loop(seen, loop_thread)]
        assert executed == [
            ("execute SELECT 1", "pool.fetchval"),
            ("execute SELECT 2", "pool.execute"),
            ("execute SELECT 3", "conn.fetchval"),
            ("execute SELECT 4", "conn.execute"),
            ("execute SELECT 5", "cursor.execute"),
        ]


async def test_concurrent_callers_each_see_their_own_context(dsn: str) -> None:
    """The context is the one of the task that made the call, taken when it was
    handed to the thread: concurrent tasks, each with its own value, sharing
    threads and connections."""
    seen: Seen = []
    loop_thread = threading.get_ident()

    async def one(i: int) -> None:
        request_id.set(f"task {i}")
        for _ in range(3):
            assert await pool.fetchval(f"SELECT {i}") == i
            await anyio.lowlevel.checkpoint()
        async with pool.connection() as conn:
            assert await conn.fetchval(f"SELECT {i}") == i

    async with AsyncConnectionPool(
        2, 3, dsn, io="thread", connection_factory=_recording_connection(seen)
    ) as pool:
        seen.clear()
        mine = request_id.get()
        async with anyio.create_task_group() as group:
            for i in range(12):
                group.start_soon(one, i)
    assert request_id.get() == mine  # the tasks' values stayed theirs
    _off_loop(seen, loop_thread)
    statements = [(where, value) for where, value, _ in seen if where != "connect"]
    assert len(statements) == 12 * 4
    assert all(where == f"execute SELECT {value.removeprefix('task ')}" for where, value in statements)
    # A connect opened for a waiting task (maxconn > minconn) runs in that task's context.
    assert all(value.startswith("task ") for where, value, _ in seen if where == "connect")


async def test_connects_and_configure_run_in_the_context_that_asked_for_them(dsn: str) -> None:
    """``open()``'s connects (``minconn``) see the context of the task that called
    ``open()``; a connect a checkout triggers sees the checkout's."""
    seen: Seen = []
    loop_thread = threading.get_ident()
    pool = AsyncConnectionPool(
        1,
        2,
        dsn,
        io="thread",
        connection_factory=_recording_connection(seen),
        configure=_hook(seen, "configure"),
    )
    request_id.set("open")
    async with pool:
        assert [(w, v) for w, v, _ in _off_loop(seen, loop_thread)] == [
            ("connect", "open"),
            ("configure", "open"),
        ]
        seen.clear()
        async with pool.connection():  # the one opened by open()
            request_id.set("second checkout")
            async with pool.connection():  # opens the second one
                pass
        assert [(w, v) for w, v, _ in _off_loop(seen, loop_thread) if w in ("connect", "configure")] == [
            ("connect", "second checkout"),
            ("configure", "second checkout"),
        ]


async def test_check_and_reset_hooks_run_in_the_callers_context(dsn: str) -> None:
    """``check=`` (at checkout) sees the checkout's context; ``reset=`` (at return)
    the context of the task that gave the connection back."""
    seen: Seen = []
    loop_thread = threading.get_ident()
    async with AsyncConnectionPool(
        1, 1, dsn, io="thread", check=_hook(seen, "check"), check_idle=0, reset=_hook(seen, "reset")
    ) as pool:
        for i in range(3):
            seen.clear()
            request_id.set(f"borrower {i}")
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            assert [(w, v) for w, v, _ in _off_loop(seen, loop_thread)] == [
                ("check", f"borrower {i}"),
                ("reset", f"borrower {i}"),
            ]


async def test_on_cancel_runs_in_the_callers_context() -> None:
    """A caller cancelled while its thread call runs: ``on_cancel`` (which asks
    the server to cancel the statement) runs in the caller's context, not the
    canceller's. No server needed."""
    offload = Offloader(2, "ctx-test")
    release = threading.Event()
    started = anyio.Event()
    token = anyio.lowlevel.current_token()
    seen: list[str] = []

    def blocked() -> str:
        anyio.from_thread.run_sync(started.set, token=token)
        release.wait(10)
        return request_id.get()

    def on_cancel() -> None:
        seen.append(request_id.get())
        release.set()

    async def caller(scope_ready: Callable[[anyio.CancelScope], None]) -> None:
        request_id.set("caller")
        with anyio.CancelScope() as scope:
            scope_ready(scope)
            await offload.run(blocked, on_cancel=on_cancel)

    scopes: list[anyio.CancelScope] = []
    try:
        request_id.set("canceller")
        async with anyio.create_task_group() as group:
            group.start_soon(caller, scopes.append)
            with anyio.fail_after(10):
                await started.wait()
            scopes[0].cancel()
    finally:
        release.set()
        offload.shutdown()
    assert seen == ["caller"]


async def test_opentelemetry_db_span_is_a_child_of_the_callers_span(dsn: str) -> None:
    """With the real SDK: the span psycopg2's instrumentation makes in the worker
    thread has the caller's span as its parent, in the caller's trace."""
    pytest.importorskip("opentelemetry.sdk.trace")
    pytest.importorskip("opentelemetry.instrumentation.psycopg2")
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer(__name__)

    def configure(raw: psycopg2.extensions.connection) -> None:
        Psycopg2Instrumentor().instrument_connection(raw, tracer_provider=provider)

    async with AsyncConnectionPool(1, 1, dsn, io="thread", configure=configure) as pool:
        with tracer.start_as_current_span("request") as request_span:
            assert await pool.fetchval("SELECT 42") == 42
            async with pool.connection() as conn, conn.cursor() as cur:
                await cur.execute("SELECT 43")
    request_context = request_span.get_span_context()
    db_spans = [s for s in exporter.get_finished_spans() if s.name != "request"]
    assert len(db_spans) == 2, [s.name for s in exporter.get_finished_spans()]
    for span in db_spans:
        assert span.parent is not None, f"{span.name}: a root span, not the request's child"
        assert span.parent.span_id == request_context.span_id
        assert span.context.trace_id == request_context.trace_id
