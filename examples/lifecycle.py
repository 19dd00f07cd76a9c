"""A pool's life: health checks and hooks, resizing, draining, closing; timeouts and
cancellation; telling a connection that can never work from one that may.

Run: ``python examples/lifecycle.py`` (uses $PGPOOL_DSN, else a throwaway server).
"""

from __future__ import annotations

import logging
import os
import time

import anyio
import psycopg2
import psycopg2.errors

from pgpool_async import AsyncConnectionPool
from pgpool_async.errors import is_permanent_connect_error
from pgpool_async.testing.throwaway import ThrowawayPostgres

log = logging.getLogger("example")


# --8<-- [start:hooks]
def set_search_path(raw):  # each new connection; committed
    with raw.cursor() as cur:
        cur.execute("SET search_path TO public")


def reset_session(raw):  # each return, after the rollback, outside a transaction
    with raw.cursor() as cur:
        cur.execute("RESET ALL")


async def alert(pool):  # refilling minconn keeps failing
    log.error("pool %s cannot reconnect", pool.name)


def make_pool(dsn: str) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        2,
        20,
        dsn,
        check=True,  # or fn(raw_conn), "read-write", "standby": validate connections idle >= check_idle s
        configure=set_search_path,
        reset=reset_session,
        max_lifetime=3600,  # replaced after ~1 h (up to 10% earlier, at random)
        max_idle=600,  # idle connections above minconn closed after 10 min
        reconnect_timeout=300,
        reconnect_failed=alert,
        leak_threshold=30,  # warn (logger "pgpool_async") with where a connection was taken
    )


# --8<-- [end:hooks]


async def lifecycle(dsn: str) -> None:
    # --8<-- [start:lifecycle]
    pool = make_pool(dsn)  # no I/O yet
    await pool.open()  # opens minconn connections, retrying with backoff up to `timeout`
    await pool.resize(4, 40)  # new sizes, at once
    await pool.drain()  # replace every connection gracefully (password rotation)
    await pool.close(timeout=10)  # waiters get PoolClosed; lent ones get 10 s to come back
    # --8<-- [end:lifecycle]
    print("sizes after resize:", pool.minconn, pool.maxconn, "closed:", pool.closed)


async def timeouts(dsn: str) -> None:
    async with AsyncConnectionPool(1, 2, dsn, timeout=5) as pool:
        started = time.monotonic()
        # --8<-- [start:cancel]
        with anyio.move_on_after(0.2):  # or anyio.fail_after, asyncio.wait_for, task.cancel()
            await pool.fetchval("SELECT pg_sleep(10)")  # cancelled on the server too
        # --8<-- [end:cancel]
        print(f"slow query given up after {time.monotonic() - started:.1f} s")
        stats = pool.get_stats()
        print("connection back, clean:", stats["pool_available"] == stats["pool_size"])

    # --8<-- [start:statement_timeout]
    async with AsyncConnectionPool(1, 2, dsn, options="-c statement_timeout=100") as pool:
        try:
            await pool.fetchval("SELECT pg_sleep(1)")
        except psycopg2.errors.QueryCanceled as exc:
            print("server-side limit:", str(exc).strip())
    # --8<-- [end:statement_timeout]


async def permanent(dsn: str) -> None:
    # --8<-- [start:permanent]
    pool = AsyncConnectionPool(1, 2, dsn, dbname="no_such_database", timeout=30)
    started = time.monotonic()
    try:
        await pool.open()  # fails at once: retrying cannot create the database
    except psycopg2.OperationalError as exc:
        print("permanent:", is_permanent_connect_error(exc), f"after {time.monotonic() - started:.1f} s")
    # --8<-- [end:permanent]


async def main(dsn: str) -> None:
    await lifecycle(dsn)
    await timeouts(dsn)
    await permanent(dsn)


if __name__ == "__main__":
    dsn = os.environ.get("PGPOOL_DSN")
    if dsn:
        anyio.run(main, dsn)
    else:
        with ThrowawayPostgres() as server:
            anyio.run(main, server.dsn)
