"""From psycopg2's ThreadedConnectionPool to pgpool_async: the same job, twice.

First the threaded code from psycopg2's documentation (a pool, five threads, getconn /
putconn), then the same job on one event loop: ``async with pool.connection()`` replaces
the try/finally, tasks replace threads, and the psycopg2 connection (``conn.raw``) is the
same object, so your adapters and helpers keep working.

Run: ``python examples/from_psycopg2.py`` (uses $PGPOOL_DSN, else a throwaway server).
"""

from __future__ import annotations

import os
import threading

import anyio
from psycopg2.pool import ThreadedConnectionPool

from pgpool_async import AsyncConnectionPool
from pgpool_async.testing.throwaway import ThrowawayPostgres, run_sql

SETUP = (
    "DROP TABLE IF EXISTS large_table; CREATE TABLE large_table (worker_id int);"
    "INSERT INTO large_table SELECT g % 5 FROM generate_series(1, 1000) g"
)
QUERY = "SELECT COUNT(*) FROM large_table WHERE worker_id = %s"


def threaded(dsn: str) -> dict[int, int]:
    """Before: psycopg2's pool, one OS thread per worker."""
    pool = ThreadedConnectionPool(1, 20, dsn)
    counts: dict[int, int] = {}

    def worker_function(worker_id: int) -> None:
        conn = None
        try:
            conn = pool.getconn()
            cur = conn.cursor()
            cur.execute(QUERY, (worker_id,))
            counts[worker_id] = cur.fetchone()[0]
            cur.close()
        finally:
            if conn:
                pool.putconn(conn)

    threads = [threading.Thread(target=worker_function, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.closeall()
    return counts


async def asynchronous(dsn: str) -> dict[int, int]:
    """After: the same job as tasks on one event loop; no thread of yours blocks."""
    counts: dict[int, int] = {}
    async with AsyncConnectionPool(1, 20, dsn) as pool:

        async def worker_function(worker_id: int) -> None:
            async with pool.connection() as conn:  # returned (and committed) on exit
                counts[worker_id] = await conn.fetchval(QUERY, (worker_id,))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(worker_function, i)
    return counts


def main(dsn: str) -> None:
    run_sql(dsn, SETUP)
    before = threaded(dsn)
    after = anyio.run(asynchronous, dsn)
    for worker_id in sorted(after):
        print(f"Worker {worker_id}: {after[worker_id]} records")
    print("same counts both ways:", before == after)


if __name__ == "__main__":
    dsn = os.environ.get("PGPOOL_DSN")
    if dsn:
        main(dsn)
    else:
        with ThrowawayPostgres() as server:
            main(server.dsn)
