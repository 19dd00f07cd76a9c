"""``python -m benchmarks.telemetry``: what tracing costs a statement.

Four settings on the same server, measured in interleaved rounds (the order
rotates each round), medians over rounds:

- ``off``: ``AsyncConnectionPool(..., telemetry=False)``, no SDK;
- ``api``: the default, with ``opentelemetry-api`` installed and no SDK set up
  (the target: within 2% of ``off``);
- ``sdk-off``: the OpenTelemetry SDK set up as an app would (a tracer provider
  with a ``BatchSpanProcessor`` whose exporter drops the spans, and a meter
  provider with a reader), each operation inside a request span as in a web app,
  the pool with ``telemetry=False``;
- ``sdk``: the same with the pool's telemetry on: a span and a
  ``db.client.operation.duration`` point per statement, wait and use time points
  per checkout. ``sdk`` against ``sdk-off`` is what the pool's telemetry costs.

Workloads, ``--tasks`` concurrent tasks on a pool of ``--size``: ``fetchval``
(``pool.fetchval("SELECT 1")``, one-hop) and ``block`` (``async with
pool.connection()`` and three ``conn.fetchval``, one COMMIT). Prints ops/s and the
cost per statement against ``off``; ``--io`` picks the pools' io (default auto).

``--ops N --setting S --workloads W``: instead, run N operations of W in one task
with setting S, for an instruction count (the README's table)::

    ir() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 | grep Collected; }
    ir python -m benchmarks.telemetry --dsn ... --ops 0 --setting api --workloads fetchval
    ir python -m benchmarks.telemetry --dsn ... --ops 1000 --setting api --workloads fetchval
    # (the difference over 1000: instructions per operation)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pgpool_async import AsyncConnectionPool

from .machine import machine_info
from .run import server
from .traced import sdk

CONFIGS = ("off", "api", "sdk-off", "sdk")
#: statements per operation, for the cost per statement
STATEMENTS = {"fetchval": 1, "block": 4}


async def _fetchval(pool: AsyncConnectionPool) -> None:
    await pool.fetchval("SELECT 1")


async def _block(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.fetchval("SELECT 1")
        await conn.fetchval("SELECT 2")
        await conn.fetchval("SELECT 3")


WORKLOADS: dict[str, Callable[[AsyncConnectionPool], Awaitable[None]]] = {
    "fetchval": _fetchval,
    "block": _block,
}


async def _window(
    pool: AsyncConnectionPool,
    op: Callable[[AsyncConnectionPool], Awaitable[None]],
    tasks: int,
    seconds: float,
    tracer: Any,
) -> float:
    """Operations per second of ``tasks`` tasks running ``op`` for ``seconds``."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            if tracer is None:
                await op(pool)
            else:
                with tracer.start_as_current_span("request"):
                    await op(pool)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return done / (time.perf_counter() - started)


async def measure(dsn: str, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    pools = {
        config: AsyncConnectionPool(
            args.size, args.size, dsn, io=args.io, telemetry=not config.endswith("off"), name=config
        )
        for config in CONFIGS
    }
    results: dict[str, dict[str, list[float]]] = {w: {c: [] for c in CONFIGS} for w in args.workloads}
    for pool in pools.values():
        await pool.open()
    try:
        for round_no in range(args.rounds):
            turn = round_no % len(CONFIGS)
            order = CONFIGS[turn:] + CONFIGS[:turn]
            for workload in args.workloads:
                for config in order:
                    with sdk(config.startswith("sdk")) as (tracer, _, _):
                        await _window(pools[config], WORKLOADS[workload], args.tasks, args.warmup, tracer)
                        rate = await _window(
                            pools[config], WORKLOADS[workload], args.tasks, args.seconds, tracer
                        )
                    results[workload][config].append(rate)
            print(f"round {round_no + 1}/{args.rounds} done", flush=True)
    finally:
        for pool in pools.values():
            await pool.close()
    return results


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    machine = machine_info()
    lines = [
        f"python -m benchmarks.telemetry (rounds={args.rounds}, seconds={args.seconds:g}, "
        f"tasks={args.tasks}, size={args.size}, io={args.io!r}) on {datetime.date.today().isoformat()}",
        f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores; Python {machine['python']}; "
        f"load average at start {machine['loadavg_at_start'][0]:.2f} (other processes share the cores)",
        f"source: commit {machine['source']['commit']}",
        "",
        f"{'workload':9} {'off':>7} {'api':>7} {'api/off':>7} {'sdk-off':>7} {'sdk':>7} {'sdk/sdk-off':>11} "
        f"{'pool us/stmt':>12} {'all us/stmt':>11}",
    ]
    for workload, by_config in results.items():
        med = {c: statistics.median(v) for c, v in by_config.items()}
        pool_cost = (1 / med["sdk"] - 1 / med["sdk-off"]) * 1e6 / STATEMENTS[workload]
        all_cost = (1 / med["sdk"] - 1 / med["off"]) * 1e6 / STATEMENTS[workload]
        lines.append(
            f"{workload:9} {med['off']:7.0f} {med['api']:7.0f} {med['api'] / med['off']:7.3f} "
            f"{med['sdk-off']:7.0f} {med['sdk']:7.0f} {med['sdk'] / med['sdk-off']:11.3f} "
            f"{pool_cost:12.1f} {all_cost:11.1f}"
        )
    lines += [
        "",
        "ops/s; us/stmt: event-loop time per statement (the loop is the bottleneck: 1/ops, over",
        "statements per op); pool: the pool's spans and metrics (sdk against sdk-off); all: the SDK",
        "with the app's request span too (sdk against off)",
    ]
    return "\n".join(lines)


async def count(dsn: str, args: argparse.Namespace) -> None:
    """``--ops``: 50 operations to warm up, then ``args.ops`` of the first workload, one task."""
    op = WORKLOADS[args.workloads[0]]
    with sdk(args.setting.startswith("sdk")) as (tracer, _, _):
        telemetry = not args.setting.endswith("off")
        async with AsyncConnectionPool(1, 1, dsn, io=args.io, telemetry=telemetry) as pool:
            for _ in range(50):
                await op(pool)
            for _ in range(args.ops):
                if tracer is None:
                    await op(pool)
                else:
                    with tracer.start_as_current_span("request"):
                        await op(pool)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.telemetry", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dsn", help="server to use (default $PGPOOL_DSN, else a throwaway server)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--io", default="auto", choices=("auto", "loop", "thread"))
    parser.add_argument("--workloads", default="fetchval,block")
    parser.add_argument("--ops", type=int, help="run this many operations in one task (for callgrind)")
    parser.add_argument("--setting", default="api", choices=CONFIGS, help="with --ops")
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if args.ops is not None:
        with server(args.dsn or os.environ.get("PGPOOL_DSN")) as (dsn, _source):
            asyncio.run(count(dsn, args))
        return
    with server(args.dsn or os.environ.get("PGPOOL_DSN")) as (dsn, _source):
        results = asyncio.run(measure(dsn, args))
    print(report(results, args))


if __name__ == "__main__":
    main()
