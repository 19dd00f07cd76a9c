"""pgpool_async: an asyncio- and trio-friendly PostgreSQL pool built on psycopg2.

psycopg2's ``ThreadedConnectionPool`` is the engine; statements run on the event
loop through psycopg2's own libpq in non-blocking mode (``io="auto"``, the
default), and every other blocking call in the pool's own worker threads, so the
event loop never stalls::

    async with AsyncConnectionPool(1, 10, dsn, timeout=5) as pool:
        async with pool.connection() as conn:
            n = await conn.fetchval("SELECT count(*) FROM t")
"""

from __future__ import annotations

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
