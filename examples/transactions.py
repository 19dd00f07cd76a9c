"""Transactions and savepoints, cursors, session settings, COPY and LISTEN/NOTIFY.

Run: ``python examples/transactions.py`` (uses $PGPOOL_DSN, else a throwaway server).
"""

from __future__ import annotations

import io
import os
import tempfile

import anyio
import psycopg2.errors

from pgpool_async import AsyncConnectionPool
from pgpool_async.testing.throwaway import ThrowawayPostgres


async def transactions(pool: AsyncConnectionPool) -> None:
    # --8<-- [start:transactions]
    async with pool.connection() as conn, conn.transaction():  # commit on success, rollback on error
        await conn.execute("INSERT INTO docs_t VALUES (1, 'one')")
        try:
            async with conn.transaction():  # nested: a savepoint
                await conn.execute("INSERT INTO docs_t VALUES (1, 'again')")  # a duplicate key
        except psycopg2.errors.UniqueViolation:
            pass  # only the savepoint is rolled back: the outer transaction goes on
        await conn.execute("INSERT INTO docs_t VALUES (2, 'two')")
    # --8<-- [end:transactions]
    print("rows after the savepoint:", await pool.fetchval("SELECT count(*) FROM docs_t"))


async def cursors(pool: AsyncConnectionPool) -> None:
    # --8<-- [start:cursors]
    async with pool.connection() as conn:
        async with conn.cursor() as cur:  # client-side: runs on the loop, fetches need no thread hop
            await cur.execute("SELECT a, b FROM docs_t WHERE a > %s ORDER BY a", (0,))
            first = await cur.fetchone()
            rest = [row async for row in cur]
        async with conn.cursor("big") as cur:  # server-side (named): streams itersize rows per fetch
            await cur.execute("SELECT g FROM generate_series(1, 10000) g")
            total = 0
            async for (g,) in cur:
                total += g
    async with pool.connection() as conn:  # session settings: before the transaction's first statement
        await conn.set_session(isolation_level="SERIALIZABLE", readonly=True)  # reset on return
        count = await conn.fetchval("SELECT count(*) FROM docs_t")
    # --8<-- [end:cursors]
    print("first row:", first, "then", len(rest), "more; sum of 10000:", total, "; read-only count:", count)


async def copy(pool: AsyncConnectionPool, path: str) -> None:
    # --8<-- [start:copy]
    async with pool.connection() as conn:
        await conn.copy_from(io.BytesIO(b"3\tthree\n4\tfour\n"), "docs_t")  # any file-like object
        async with await anyio.open_file(path, "wb") as f:  # or a sync file, or a byte stream
            rows = await conn.copy_expert("COPY docs_t TO STDOUT", f)  # streamed in chunks
    # --8<-- [end:copy]
    print("copied out:", rows, "rows,", (await anyio.Path(path).stat()).st_size, "bytes")


async def listen_notify(pool: AsyncConnectionPool) -> None:
    received: list[str] = []
    ready = anyio.Event()

    async def listener() -> None:
        # --8<-- [start:listen]
        async with pool.connection() as conn:  # autocommit, or outside a transaction
            await conn.listen("jobs")
            ready.set()
            async for n in conn.notifies(timeout=30, stop_after=3):  # waits on the socket: no thread
                received.append(n.payload)  # n.channel, n.payload, n.pid
        # --8<-- [end:listen]

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener)
        await ready.wait()
        for i in range(3):
            # --8<-- [start:notify]
            async with pool.connection() as conn:
                await conn.notify("jobs", f"job {i}")  # delivered when this transaction commits
            # --8<-- [end:notify]
    print("notifications:", received)


async def main(dsn: str) -> None:
    async with AsyncConnectionPool(1, 4, dsn, timeout=10) as pool:
        await pool.execute("DROP TABLE IF EXISTS docs_t; CREATE TABLE docs_t (a int PRIMARY KEY, b text)")
        await transactions(pool)
        await cursors(pool)
        with tempfile.TemporaryDirectory() as tmp:
            await copy(pool, os.path.join(tmp, "dump.tsv"))
        await listen_notify(pool)
        stats = pool.get_stats()
        print("all connections back:", stats["pool_available"] == stats["pool_size"])


if __name__ == "__main__":
    dsn = os.environ.get("PGPOOL_DSN")
    if dsn:
        anyio.run(main, dsn)
    else:
        with ThrowawayPostgres() as server:
            anyio.run(main, server.dsn)
