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
          └── ConnectionReleased   a connection used after it went back to the pool
"""

from __future__ import annotations

from psycopg2.pool import PoolError

__all__ = [
    "ConnectionReleased",
    "PoolClosed",
    "PoolConfigError",
    "PoolError",
    "PoolTimeout",
    "TooManyRequests",
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
