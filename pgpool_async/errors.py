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
          ├── TransactionFailed    a block ended normally on a transaction that had failed:
          │                        rolled back, nothing committed
          ├── StatementNotAwaited  a block ended with a statement coroutine never awaited:
          │                        rolled back, nothing committed
          └── CommitOutcomeUnknown the connection was lost during COMMIT (also an
                                   OperationalError, what psycopg2 raised before)
"""

from __future__ import annotations

import re

import psycopg2
from psycopg2.pool import PoolError

__all__ = [
    "CommitOutcomeUnknown",
    "ConnectionReleased",
    "PoolClosed",
    "PoolConfigError",
    "PoolError",
    "PoolTimeout",
    "StatementNotAwaited",
    "TooManyRequests",
    "TransactionFailed",
    "TransactionPoolingError",
    "is_permanent_connect_error",
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


class TransactionFailed(PoolError):
    """A ``connection()`` or ``transaction()`` block ended normally (or
    ``commit()`` was called) while its transaction had failed: an error was
    caught and the code went on. PostgreSQL turns the COMMIT of a failed
    transaction into a ROLLBACK, so every write of the transaction is gone; this
    error says so instead of a silent success. The message names the first
    error of the loan, and ``pgcode`` is its SQLSTATE (None when it had none).
    Catch errors inside a nested ``transaction()`` block (a savepoint) to go on
    after them.
    """

    def __init__(self, message: str, pgcode: str | None = None) -> None:
        super().__init__(message)
        # (psycopg2.Error's pgcode is read-only; its pickling hook sets it)
        self.__setstate__({"pgerror": None, "pgcode": pgcode})  # type: ignore[no-untyped-call]


class StatementNotAwaited(PoolError):
    """A ``connection()`` or ``transaction()`` block ended while a statement
    coroutine made on its connection (``conn.execute(...)``,
    ``cursor.execute(...)``, ...) was never awaited: the statement never ran, so
    the block is rolled back instead of committed without it. The message names
    the call. Typical cause: passing an :class:`~pgpool_async.AsyncCursor` to
    ``psycopg2.extras.execute_batch``; use :mod:`pgpool_async.extras`.
    """


# invalid_catalog_name (unknown database), invalid_authorization_specification (unknown
# role, no pg_hba.conf entry), invalid_password.
_PERMANENT_SQLSTATES = frozenset({"3D000", "28000", "28P01"})

# psycopg2 gives no SQLSTATE for errors raised while connecting: libpq's and the server's
# (English) messages are all there is. A message in another language is not recognised,
# and the error is then treated as transient (retried until the timeout): safe, only slower.
_PERMANENT_MESSAGES = re.compile(
    r"""
    FATAL:\s+database\ ".*"\ does\ not\ exist
    | FATAL:\s+role\ ".*"\ does\ not\ exist
    | FATAL:\s+password\ authentication\ failed
    | FATAL:\s+no\ pg_hba\.conf\ entry
    | FATAL:\s+\w+\ authentication\ failed\ for\ user
    | fe_sendauth:\ no\ password\ supplied
    | ^invalid\ (dsn|connection\ option|integer\ value|port\ number|\w+\ value)
    | ^missing\ "="\ after
    | unterminated\ quoted\ string\ in\ connection\ info
    | ^invalid\ URI
    """,
    re.VERBOSE | re.MULTILINE,
)


def is_permanent_connect_error(exc: BaseException) -> bool:
    """True if ``exc``, raised by ``psycopg2.connect``, cannot heal by retrying.

    Permanent: an unknown database (SQLSTATE 3D000), an unknown role or a
    rejected client (28000), a failed password or none supplied (28P01), a DSN
    libpq cannot parse (a bad keyword, port ``"54x2"``, a malformed URI). A pool
    should fail at once on these, with the server's message, instead of
    retrying until its timeout.

    Transient (False): a refused or timed-out connection, a server starting up
    or shutting down, too many connections, a host name that does not resolve
    (DNS may come back), anything not from psycopg2, and any message this
    function does not recognise (it reads libpq's English messages; psycopg2
    sets no SQLSTATE on connection errors).
    """
    if not isinstance(exc, psycopg2.Error) or isinstance(exc, PoolError):
        return False
    if exc.pgcode is not None:
        return exc.pgcode in _PERMANENT_SQLSTATES
    return bool(_PERMANENT_MESSAGES.search(str(exc)))
