"""Past one server: throughput behind PgBouncer, and failover timings, next to psycopg_pool.

``python -m benchmarks.scaleout`` (about 2.5 min) starts a throwaway server, a
PgBouncer in transaction mode and one in session mode (each with 20 server
connections), and a primary + synchronous standby pair, then prints a markdown
table (``--output FILE`` writes it too). Needs the ``bench`` extra and ``pgbouncer``.

1. **Throughput**: 4 processes, each one pool of ``maxconn=4`` and 16 tasks doing
   ``async with pool.connection() as c: SELECT 1`` (a transaction per loan), for
   ``--seconds``; operations per second summed over the processes. Direct to the
   server, through PgBouncer in transaction mode (``transaction_pooling=True``;
   psycopg with ``prepare_threshold=None``, which PgBouncer 1.18 requires) and in
   session mode.
2. **Crash + promote**: 8 writers on a ``target_session_attrs=read-write``
   multi-host DSN; the primary stops (``-m immediate``), the standby is promoted.
3. **Fencing**: the primary turns read-only (sessions kept) and the standby is
   promoted (asynchronous standby here: a commit waiting for a synchronous standby
   that gets promoted would wait forever on the old primary). For both: errors,
   and the time from promotion to the first write acknowledged by the new
   primary (or "not within" the window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

_TASKS = 16
_MAXCONN = 4
_PROCESSES = 4
_WINDOW_AFTER = 3.0  # seconds of load after a promotion


# -- one worker process -----------------------------------------------------------------------


async def _pgpool_worker(dsn: str, seconds: float, start_at: float, tp: bool) -> dict[str, Any]:
    from pgpool_async import AsyncConnectionPool

    async with AsyncConnectionPool(_MAXCONN, _MAXCONN, dsn, timeout=10, transaction_pooling=tp) as pool:

        async def op() -> None:
            async with pool.connection() as conn:
                await conn.fetchval("SELECT 1")

        return await _closed_loop(op, seconds, start_at)


async def _psycopg_worker(dsn: str, seconds: float, start_at: float, tp: bool) -> dict[str, Any]:
    from psycopg_pool import AsyncConnectionPool

    kwargs = {"prepare_threshold": None} if tp else {}
    async with AsyncConnectionPool(
        dsn, min_size=_MAXCONN, max_size=_MAXCONN, kwargs=kwargs, timeout=10, open=False
    ) as pool:

        async def op() -> None:
            async with pool.connection() as conn:
                await (await conn.execute("SELECT 1")).fetchone()

        return await _closed_loop(op, seconds, start_at)


async def _closed_loop(op: Callable[[], Awaitable[None]], seconds: float, start_at: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start_at - time.time()))  # processes start together
    end = time.monotonic() + seconds
    counts = {"ops": 0, "errors": 0}

    async def task() -> None:
        while time.monotonic() < end:
            try:
                await op()
            except Exception:
                counts["errors"] += 1
                await asyncio.sleep(0.01)
            else:
                if time.monotonic() <= end:
                    counts["ops"] += 1

    await asyncio.gather(*(task() for _ in range(_TASKS)))
    return counts


def _worker_main(args: argparse.Namespace) -> None:
    worker = _pgpool_worker if args.worker == "pgpool" else _psycopg_worker
    result = asyncio.run(worker(args.dsn, args.seconds, args.start_at, args.tp))
    print(json.dumps(result))


def _throughput(contender: str, dsn: str, seconds: float, tp: bool) -> tuple[float, int]:
    start_at = time.time() + 1.5  # time for every process to import and open its pool
    argv = [sys.executable, "-m", "benchmarks.scaleout", "--worker", contender, "--dsn", dsn]
    argv += ["--seconds", str(seconds), "--start-at", str(start_at)] + (["--tp"] if tp else [])
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(_PROCESSES)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    return sum(r["ops"] for r in results) / seconds, sum(r["errors"] for r in results)


# -- failover ----------------------------------------------------------------------------------


class _Writers:
    def __init__(self) -> None:
        self.events: list[tuple[float, float, str | None, int | None]] = []
        self.stop = False

    async def run(self, write: Callable[[int], Awaitable[int]], tasks: int) -> None:
        async def task(index: int) -> None:
            n = 0
            while not self.stop:
                n += 1
                started = time.monotonic()
                try:
                    port: int | None = await write(index * 10_000_000 + n)
                    error = None
                except Exception as exc:
                    port, error = None, type(exc).__name__
                    await asyncio.sleep(0.01)
                self.events.append((started, time.monotonic(), error, port))

        await asyncio.gather(*(task(i) for i in range(tasks)))


async def _failover(contender: str, scenario: str) -> dict[str, Any]:
    from pgpool_async.testing.standby import PrimaryStandby
    from pgpool_async.testing.throwaway import run_sql

    # Fencing with a synchronous standby can hang a commit forever on the old primary
    # (it waits for a standby that was promoted): not the pool's doing, so asynchronous.
    pair = PrimaryStandby(synchronous=scenario == "crash")
    await asyncio.to_thread(pair.start)
    try:
        assert pair.standby is not None
        await asyncio.to_thread(run_sql, pair.primary.dsn, "CREATE TABLE acked (id bigint PRIMARY KEY)")
        dsn = pair.multi_host_dsn("read-write")
        sql = "INSERT INTO acked VALUES (%s) RETURNING inet_server_port()"
        writers = _Writers()
        marks: dict[str, float] = {}

        async def drive(write: Callable[[int], Awaitable[int]]) -> None:
            load = asyncio.ensure_future(writers.run(write, 8))
            await asyncio.sleep(0.5)
            marks["fault"] = time.monotonic()
            if scenario == "crash":
                await asyncio.to_thread(pair.crash_primary)
            else:
                await asyncio.to_thread(pair.fence_primary)
            marks["promoted"] = await asyncio.to_thread(pair.promote)
            await asyncio.sleep(_WINDOW_AFTER)
            writers.stop = True
            await asyncio.wait_for(load, 30)

        if contender == "pgpool":
            from pgpool_async import AsyncConnectionPool

            async with AsyncConnectionPool(2, 8, dsn, timeout=5) as pool:

                async def write(ident: int) -> int:
                    return int(await pool.fetchval(sql, (ident,)))

                await drive(write)
        else:
            from psycopg_pool import AsyncConnectionPool as PsycopgPool

            async with PsycopgPool(dsn, min_size=2, max_size=8, timeout=5, open=False) as ppool:

                async def write(ident: int) -> int:
                    async with ppool.connection() as conn:
                        row = await (await conn.execute(sql, (ident,))).fetchone()
                        assert row is not None
                        return int(row[0])

                await drive(write)
        new_port = pair.standby.port
        resumed = [e[1] for e in writers.events if e[3] == new_port]
        errors = [e for e in writers.events if e[2] is not None]
        late_errors = [e for e in errors if e[0] >= marks["promoted"] + 1.0]
        acked = {e for e in writers.events if e[2] is None}
        return {
            "errors": len(errors),
            "errors_1s_after_promotion": len(late_errors),
            "resumed_after_promotion": (min(resumed) - marks["promoted"]) if resumed else None,
            "acked": len(acked),
        }
    finally:
        await asyncio.to_thread(pair.destroy)


# -- the report ----------------------------------------------------------------------------------


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output")
    parser.add_argument("--worker", choices=["pgpool", "psycopg_pool"], help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker_main(args)
        return

    from pgpool_async.testing.pgbouncer import ThrowawayPgBouncer
    from pgpool_async.testing.throwaway import ThrowawayPostgres

    # The pools log each failed reconnect during a failover: not what the table is about.
    logging.getLogger("pgpool_async").setLevel(logging.ERROR)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

    lines = [
        f"Throughput, {_PROCESSES} processes x {_TASKS} tasks, pool of {_MAXCONN} each, "
        f"`SELECT 1` in a transaction, {args.seconds:.0f} s; median of {args.rounds} rounds "
        f"(ops/s; errors); load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "| target | pgpool_async | psycopg_pool | pgpool / psycopg_pool |",
        "| --- | ---: | ---: | ---: |",
    ]
    with (
        ThrowawayPostgres() as pg,
        ThrowawayPgBouncer(pg.port, pool_mode="transaction", pool_size=20) as tx,
        ThrowawayPgBouncer(pg.port, pool_mode="session", pool_size=20) as session,
    ):
        for label, dsn, tp in (
            ("direct", pg.dsn, False),
            ("PgBouncer, transaction mode", tx.dsn, True),
            ("PgBouncer, session mode", session.dsn, False),
        ):
            # Rounds alternate the contenders: other processes share the machine.
            runs: dict[str, list[tuple[float, int]]] = {"pgpool": [], "psycopg_pool": []}
            for round_ in range(args.rounds):
                order = ["pgpool", "psycopg_pool"][:: 1 if round_ % 2 == 0 else -1]
                for contender in order:
                    runs[contender].append(_throughput(contender, dsn, args.seconds, tp))
            ours = statistics.median(r[0] for r in runs["pgpool"])
            our_errors = sum(r[1] for r in runs["pgpool"])
            theirs = statistics.median(r[0] for r in runs["psycopg_pool"])
            their_errors = sum(r[1] for r in runs["psycopg_pool"])
            lines.append(
                f"| {label} | {ours:,.0f}; {our_errors} | {theirs:,.0f}; {their_errors} | "
                f"{ours / theirs:.2f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "Failover, 8 writers on `target_session_attrs=read-write` (primary + standby, "
        "synchronous for the crash), "
        f"{_WINDOW_AFTER:.0f} s after the promotion",
        "",
        "| scenario | pool | errors | errors started > 1 s after promotion | "
        "first write on the new primary, after promotion |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for scenario, label in (("crash", "crash + promote"), ("fence", "fenced primary + promote")):
        for contender in ("pgpool", "psycopg_pool"):
            result = asyncio.run(_failover(contender, scenario))
            resumed = result["resumed_after_promotion"]
            if resumed is None:
                when = f"not within {_WINDOW_AFTER:.0f} s"
            elif resumed <= 0:  # promotion is done a little before `pg_ctl promote -w` returns
                when = f"{resumed:.2f} s (before pg_ctl promote returned)"
            else:
                when = f"{resumed:.2f} s"
            lines.append(
                f"| {label} | {contender} | {result['errors']:,} | "
                f"{result['errors_1s_after_promotion']:,} | {when} |"
            )
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(report)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _main()
