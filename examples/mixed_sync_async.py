"""Threads and tasks on one ThreadedConnectionPool: one budget against the server.

A codebase with a module-level ``psycopg2.pool.ThreadedConnectionPool`` gains
async code in the same process: here, thread workers keep running the legacy
psycopg2 jobs (getconn / cursor / commit / putconn) while an asyncio app runs
its own jobs through ``AsyncConnectionPool.over(engine)``. Both take the
engine's connections: the server never sees more than its ``maxconn``, which
a watcher checks in ``pg_stat_activity`` (by ``application_name``) as they run.

Run: ``python examples/mixed_sync_async.py`` (uses $PGPOOL_DSN, else a throwaway server).
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import anyio
import anyio.to_thread
import psycopg2.pool

from pgpool_async import AsyncConnectionPool
from pgpool_async.testing.throwaway import ThrowawayPostgres, run_sql

MAXCONN = 4
THREADS = 4
TASKS = 8
JOBS = 25  # per worker
SETUP = "DROP TABLE IF EXISTS mixed_jobs; CREATE TABLE mixed_jobs (side text, n int)"


# --8<-- [start:engine]
def make_engine(dsn: str, app_name: str) -> psycopg2.pool.ThreadedConnectionPool:
    """The module-level pool the threaded code already has (it connects: call it in a thread).
    minconn = maxconn: psycopg2's pool closes every connection returned above minconn."""
    return psycopg2.pool.ThreadedConnectionPool(MAXCONN, MAXCONN, dsn, application_name=app_name)


# --8<-- [end:engine]
# --8<-- [start:jobs]
def legacy_job(engine: psycopg2.pool.ThreadedConnectionPool, n: int) -> None:
    """Untouched psycopg2 code, as the WSGI views or Celery tasks have it."""
    while True:
        try:
            conn = engine.getconn()
        except psycopg2.pool.PoolError:  # psycopg2's pool never waits: back off and retry
            time.sleep(0.002)
            continue
        break
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO mixed_jobs VALUES ('thread', %s)", (n,))
            cur.execute("SELECT pg_sleep(0.002)")
        conn.commit()
    finally:
        engine.putconn(conn)


async def async_job(pool: AsyncConnectionPool, n: int) -> None:
    async with pool.connection() as conn:  # waits (FIFO) for any return, a thread's included
        await conn.execute("INSERT INTO mixed_jobs VALUES ('task', %s)", (n,))
        await conn.execute("SELECT pg_sleep(0.002)")


# --8<-- [end:jobs]
def count_backends(dsn: str, app_name: str) -> int:
    rows = run_sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,))
    return int(rows[0][0])


async def main(dsn: str) -> None:
    app_name = f"mixed-{uuid.uuid4().hex[:8]}"
    await anyio.to_thread.run_sync(run_sql, dsn, SETUP)
    engine = await anyio.to_thread.run_sync(make_engine, dsn, app_name)
    seen: list[int] = []
    done = threading.Event()

    def threads_side() -> None:
        def worker(w: int) -> None:
            for i in range(JOBS):
                legacy_job(engine, w * 1000 + i)

        workers = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    async def watch() -> None:
        while not done.is_set():
            seen.append(await anyio.to_thread.run_sync(count_backends, dsn, app_name))
            await anyio.sleep(0.01)

    started = time.monotonic()
    # --8<-- [start:over]
    async with AsyncConnectionPool.over(engine, timeout=30) as pool:  # the engine's connections
        # --8<-- [end:over]
        async with anyio.create_task_group() as watcher:
            watcher.start_soon(watch)
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, threads_side)
                for t in range(TASKS):
                    for i in range(JOBS):
                        tg.start_soon(async_job, pool, t * 1000 + i)
            done.set()
        stats = pool.get_stats()
    elapsed = time.monotonic() - started
    counts = dict(
        await anyio.to_thread.run_sync(run_sql, dsn, "SELECT side, count(*) FROM mixed_jobs GROUP BY side")
    )
    await anyio.to_thread.run_sync(engine.closeall)
    print(f"thread jobs: {counts.get('thread')}, task jobs: {counts.get('task')} in {elapsed:.2f} s")
    print(f"server backends seen at most: {max(seen)} (maxconn {MAXCONN}, {len(seen)} samples)")
    print(f"never above maxconn: {max(seen) <= MAXCONN}")
    print(f"face stats: requests_num={stats['requests_num']} engine_used={stats['engine_used']}")
    assert counts == {"thread": THREADS * JOBS, "task": TASKS * JOBS}, counts
    assert max(seen) <= MAXCONN, seen


if __name__ == "__main__":
    dsn = os.environ.get("PGPOOL_DSN")
    if dsn:
        anyio.run(main, dsn)
    else:
        with ThrowawayPostgres() as server:
            anyio.run(main, server.dsn)
