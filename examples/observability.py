"""Traces and metrics of a FastAPI app on pgpool_async, with the OpenTelemetry SDK.

The app sets up the SDK as any OpenTelemetry app does; the pool needs nothing
more: each statement is a CLIENT span under the request's span, and the pool's
metrics go to the app's meter provider. ``Psycopg2Instrumentor`` is on too (an
app may well have it already): the pool keeps running statements on the event
loop and its own span stands in for the instrumentation's, one per statement.

Run: ``PGPOOL_DSN=... python examples/observability.py`` (needs ``pip install -e
'.[fastapi,otel,prometheus]' opentelemetry-sdk opentelemetry-instrumentation-fastapi
opentelemetry-instrumentation-psycopg2``), then:

- ``curl localhost:8000/orders/1``: a request with three statements;
- ``curl localhost:8000/debug/spans``: the spans recorded so far (an in-memory
  exporter: use an OTLP exporter in production); ``OTEL_CONSOLE=1`` also prints them;
- ``curl localhost:8000/debug/metrics``: the OpenTelemetry metrics, read now;
- ``curl localhost:8000/metrics``: the same pool figures for Prometheus.

``PORT`` picks the port (default 8000).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import prometheus_client
import uvicorn
from fastapi import FastAPI
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pgpool_async import prometheus
from pgpool_async.fastapi import AppPool, Connection, Pool, health_router, install_error_handlers

# -- the app's OpenTelemetry setup (nothing here is specific to pgpool_async) ----------

# --8<-- [start:setup]
resource = Resource.create({"service.name": "observability-example"})
spans = InMemorySpanExporter()
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
if os.environ.get("OTEL_CONSOLE"):
    tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(tracer_provider)
metric_reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[metric_reader]))
Psycopg2Instrumentor().instrument()  # optional: the pool stays on its fast path with it
# --8<-- [end:setup]

# -- the app ---------------------------------------------------------------------------

db = AppPool(1, 5, os.environ.get("PGPOOL_DSN", ""), timeout=5, application_name="observability")


# --8<-- [start:prometheus]
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with db.lifespan(app):
        prometheus.register(db.pool)  # GET /metrics
        yield


app = FastAPI(lifespan=lifespan)
install_error_handlers(app)
app.include_router(health_router(db))
app.mount("/metrics", prometheus_client.make_asgi_app())
# --8<-- [end:prometheus]
FastAPIInstrumentor.instrument_app(app)  # a SERVER span per request

Conn = Connection(db)
DB = Pool(db)


@app.get("/orders/{order}")
async def order(order: int, pool: DB, conn: Conn) -> dict[str, Any]:
    """Three statements, three spans under this request's span: a one-hop call, a
    statement on the request's connection, a cursor's (then the COMMIT)."""
    total = await pool.fetchval("SELECT %s::int * 10", (order,))
    now = await conn.fetchval("SELECT now()::text")
    async with conn.cursor() as cur:
        await cur.execute("SELECT generate_series(1, %s)", (order,))
        lines = len(await cur.fetchall())
    return {"order": order, "total": total, "lines": lines, "at": now}


@app.get("/debug/spans")
async def recorded_spans() -> list[dict[str, Any]]:
    """The spans finished so far, oldest first."""
    return [
        {
            "name": span.name,
            "kind": span.kind.name,
            "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
            "trace_id": f"{span.context.trace_id:032x}" if span.context else None,
            "span_id": f"{span.context.span_id:016x}" if span.context else None,
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "attributes": dict(span.attributes or {}),
        }
        for span in spans.get_finished_spans()
    ]


@app.get("/debug/metrics")
async def recorded_metrics() -> dict[str, list[dict[str, Any]]]:
    """The OpenTelemetry metrics now: name -> data points (attributes and value or count)."""
    found: dict[str, list[dict[str, Any]]] = {}
    data = metric_reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else []:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    found.setdefault(metric.name, []).append(
                        {
                            "attributes": dict(point.attributes or {}),
                            "value": value if value is not None else getattr(point, "count", None),
                        }
                    )
    return found


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
