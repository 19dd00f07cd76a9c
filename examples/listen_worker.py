"""A job queue: producers INSERT and NOTIFY, a worker LISTENs and takes jobs as they come.

The worker waits on its connection's socket (no thread, no polling) and takes jobs with
``FOR UPDATE SKIP LOCKED``, so more workers could share the queue.

Run: ``python examples/listen_worker.py`` (uses $PGPOOL_DSN, else a throwaway server).
"""

from __future__ import annotations

import os

import anyio

from pgpool_async import AsyncConnectionPool
from pgpool_async.testing.throwaway import ThrowawayPostgres

JOBS = 20


async def worker(pool: AsyncConnectionPool, done: list[str]) -> None:
    async with pool.connection() as listener:
        await listener.listen("jobs")
        async for _ in listener.notifies(timeout=30):
            # Take what is there (the notification only says "look"), each job in its own transaction.
            while True:
                async with pool.connection() as conn:
                    row = await conn.fetchone(
                        "DELETE FROM jobs WHERE id = (SELECT id FROM jobs ORDER BY id "
                        "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING payload"
                    )
                if row is None:
                    break
                done.append(row[0])
            if len(done) == JOBS:
                return


async def producer(pool: AsyncConnectionPool) -> None:
    for i in range(JOBS):
        async with pool.connection() as conn:  # the NOTIFY is delivered at COMMIT, with the row
            await conn.execute("INSERT INTO jobs (payload) VALUES (%s)", (f"job-{i}",))
            await conn.notify("jobs")
        await anyio.sleep(0.005)


async def main(dsn: str) -> None:
    async with AsyncConnectionPool(2, 4, dsn, timeout=5) as pool:
        await pool.execute(
            "DROP TABLE IF EXISTS jobs; CREATE TABLE jobs (id serial PRIMARY KEY, payload text)"
        )
        done: list[str] = []
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker, pool, done)
                await anyio.sleep(0.1)  # the worker is listening
                tg.start_soon(producer, pool)
        print(f"processed {len(done)} jobs, in order: {done == [f'job-{i}' for i in range(JOBS)]}")
        print("queue empty:", await pool.fetchval("SELECT count(*) FROM jobs") == 0)


if __name__ == "__main__":
    dsn = os.environ.get("PGPOOL_DSN")
    if dsn:
        anyio.run(main, dsn)
    else:
        with ThrowawayPostgres() as server:
            anyio.run(main, server.dsn)
