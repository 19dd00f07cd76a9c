"""The basics: a pool, a transaction, waiting, and what happens on errors.

Run: ``python examples/basic.py`` (uses $PGPOOL_DSN, else a throwaway server).
"""

from __future__ import annotations

import os

import anyio

from pgpool_async import AsyncConnectionPool, PoolTimeout
from pgpool_async.testing.throwaway import ThrowawayPostgres


# --8<-- [start:main]
async def main(dsn: str) -> None:
    async with AsyncConnectionPool(1, 10, dsn, timeout=5) as pool:
        await pool.execute("DROP TABLE IF EXISTS example_t; CREATE TABLE example_t (x int)")

        # Clean exit: committed and returned.
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO example_t VALUES (%s)", (1,))
            n = await conn.fetchval("SELECT count(*) FROM example_t")
        print("rows after commit:", n)

        # An exception: rolled back, returned, re-raised.
        try:
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO example_t VALUES (%s)", (2,))
                raise RuntimeError("something went wrong")
        except RuntimeError:
            pass
        print("rows after rollback:", await pool.fetchval("SELECT count(*) FROM example_t"))

        # Plain psycopg2 code runs unchanged in a worker thread.
        def legacy(raw_conn, table):  # type: ignore[no-untyped-def]
            with raw_conn.cursor() as cur:
                cur.execute(f"SELECT x FROM {table} ORDER BY x")
                return [x for (x,) in cur.fetchall()]

        async with pool.connection() as conn:
            print("legacy code says:", await conn.run_sync(legacy, "example_t"))

        # Twenty tasks share the pool; when all ten connections are busy, the rest wait.
        async def worker(i: int) -> None:
            await pool.execute("INSERT INTO example_t VALUES (%s)", (100 + i,))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(worker, i)
        print("rows after 20 workers:", await pool.fetchval("SELECT count(*) FROM example_t"))

        # A full pool makes a request wait up to its timeout, then PoolTimeout.
        held = [await pool.getconn() for _ in range(pool.maxconn)]
        try:
            await pool.getconn(timeout=0.1)
        except PoolTimeout as exc:
            print("as expected:", exc)
        for conn in held:
            await pool.putconn(conn)
        print(pool)


# --8<-- [end:main]

if __name__ == "__main__":
    dsn = os.environ.get("PGPOOL_DSN")
    if dsn:
        anyio.run(main, dsn)
    else:
        with ThrowawayPostgres() as server:
            anyio.run(main, server.dsn)
