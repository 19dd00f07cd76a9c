"""``python -m benchmarks.engine_mixed``: threads and tasks on one ThreadedConnectionPool.

OS threads (``getconn`` / ``SELECT 1`` / ``putconn``) and asyncio tasks (``async with
pool.connection()`` / ``SELECT 1``, through ``AsyncConnectionPool.over``) share one
engine of ``--maxconn`` connections for ``--seconds``. Reported per side: operations,
and the wait for a connection (p50, p99, max), so that starving either side shows.

Over this package's engine, threads wait with ``getconn(timeout=...)`` in the queue the
tasks wait in. psycopg2's pool never waits: its threads retry after 1 ms when
exhausted, as such code does, and their wait counts the retries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from typing import Any

import psycopg2.pool

from pgpool_async import AsyncConnectionPool, ThreadedConnectionPool
from pgpool_async.testing.throwaway import ThrowawayPostgres


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _line(side: str, waits: list[float], seconds: float) -> str:
    ms = [w * 1000 for w in waits]
    return (
        f"  {side:<7} {len(ms) / seconds:>8,.0f} ops/s   wait p50 {_pct(ms, 0.5):7.3f} ms   "
        f"p99 {_pct(ms, 0.99):7.3f} ms   max {max(ms, default=float('nan')):7.3f} ms"
        f"   mean {statistics.fmean(ms) if ms else float('nan'):7.3f} ms"
    )


async def run(dsn: str, kind: str, maxconn: int, threads: int, tasks: int, seconds: float) -> None:
    cls: Any = ThreadedConnectionPool if kind == "pgpool_async" else psycopg2.pool.ThreadedConnectionPool
    engine = await asyncio.to_thread(cls, maxconn, maxconn, dsn)
    thread_waits: list[float] = []
    task_waits: list[float] = []
    stop = time.monotonic() + seconds

    def thread_side() -> None:
        while time.monotonic() < stop:
            asked = time.perf_counter()
            if kind == "pgpool_async":
                conn = engine.getconn(timeout=30)
            else:
                while True:
                    try:
                        conn = engine.getconn()
                        break
                    except psycopg2.pool.PoolError:
                        time.sleep(0.001)
            thread_waits.append(time.perf_counter() - asked)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
                conn.commit()
            finally:
                engine.putconn(conn)

    async with AsyncConnectionPool.over(engine, timeout=30) as pool:

        async def task_side() -> None:
            while time.monotonic() < stop:
                asked = time.perf_counter()
                async with pool.connection() as conn:
                    task_waits.append(time.perf_counter() - asked)
                    await conn.fetchval("SELECT 1")

        workers = [threading.Thread(target=thread_side) for _ in range(threads)]
        for t in workers:
            t.start()
        await asyncio.gather(*(task_side() for _ in range(tasks)))
        for t in workers:
            await asyncio.to_thread(t.join)
    await asyncio.to_thread(engine.closeall)
    print(f"over {kind}'s ThreadedConnectionPool({maxconn}, {maxconn}): {threads} threads, {tasks} tasks")
    print(_line("threads", thread_waits, seconds))
    print(_line("tasks", task_waits, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGPOOL_DSN"))
    parser.add_argument("--maxconn", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    def go(dsn: str) -> None:
        for kind in ("pgpool_async", "psycopg2"):
            asyncio.run(run(dsn, kind, args.maxconn, args.threads, args.tasks, args.seconds))

    if args.dsn:
        go(args.dsn)
    else:
        with ThrowawayPostgres() as server:
            go(server.dsn)


if __name__ == "__main__":
    main()
