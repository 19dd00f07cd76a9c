"""``python -m benchmarks.run --traced``: the realistic workloads with the OpenTelemetry
SDK, each contender traced by its own instrumentation (a one-round smoke run). The test
extra installs the peers and their instrumentations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import traced
from benchmarks.contenders import by_key

ROOT = Path(__file__).resolve().parent.parent
TRACED = ("pgpool", "pgpool-ac", "pgpool-fetchval", "asyncpg", "psycopg_pool", "aiopg")


def _run(dsn: str, json_path: Path, *extra: str) -> dict[str, object]:
    args = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--dsn",
        dsn,
        "--workloads",
        "realistic",
        "--rounds",
        "1",
        "--seconds",
        "0.2",
        "--json",
        str(json_path),
        *extra,
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    document: dict[str, object] = json.loads(json_path.read_text(encoding="utf-8"))
    return document


@pytest.mark.single_io("runs the benchmark in a child process with the default io")
def test_traced_run_each_contender_makes_its_own_spans(dsn: str, tmp_path: Path) -> None:
    document = _run(dsn, tmp_path / "traced.json", "--traced", "--only", ",".join(TRACED))
    rounds = document["rounds"]
    assert isinstance(rounds, dict)
    for work in ("row_by_key", "rows_100", "write_tx"):
        for key in TRACED:
            if work not in by_key(key).realistic:
                continue
            (figures,) = rounds[work][key]
            assert "error" not in figures and not figures.get("errors"), (work, key, figures)
            # At least one database span per operation measured (warmup ones count too).
            assert figures["db_spans"] >= figures["ops"] > 0, (work, key, figures)
    text = (tmp_path / "traced.txt").read_text(encoding="utf-8")
    assert "traced" in text
    assert "asyncpg: opentelemetry.instrumentation.asyncpg" in text
    assert "pgpool: pgpool_async's own spans" in text


@pytest.mark.single_io("runs the benchmark in a child process with the default io")
def test_untraced_run_has_no_spans(dsn: str, tmp_path: Path) -> None:
    document = _run(dsn, tmp_path / "plain.json", "--only", "pgpool,asyncpg")
    rounds = document["rounds"]
    assert isinstance(rounds, dict)
    for work in ("row_by_key", "rows_100", "write_tx"):
        for key in ("pgpool", "asyncpg"):
            (figures,) = rounds[work][key]
            assert figures["ops"] > 0 and "db_spans" not in figures, (work, key, figures)


@pytest.mark.single_io("no pool")
def test_traced_requires_realistic_workloads() -> None:
    from benchmarks.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--traced", "--workloads", "select1"])
    assert parse_args(["--traced", "--workloads", "realistic"]).traced


@pytest.mark.single_io("no pool")
def test_instrumentation_is_on_for_its_contender_only() -> None:
    """An instrumentor patches classes globally: it is undone after its contender's rounds."""
    import asyncpg
    import psycopg

    fetch, connect = asyncpg.Connection.fetch, psycopg.AsyncConnection.connect
    with traced.sdk(True, metrics=False) as (tracer, exporter, provider):
        assert exporter is not None
        tracing = traced.Tracing(tracer, exporter, provider)
        with tracing.instrumented(by_key("asyncpg")):
            assert asyncpg.Connection.fetch is not fetch
            assert psycopg.AsyncConnection.connect == connect
        assert asyncpg.Connection.fetch is fetch
        with tracing.instrumented(by_key("pgpool")):  # its own spans: nothing patched
            assert asyncpg.Connection.fetch is fetch
            assert psycopg.AsyncConnection.connect == connect
    from opentelemetry import trace

    assert trace._TRACER_PROVIDER is None  # type: ignore[attr-defined]
