"""Micro benchmark of the loop-native statement runner (issue 11).

``SELECT 1`` from 50 asyncio tasks over 10 connections, closed loop, in
interleaved rounds (each round runs every contender once, the order rotated):

- ``native-runner``: :class:`~pgpool_async._loop.native.LoopStatementRunner` on
  psycopg2 connections in autocommit, behind a minimal FIFO pool;
- ``native-runner-tx``: the same without autocommit (BEGIN sent with the
  statement, then COMMIT: two round trips);
- ``pgpool-ac`` / ``pgpool`` / ``pgpool-fetchval``:
  ``AsyncConnectionPool`` with its default ``io`` (``"auto"``: statements on
  the loop), ``connection()`` + ``fetchval`` in autocommit and in the default
  (transaction) mode, and ``pool.fetchval``;
- ``pgpool-ac-thread`` / ``pgpool-thread`` / ``pgpool-fetchval-thread``: the
  same with ``io="thread"`` (one thread hop per statement);
- ``aiopg``: aiopg's pool, the reference.

Prints, per contender: median ops/s over the rounds, the ratio to aiopg's
median, median p99 latency, client CPU µs per operation (process CPU time over
the window / operations) and the loop's longest stall.

    python -m benchmarks.native [--rounds 5] [--seconds 3] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from .contenders import AsyncContender, PoolSpec, by_key
from .drivers import drive_async, percentile
from .run import server

KEYS = (
    "native-runner",
    "native-runner-tx",
    "pgpool-ac",
    "pgpool",
    "pgpool-fetchval",
    "pgpool-ac-thread",
    "pgpool-thread",
    "pgpool-fetchval-thread",
    "aiopg",
)
SQL = "SELECT 1"


async def one_round(
    key: str, dsn: str, tasks: int, size: int, warmup: float, seconds: float
) -> dict[str, Any]:
    contender = by_key(key)()
    assert isinstance(contender, AsyncContender)
    await contender.open(PoolSpec(dsn, size, size))
    try:
        cpu_before = time.process_time()
        samples = await drive_async(lambda: contender.query(SQL), tasks, warmup, seconds)
        cpu = time.process_time() - cpu_before
    finally:
        await contender.close()
    ops = samples.ops
    return {
        "ops_per_sec": samples.ops_per_sec,
        "p99_ms": percentile(samples.latencies, 99) * 1000,
        # CPU over warmup + window, per operation of the window: an upper bound.
        "cpu_us_per_op": cpu / max(ops, 1) * seconds / (warmup + seconds) * 1e6,
        "max_stall_ms": samples.max_gap * 1000,
        "errors": samples.errors,
        "first_error": samples.first_error,
    }


async def main_async(dsn: str, rounds: int, seconds: float, warmup: float, keys: Sequence[str]) -> None:
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for number in range(rounds):
        order = list(keys[number % len(keys) :]) + list(keys[: number % len(keys)])
        for key in order:
            figures = await one_round(key, dsn, 50, 10, warmup, seconds)
            results[key].append(figures)
            print(
                f"round {number + 1} {key:18} {figures['ops_per_sec']:9.0f} ops/s"
                f"  errors {figures['errors']}",
                file=sys.stderr,
                flush=True,
            )
    reference = (
        statistics.median(r["ops_per_sec"] for r in results.get("aiopg", [])) if "aiopg" in results else None
    )
    print(f"SELECT 1, 50 tasks, 10 connections, {rounds} interleaved rounds of {seconds:g} s", end="")
    print(f" (+{warmup:g} s warmup)")
    print(f"{'path':24} {'ops/s':>9} {'vs aiopg':>9} {'p99 ms':>8} {'CPU µs/op':>10} {'stall ms':>9}")
    for key in keys:
        rows = results[key]
        ops = statistics.median(r["ops_per_sec"] for r in rows)
        ratio = f"{ops / reference:.2f}x" if reference else "-"
        p99 = statistics.median(r["p99_ms"] for r in rows)
        cpu = statistics.median(r["cpu_us_per_op"] for r in rows)
        stall = max(r["max_stall_ms"] for r in rows)
        errors = sum(r["errors"] for r in rows)
        extra = f"  ({errors} errors: {rows[0]['first_error']})" if errors else ""
        print(f"{key:24} {ops:9.0f} {ratio:>9} {p99:8.2f} {cpu:10.1f} {stall:9.1f}{extra}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.native", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--dsn", default=None, help="a server to use (default: a throwaway one)")
    parser.add_argument(
        "--only", default="", help="comma-separated keys (default: all of " + ",".join(KEYS) + ")"
    )
    args = parser.parse_args(argv)
    keys = [k for k in args.only.split(",") if k] or list(KEYS)
    with server(args.dsn) as (dsn, _source):
        asyncio.run(main_async(dsn, args.rounds, args.seconds, args.warmup, keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
