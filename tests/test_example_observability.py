"""examples/observability.py through a real uvicorn process and real HTTP: a
request's database statements are spans under the request's span (FastAPI's
instrumentation and Psycopg2Instrumentor on, as an app would have them), the
statements ran on the event loop (io="loop"), and the metrics are exported."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import python_args
from .webserver import serving


@pytest.fixture(scope="module")
def client(dsn: str, pool_io: str | None) -> Iterator[httpx.Client]:
    with (
        serving(sys.executable, python_args(["examples/observability.py"], pool_io), dsn) as (base, _),
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        yield c


def test_a_requests_statements_are_spans_under_its_span(client: httpx.Client, pool_io: str | None) -> None:
    answer = client.get("/orders/3")
    assert answer.status_code == 200, answer.text
    assert answer.json()["total"] == 30 and answer.json()["lines"] == 3
    recorded: list[dict[str, Any]] = client.get("/debug/spans").json()
    servers = [s for s in recorded if s["kind"] == "SERVER" and s["name"] == "GET /orders/{order}"]
    assert len(servers) == 1, [s["name"] for s in recorded]
    request = servers[0]
    in_request = [s for s in recorded if s["trace_id"] == request["trace_id"]]
    db = [s for s in in_request if s["kind"] == "CLIENT"]
    # Exactly the pool's spans (the psycopg2 instrumentation adds none), each a child of the request.
    assert [(s["scope"], s["attributes"]["db.query.text"]) for s in db] == [
        ("pgpool_async", "SELECT %s::int * 10"),
        ("pgpool_async", "SELECT now()::text"),
        ("pgpool_async", "SELECT generate_series(1, %s)"),
        ("pgpool_async", "COMMIT"),
    ]
    for span in db:
        assert span["parent_id"] == request["span_id"], span
        assert span["attributes"]["db.system.name"] == "postgresql"
        assert span["attributes"]["db.operation.name"] in ("SELECT", "COMMIT")
    stats = client.get("/health").json()["pool"]
    if pool_io == "loop":
        assert stats.get("statements_in_threads", 0) == 0, stats  # the instrumented pool stayed on the loop
        assert stats["statements_on_loop"] >= 4


def test_metrics_are_exported(client: httpx.Client) -> None:
    assert client.get("/orders/1").status_code == 200
    found = client.get("/debug/metrics").json()
    for name in (
        "db.client.connection.count",
        "db.client.connection.max",
        "db.client.connection.idle.min",
        "db.client.connection.create_time",
        "db.client.connection.wait_time",
        "db.client.connection.use_time",
        "db.client.operation.duration",
    ):
        assert name in found, sorted(found)
    pools = {p["attributes"].get("db.client.connection.pool.name") for p in found["db.client.connection.max"]}
    assert len(pools) == 1
    scraped = client.get("/metrics/").text
    assert "db_client_connection_count{" in scraped
    assert "pgpool_statements_total{" in scraped
