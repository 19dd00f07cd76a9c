"""pgpool_async: an asyncio- and trio-friendly PostgreSQL pool built on psycopg2.

Two ways to run it, one API (``async with pool.connection() as conn``):

- ``AsyncConnectionPool(minconn, maxconn, dsn)``: the pool opens and keeps its
  own psycopg2 connections; its engine is its ledger (``_loop/ledger.py``), on
  the event loop, with no lock.
- ``AsyncConnectionPool.over(engine)``: an async face over a
  ``ThreadedConnectionPool`` (psycopg2's, this package's, or a subclass) that
  threads keep using: that pool is the engine, and its ``maxconn`` is one budget
  for threads and tasks (``_engine.py``).

Either way, statements run on the event loop through psycopg2's own libpq in
non-blocking mode (``io="auto"``, the default), and every other blocking call in
the pool's own worker threads, so the event loop never stalls::

    async with AsyncConnectionPool(1, 10, dsn, timeout=5) as pool:
        async with pool.connection() as conn:
            n = await conn.fetchval("SELECT count(*) FROM t")

    engine = psycopg2.pool.ThreadedConnectionPool(1, 10, dsn)  # shared with threads
    async with AsyncConnectionPool.over(engine) as pool:
        ...
"""

from __future__ import annotations

from . import _engine  # noqa: F401  (AsyncConnectionPool.over's faces)
from .connection import AsyncConnection
from .cursor import AsyncCursor, Transaction
from .errors import (
    CommitOutcomeUnknown,
    ConnectionReleased,
    PoolClosed,
    PoolConfigError,
    PoolError,
    PoolTimeout,
    StatementNotAwaited,
    TooManyRequests,
    TransactionFailed,
    TransactionPoolingError,
)
from .notifications import Notifies
from .pool import AsyncConnectionPool
from .sync import SimpleConnectionPool, ThreadedConnectionPool

__all__ = [
    "AsyncConnection",
    "CommitOutcomeUnknown",
    "AsyncConnectionPool",
    "AsyncCursor",
    "Notifies",
    "ConnectionReleased",
    "PoolClosed",
    "PoolConfigError",
    "PoolError",
    "PoolTimeout",
    "SimpleConnectionPool",
    "StatementNotAwaited",
    "ThreadedConnectionPool",
    "TooManyRequests",
    "Transaction",
    "TransactionFailed",
    "TransactionPoolingError",
]

__version__ = "0.2.0"
