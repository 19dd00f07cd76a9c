"""LISTEN/NOTIFY on a lent connection: notifications are awaited on the event loop.

Waiting costs no thread and no polling loop: the iterator sleeps until the
connection's socket is readable (:func:`anyio.wait_readable`, on asyncio and
trio), then lets psycopg2 consume what arrived with ``connection.poll()``, which
never blocks (libpq's socket is non-blocking), and hands out the
``psycopg2.extensions.Notify`` objects it collected in ``connection.notifies``.

Rules that follow from PostgreSQL and from "one operation at a time":

- PostgreSQL delivers notifications to a session only **between transactions**.
  Listen on a connection in autocommit mode, or commit before waiting: waiting
  inside an open transaction raises :class:`~pgpool_async.errors.PoolError`
  instead of hanging.
- While :class:`Notifies` waits, it holds the connection: other calls on it
  (from other tasks) wait until the next notification is handed out or the
  iteration ends. Between notifications (in the body of ``async for``) the
  connection is free, so the body may run queries on it.
- ``LISTEN`` stays in effect when the connection goes back to the pool: run
  ``await conn.unlisten()`` (``UNLISTEN *``) before returning it, or return it
  with ``putconn(conn, close=True)``.
- Channel names are used verbatim (case-sensitive, quoted), like ``pg_notify``.
"""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import psycopg2
import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extensions import Notify
from psycopg2.extensions import connection as PGConnection

from ._loan import Loan
from .errors import PoolClosed, PoolError

__all__ = ["Notifies", "listen", "notify", "unlisten"]

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


class Notifies:
    """``async for n in conn.notifies(timeout=None, stop_after=None)``: the
    connection's notifications, in arrival order, as ``psycopg2.extensions.Notify``
    (``channel``, ``payload``, ``pid``).

    - ``timeout``: stop iterating after this many seconds without a
      notification (None: wait forever).
    - ``stop_after``: stop after this many notifications (None: no limit).

    Notifications that arrived earlier (while a query ran, for instance) come
    first. Each notification is handed out once, even if several iterators
    share the connection. Cancelling a waiting iteration leaves the connection
    usable and loses no notification.

    :raises ValueError: (at creation) ``timeout`` is not > 0 or ``stop_after`` is negative.
    :raises ConnectionReleased: the connection went back to the pool.
    :raises PoolError: waiting inside an open transaction (nothing would arrive).
    :raises psycopg2.OperationalError: the server closed the connection.
    """

    __slots__ = ("_conn", "_done", "_received", "_stop_after", "_timeout")

    def __init__(self, conn: Loan, timeout: float | None = None, stop_after: int | None = None):
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or math.isnan(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"timeout must be a number of seconds > 0, or None, got {timeout!r}")
        if stop_after is not None and (
            isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0
        ):
            raise ValueError(f"stop_after must be an int >= 0, or None, got {stop_after!r}")
        conn.check()  # raises ConnectionReleased now rather than at the first wait
        self._conn = conn
        self._timeout = timeout
        self._stop_after = stop_after
        self._received = 0
        self._done = False

    def __aiter__(self) -> Notifies:
        return self

    async def __anext__(self) -> Notify:
        if self._done or (self._stop_after is not None and self._received >= self._stop_after):
            self._done = True
            raise StopAsyncIteration
        conn = self._conn
        deadline = math.inf if self._timeout is None else anyio.current_time() + self._timeout
        notification: Notify | None = None
        with anyio.CancelScope(deadline=deadline):
            await anyio.lowlevel.checkpoint()  # a flood of notifications still lets others run
            conn.check()
            async with conn.turn:
                await conn.leave_loop()  # psycopg2 reads the socket from here
                notification = await _next_notification(conn.raw)
        # No checkpoint between taking the notification and returning it: a
        # timeout or a cancellation can't lose it.
        if notification is None:  # timed out
            self._done = True
            raise StopAsyncIteration
        self._received += 1
        return notification


async def _next_notification(raw: PGConnection) -> Notify:
    """The next notification; waits for the socket on the loop. Holds the connection's lock."""
    fd = raw.fileno()
    while True:
        raw.poll()  # reads what the socket has, without waiting; raises if the server hung up
        if raw.notifies:
            return raw.notifies.pop(0)
        if raw.get_transaction_status() != _STATUS_IDLE:
            raise PoolError(
                "notifications are delivered only between transactions: commit() or "
                "rollback() before waiting for them, or use an autocommit connection"
            )
        try:
            await anyio.wait_readable(fd)
        except anyio.ClosedResourceError:
            # The pool closed the connection under us (close()/closeall()).
            raise PoolClosed("connection pool is closed: the pool closed this connection") from None


def _check_channel(channel: object) -> str:
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, got {type(channel).__name__}")
    if not channel:
        raise ValueError("channel must not be empty")
    return channel


def _run_now(
    raw: PGConnection, query: sql.Composable | str, params: tuple[str, ...] | None, commit: bool
) -> None:
    """In a worker thread: run ``query`` and commit unless autocommit (or inside
    a ``transaction()`` block, which commits at its end)."""
    with raw.cursor() as cur:
        cur.execute(query, params)
    if commit and not raw.autocommit:
        raw.commit()


async def listen(conn: Loan, channel: str) -> None:
    """``LISTEN channel``, in effect at once: commits unless the connection is in
    autocommit mode (the open transaction, if any, is committed with it) or
    inside ``conn.transaction()`` (then it takes effect when that block commits).

    :raises TypeError: ``channel`` is not a str.
    :raises ValueError: ``channel`` is empty.
    """
    query = sql.SQL("LISTEN {}").format(sql.Identifier(_check_channel(channel)))
    conn.listened = True  # the pool unlistens when the connection comes back
    await conn.call_user(_run_now, query, None, conn.tx_depth == 0)


async def unlisten(conn: Loan, channel: str | None = None) -> None:
    """``UNLISTEN channel``, or ``UNLISTEN *`` with no channel; commits like :func:`listen`.

    :raises TypeError: ``channel`` is given but is not a str.
    :raises ValueError: ``channel`` is empty.
    """
    if channel is None:
        query: sql.Composable = sql.SQL("UNLISTEN *")
    else:
        query = sql.SQL("UNLISTEN {}").format(sql.Identifier(_check_channel(channel)))
    await conn.call_user(_run_now, query, None, conn.tx_depth == 0)


async def notify(conn: Loan, channel: str, payload: str = "") -> None:
    """``SELECT pg_notify(channel, payload)``; sent at once: commits like :func:`listen`
    (PostgreSQL sends notifications when the transaction commits).

    :raises TypeError: ``channel`` or ``payload`` is not a str.
    :raises ValueError: ``channel`` is empty.
    :raises psycopg2.errors.InvalidParameterValue: the payload is too long (8000 bytes by default).
    """
    if not isinstance(payload, str):
        raise TypeError(f"payload must be a str, got {type(payload).__name__}")
    await conn.call_user(
        _run_now, "SELECT pg_notify(%s, %s)", (_check_channel(channel), payload), conn.tx_depth == 0
    )
