"""What runs in a worker thread: every function here blocks on the network.

Each takes a psycopg2 connection first and touches no pool state, so it can run
on any thread (psycopg2 lets a connection move between threads, one operation
at a time). The event loop never calls these directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
from psycopg2.extensions import connection as PGConnection

from .._loop import failover, native
from .._redact import redacted_connect_error

__all__ = [
    "NO_ROWS_COMMITTED",
    "Params",
    "close_all",
    "close_quietly",
    "cursor_execute",
    "execute",
    "fetchall",
    "fetchone",
    "fetchval",
    "liveness_check",
    "reset_for_reuse",
    "run_and_commit",
]

T = TypeVar("T")
Params = Sequence[Any] | dict[str, Any] | None

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_UNKNOWN = psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN


def close_quietly(conn: PGConnection) -> None:
    """Close ``conn``, ignoring errors: used on connections already given up on."""
    with contextlib.suppress(Exception):
        conn.close()


def close_all(conns: list[PGConnection]) -> None:
    """Close each of ``conns``, ignoring errors."""
    for conn in conns:
        close_quietly(conn)


def reset_for_reuse(conn: PGConnection) -> bool:
    """Roll back an open transaction so ``conn`` can be reused; False if it cannot.

    Does I/O only when the connection is inside a transaction.
    """
    if conn.closed:
        return False
    status = conn.get_transaction_status()
    if status == _STATUS_UNKNOWN:
        return False
    try:
        if conn.status != psycopg2.extensions.STATUS_READY:
            # psycopg2 began a transaction (the server may have ended it already,
            # with a COMMIT sent as SQL): its rollback() makes it ready again, else
            # the next borrower's statements would run without their BEGIN.
            conn.rollback()
        elif status != _STATUS_IDLE:
            # A transaction psycopg2 did not begin (BEGIN sent as SQL in autocommit
            # mode): its rollback() would send nothing.
            with conn.cursor() as cur:
                cur.execute("ROLLBACK")
    except Exception:
        return False
    return conn.get_transaction_status() == _STATUS_IDLE and conn.status == psycopg2.extensions.STATUS_READY


def commit_if_open(conn: PGConnection) -> None:
    """Commit if a transaction is open (psycopg2's ``commit()`` is a no-op otherwise).

    :raises CommitOutcomeUnknown: the connection was lost during the COMMIT.
    """
    if conn.get_transaction_status() != _STATUS_IDLE:
        failover.commit(conn)


#: The one-hop fetch helpers' error for a statement that returns no rows.
NO_ROWS_COMMITTED = (
    "no results to fetch: the statement returned no rows (it ran and was committed, as "
    "pool.fetch* commit); use pool.execute() for statements that return none"
)


def run_and_commit(conn: PGConnection, func: Callable[..., T], *args: Any) -> T:
    """``func(conn, *args)``, then commit if it left a transaction open: one thread hop.

    For the fetch helpers the statement is committed whatever it returned, as
    on the loop path (where ``BEGIN; statement; COMMIT`` leave in one packet),
    then a statement without rows raises ``ProgrammingError``
    (:data:`NO_ROWS_COMMITTED`).

    The pool's statement helpers on a connection with psycopg2's default session
    characteristics and no transaction open send the statement alone, as the loop
    path does: the server runs it as one implicit transaction and commits it as
    it ends (one round trip instead of three; see ``LoopStatementRunner.execute``).
    """
    if func in _STATEMENTS and _implicit_transaction(conn):
        conn.autocommit = True  # (psycopg2 sends nothing for this)
        try:
            # The statement's end commits it: losing the connection meanwhile
            # leaves the outcome unknown (CommitOutcomeUnknown).
            with failover.commit_in_flight(conn):
                return run_and_commit(conn, func, *args)
        finally:
            if not conn.closed:
                conn.autocommit = False
    if func in (fetchone, fetchall, fetchval):
        with conn.cursor() as cur:
            cur.execute(*args)
            has_rows = cur.description is not None
            value = (cur.fetchall() if func is fetchall else cur.fetchone()) if has_rows else None
        commit_if_open(conn)
        if not has_rows:
            raise psycopg2.ProgrammingError(NO_ROWS_COMMITTED)
        if func is fetchval and value is not None:
            # RealDictCursor rows are dicts: take the first column either way.
            value = next(iter(value.values())) if isinstance(value, dict) else value[0]
        return value  # type: ignore[return-value]
    result = func(conn, *args)
    commit_if_open(conn)
    return result


def _implicit_transaction(conn: PGConnection) -> bool:
    """A statement sent alone on ``conn`` now is committed as it ends, as
    ``BEGIN; statement; COMMIT`` would be."""
    return (
        not conn.autocommit
        and native.begin_text(conn) == b"BEGIN"  # (no session characteristics set)
        and conn.status == psycopg2.extensions.STATUS_READY  # (psycopg2's view decides, as on the loop)
    )


def cursor_execute(conn: PGConnection, cur: Any, sql: Any, params: Params) -> None:
    """``cur.execute(sql, params)`` (an AsyncCursor's statement on the thread
    path; on the loop path the result comes back instead, see ``_loan.py``)."""
    cur.execute(sql, params)


def execute(conn: PGConnection, sql: Any, params: Params) -> int:
    """Run one statement; its ``rowcount``."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        rowcount: int = cur.rowcount
        return rowcount


def fetchone(conn: PGConnection, sql: Any, params: Params) -> Any:
    """Run a query; its first row, or None."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def fetchall(conn: PGConnection, sql: Any, params: Params) -> list[Any]:
    """Run a query; all its rows."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def fetchval(conn: PGConnection, sql: Any, params: Params) -> Any:
    """Run a query; the first column of its first row, or None."""
    row = fetchone(conn, sql, params)
    if row is None:
        return None
    # RealDictCursor rows are dicts: take the first column either way.
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


#: The pool's statement helpers (``pool.execute/fetch*`` through :func:`run_and_commit`).
_STATEMENTS = (execute, fetchone, fetchall, fetchval)


def liveness_check(conn: PGConnection) -> None:
    """The built-in check: one round trip (``SELECT 1``), leaving no transaction.

    Raises whatever psycopg2 raises when the connection is dead.
    """
    was_autocommit = conn.autocommit
    if not was_autocommit:
        conn.autocommit = True  # no I/O when idle; avoids a BEGIN/ROLLBACK pair
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        if not was_autocommit and not conn.closed:
            conn.autocommit = False


def outside_transaction(conn: PGConnection, func: Callable[[PGConnection], object]) -> None:
    """Run ``func(conn)`` in autocommit mode, so statements that cannot run in a
    transaction block (``DISCARD ALL``, ``VACUUM``) work; what it does lasts."""
    was_autocommit = conn.autocommit
    if not was_autocommit:
        conn.autocommit = True  # idle: no I/O
    try:
        func(conn)
    finally:
        if not conn.closed:
            commit_if_open(conn)  # func may have turned autocommit off and begun one
            conn.autocommit = was_autocommit


def connect(args: tuple[Any, ...], kwargs: dict[str, Any]) -> PGConnection:
    """``psycopg2.connect(*args, **kwargs)`` whose error never shows a password of
    the arguments (see :func:`pgpool_async._redact.redacted_connect_error`): the
    masked copy is raised outside the ``except``, so the original is not its context."""
    cleaned: psycopg2.Error | None = None
    try:
        conn: PGConnection = psycopg2.connect(*args, **kwargs)
    except psycopg2.Error as exc:
        cleaned = redacted_connect_error(exc, args, kwargs)
        if cleaned is None:
            raise
    if cleaned is not None:
        raise cleaned
    return conn
