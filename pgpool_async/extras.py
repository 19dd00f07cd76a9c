"""psycopg2's fast execution helpers, for a pooled connection.

``psycopg2.extras.execute_batch`` and ``execute_values`` take a psycopg2
cursor and call its ``execute`` without awaiting: given an
:class:`~pgpool_async.AsyncCursor` they would create coroutines that never run
(and the block would then raise :class:`~pgpool_async.StatementNotAwaited`).
These are the same functions, run by psycopg2 itself on a cursor of the lent
connection in a worker thread, so their SQL, pages and results are psycopg2's::

    from pgpool_async import extras

    async with pool.connection() as conn:
        await extras.execute_values(conn, "INSERT INTO t (a, b) VALUES %s", rows)

Both run in the connection's transaction (committed when the block ends) and
keep calls on the connection one at a time, like every other call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg2.extras

from .connection import AsyncConnection

__all__ = ["execute_batch", "execute_values"]


async def execute_batch(
    conn: AsyncConnection, sql: str, argslist: Iterable[Any], page_size: int = 100
) -> None:
    """``psycopg2.extras.execute_batch(cur, sql, argslist, page_size)`` on a cursor
    of ``conn``, in a worker thread: ``argslist`` sent ``page_size`` statements per
    round trip.

    :raises ConnectionReleased: ``conn`` went back to the pool.
    :raises psycopg2.Error: what psycopg2 raises (the transaction is then failed:
        roll back, or let the ``connection()`` block do it).
    """
    args = list(argslist)  # (read on the loop: a generator must not run in the thread)

    def run(raw: Any) -> None:
        with raw.cursor() as cur:
            psycopg2.extras.execute_batch(cur, sql, args, page_size=page_size)

    await conn.run_sync(run)


async def execute_values(
    conn: AsyncConnection,
    sql: str,
    argslist: Iterable[Sequence[Any]],
    template: str | None = None,
    page_size: int = 100,
    fetch: bool = False,
) -> list[Any] | None:
    """``psycopg2.extras.execute_values(cur, sql, argslist, template, page_size,
    fetch)`` on a cursor of ``conn``, in a worker thread: one ``VALUES %s`` list
    per ``page_size`` rows. With ``fetch=True`` returns the rows of every page
    (e.g. ``RETURNING id``), else None.

    :raises ConnectionReleased: ``conn`` went back to the pool.
    :raises psycopg2.Error: what psycopg2 raises (the transaction is then failed).
    """
    args = list(argslist)

    def run(raw: Any) -> list[Any] | None:
        with raw.cursor() as cur:
            rows: list[Any] | None = psycopg2.extras.execute_values(
                cur, sql, args, template=template, page_size=page_size, fetch=fetch
            )
            return rows

    return await conn.run_sync(run)
