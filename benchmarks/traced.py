"""Tracing for the benchmarks: the OpenTelemetry SDK set up as an app would, and
each contender's own instrumentation.

:func:`sdk` puts an SDK tracer provider (a ``BatchSpanProcessor`` over an
exporter that drops the spans: the batch processor's cost, not a network's) and
optionally a meter provider in the API's global slots, and takes them out after.

:class:`Tracing` is ``python -m benchmarks.run --traced``: each operation of the
realistic workloads runs inside a ``request`` span, and each contender runs with
its library's instrumentation, switched on before its pool opens and off after
it closes (instrumentors patch classes globally: no contender sees another's):

- pgpool_async: its own spans and metrics (``telemetry=True``, the default), no instrumentor;
- asyncpg: ``opentelemetry-instrumentation-asyncpg``;
- psycopg_pool: ``opentelemetry-instrumentation-psycopg``;
- aiopg: ``opentelemetry-instrumentation-aiopg``;
- psycopg2 in threads (the naive pool, psycopg2's ThreadedConnectionPool):
  ``opentelemetry-instrumentation-psycopg2``.

The exporter counts the spans that are not request spans (the database spans),
so each round reports how many its contender made.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_globals
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["REQUEST_SPAN", "Drop", "Tracing", "instrumentor", "sdk"]

REQUEST_SPAN = "request"


class Drop(SpanExporter):
    """An exporter that sends nowhere; it counts the spans not named ``request``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.db_spans = 0

    def export(self, spans: Any) -> SpanExportResult:
        db = sum(1 for span in spans if span.name != REQUEST_SPAN)
        with self._lock:
            self.db_spans += db
        return SpanExportResult.SUCCESS


@contextlib.contextmanager
def sdk(on: bool, metrics: bool = True) -> Iterator[tuple[Any, Drop | None, Any]]:
    """``(tracer, exporter, tracer_provider)`` with the SDK's providers in the API's
    global slots (as ``set_tracer_provider`` puts them, but undone after: rounds
    switch it on and off); ``(None, None, None)`` when not ``on``. ``metrics``: a
    meter provider with a reader too."""
    if not on:
        yield None, None, None
        return
    exporter = Drop()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    meter_provider = (
        MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False) if metrics else None
    )
    trace._TRACER_PROVIDER = tracer_provider  # type: ignore[attr-defined]
    metrics_globals._METER_PROVIDER = meter_provider
    try:
        yield tracer_provider.get_tracer("benchmark"), exporter, tracer_provider
    finally:
        trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
        metrics_globals._METER_PROVIDER = None
        tracer_provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()


def instrumentor(cls: Any) -> Any:
    """The OpenTelemetry instrumentor of a contender's library, or None: the
    pool traces itself (pgpool_async), or no instrumentation is installed."""
    library: str = cls.library
    try:
        if library == "asyncpg":
            from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

            return AsyncPGInstrumentor()
        if library == "psycopg_pool":
            from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

            return PsycopgInstrumentor()
        if library == "aiopg":
            from opentelemetry.instrumentation.aiopg import AiopgInstrumentor

            return AiopgInstrumentor()
        if library.startswith("psycopg2"):
            from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor

            return Psycopg2Instrumentor()
    except ImportError:
        return None
    return None


class Tracing:
    """``--traced``: a tracer provider for the whole run, each contender instrumented
    by its own library's instrumentor while its pool is open, each operation in a
    request span. Call inside :func:`sdk` (``tracer``, ``exporter``, ``provider``)."""

    def __init__(self, tracer: Any, exporter: Drop, provider: Any) -> None:
        self.tracer = tracer
        self.exporter = exporter
        self.provider = provider

    @staticmethod
    def how(cls: Any) -> str:
        """What traces this contender's statements, for the tables' notes."""
        if cls.library.startswith("pgpool_async"):
            return "pgpool_async's own spans"
        inst = instrumentor(cls)
        if inst is None:
            return "untraced (no instrumentation installed)"
        return type(inst).__module__

    @contextlib.contextmanager
    def instrumented(self, cls: Any) -> Iterator[None]:
        """``cls``'s instrumentation on for the block (none for pgpool_async)."""
        inst = instrumentor(cls)
        if inst is None:
            yield
            return
        inst.instrument(tracer_provider=self.provider, skip_dep_check=True)
        try:
            yield
        finally:
            inst.uninstrument()

    def db_spans(self) -> int:
        """The database spans exported so far (after a flush)."""
        self.provider.force_flush()
        return self.exporter.db_spans

    def wrap_async(self, op: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """``op`` inside a request span."""
        start = self.tracer.start_as_current_span

        async def request() -> Any:
            with start(REQUEST_SPAN):
                return await op()

        return request

    def wrap_sync(self, op: Callable[[], Any]) -> Callable[[], Any]:
        """The same for an operation run in a thread."""
        start = self.tracer.start_as_current_span

        def request() -> Any:
            with start(REQUEST_SPAN):
                return op()

        return request
