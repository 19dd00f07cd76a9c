"""The pool's exceptions.

Every error the pool raises about itself is a :class:`PoolError`, and
:class:`PoolError` *is* ``psycopg2.pool.PoolError``: code written for psycopg2's
pools (``except PoolError``) keeps catching everything raised here. Errors that
come from the database itself stay psycopg2's own (``OperationalError``, ...).

The hierarchy::

    psycopg2.Error
     └── PoolError                 (psycopg2.pool.PoolError)
          ├── PoolTimeout          no connection within the timeout
          ├── PoolClosed           the pool is closed, or closing
          ├── TooManyRequests      the waiting queue is full (``max_waiting``)
          ├── PoolConfigError      bad arguments to a pool (also a ValueError)
          ├── ConnectionReleased   a connection used after it went back to the pool
          ├── TransactionPoolingError  a session feature asked of a transaction_pooling pool
          └── CommitOutcomeUnknown the connection was lost during COMMIT (also an
                                   OperationalError, what psycopg2 raised before)
"""

from __future__ import annotations

import psycopg2
from psycopg2.pool import PoolError

__all__ = [
    "CommitOutcomeUnknown",
    "ConnectionReleased",
    "PoolClosed",
    "PoolConfigError",
    "PoolError",
    "PoolTimeout",
    "TooManyRequests",
    "TransactionPoolingError",
]


class PoolTimeout(PoolError):
    """No connection could be handed out within the timeout.

    The message says how long the caller waited. When the pool failed to open
    connections meanwhile, ``__cause__`` is the last connection error.
    """


class PoolClosed(PoolError):
    """The pool is closed (or closing) and hands out no connections.

    The message keeps psycopg2's words, "connection pool is closed".
    """


class TooManyRequests(PoolError):
    """The queue of waiting requests is full (see ``max_waiting``); raised at once."""


class PoolConfigError(PoolError, ValueError):
    """A pool was given arguments it cannot work with; the message names the fix.

    It is also a :class:`ValueError`, so generic argument checks catch it too.
    """


class ConnectionReleased(PoolError):
    """A connection was used, or returned, after it had gone back to its pool."""


class CommitOutcomeUnknown(PoolError, psycopg2.OperationalError):
    """The connection was lost while COMMIT was in flight: the transaction may or
    may not have been committed.

    It is also a ``psycopg2.OperationalError`` (what psycopg2 raises for a lost
    connection), so existing handlers keep catching it; ``__cause__`` is
    psycopg2's error. Check on the server, or retry only an idempotent transaction.
    """


class TransactionPoolingError(PoolError):
    """A pool with ``transaction_pooling=True`` was asked for something that would
    outlive the transaction on the server (LISTEN, a WITH HOLD cursor, a session
    SET); the message says why and what to do instead."""
