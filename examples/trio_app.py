"""The pool under trio: a nursery of transfers, a deadline, and cancellation that never leaks.

Run: ``python examples/trio_app.py`` (needs ``pip install -e '.[trio]'``; uses $PGPOOL_DSN,
else a throwaway server).
"""

from __future__ import annotations

import os
import random

import trio

from pgpool_async import AsyncConnectionPool
from pgpool_async.testing.throwaway import ThrowawayPostgres


# --8<-- [start:main]
async def main(dsn: str) -> None:
    async with AsyncConnectionPool(1, 5, dsn, timeout=5) as pool:
        await pool.execute(
            "DROP TABLE IF EXISTS trio_accounts;"
            "CREATE TABLE trio_accounts (id int PRIMARY KEY, balance int NOT NULL);"
            "INSERT INTO trio_accounts SELECT g, 100 FROM generate_series(1, 10) g"
        )
        rng = random.Random(7)

        async def transfer() -> None:
            src, dst = rng.sample(range(1, 11), 2)
            async with pool.connection() as conn:  # both UPDATEs or neither
                # Rows locked in id order in every transaction: no deadlock between them.
                for account, delta in sorted([(src, -1), (dst, 1)]):
                    await conn.execute(
                        "UPDATE trio_accounts SET balance = balance + %s WHERE id = %s", (delta, account)
                    )

        async with trio.open_nursery() as nursery:  # 200 tasks share 5 connections
            for _ in range(200):
                nursery.start_soon(transfer)
        print("total after 200 transfers:", await pool.fetchval("SELECT sum(balance) FROM trio_accounts"))

        # A deadline cancels a slow query on the server, and the connection comes back clean.
        with trio.move_on_after(0.2) as scope:
            await pool.fetchval("SELECT pg_sleep(10)")
        print("slow query cancelled:", scope.cancelled_caught)
        stats = pool.get_stats()
        print("all connections back:", stats["pool_available"] == stats["pool_size"])


# --8<-- [end:main]

if __name__ == "__main__":
    dsn = os.environ.get("PGPOOL_DSN")
    if dsn:
        trio.run(main, dsn)
    else:
        with ThrowawayPostgres() as server:
            trio.run(main, server.dsn)
