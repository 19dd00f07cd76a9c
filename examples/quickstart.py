"""A first pool: a transaction, a one-hop call, and existing psycopg2 code.

Run: ``python examples/quickstart.py`` (uses $PGPOOL_DSN, else a throwaway server).
"""

from __future__ import annotations

# --8<-- [start:quickstart]
import anyio

from pgpool_async import AsyncConnectionPool


def legacy_report(raw_conn, month):  # psycopg2 code, unchanged
    with raw_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM notes WHERE to_char(at, 'YYYY-MM') = %s", (month,))
        return cur.fetchone()[0]


async def main(dsn: str) -> None:
    async with AsyncConnectionPool(1, 10, dsn, timeout=5) as pool:
        await pool.execute("CREATE TABLE IF NOT EXISTS notes (body text, at timestamptz DEFAULT now())")
        async with pool.connection() as conn:  # waits up to `timeout` for a connection
            await conn.execute("INSERT INTO notes (body) VALUES (%s)", ("hello",))
            n = await conn.fetchval("SELECT count(*) FROM notes")
        # a clean exit: committed and returned; an exception: rolled back, returned, re-raised
        print("notes:", n)
        n = await pool.fetchval("SELECT count(*) FROM notes")  # borrow, run, commit, return
        async with pool.connection() as conn:  # psycopg2 code runs in a worker thread
            month = await conn.fetchval("SELECT to_char(now(), 'YYYY-MM')")
            print("this month:", await conn.run_sync(legacy_report, month))


# --8<-- [end:quickstart]

if __name__ == "__main__":
    import os

    from pgpool_async.testing.throwaway import ThrowawayPostgres

    if os.environ.get("PGPOOL_DSN"):  # a DSN or libpq keywords, as psycopg2.connect takes
        anyio.run(main, os.environ["PGPOOL_DSN"])
    else:
        with ThrowawayPostgres() as server:
            anyio.run(main, server.dsn)
