"""Deciding that a server can no longer serve the pool, and unknown COMMIT outcomes.

With a multi-host DSN, libpq picks a server that fits ``target_session_attrs`` at
*connect* time only. Afterwards the server can change under an open connection:

- a pool that wants a read-write server (``target_session_attrs=read-write``)
  keeps its connections to an old primary that was *fenced* (kept up, turned
  read-only) while a standby was promoted: every write then fails with
  ``ReadOnlySqlTransaction``. (With ``primary`` libpq itself accepts a fenced
  primary, so only a server that went back into recovery is left.)
- a pool that wants a standby (``standby``, ``prefer-standby``) keeps its
  connections to a standby that was promoted, and reads from the new primary.

:class:`ServerFit` notices both without a round trip: from the error a
statement raised, and from the ``default_transaction_read_only`` and
``in_hot_standby`` parameters PostgreSQL 14+ reports to the client whenever they
change. A connection found unfit is discarded on return, with every idle
connection to the same host (they are as unfit), and connections lent to that
host are discarded when they come back; the pool reconnects and libpq picks the
right host. ``check="read-write"`` / ``check="standby"`` ask the server before
lending, for servers older than 14 or for those who want a check anyway.

A COMMIT that fails because the connection went away may or may not have
committed: :func:`commit` raises :class:`~pgpool_async.errors.CommitOutcomeUnknown`
then. The bookkeeping runs on the event loop; :func:`commit` and the checks run in
worker threads.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2.extensions import connection as PGConnection

from ..errors import CommitOutcomeUnknown, PoolConfigError

__all__ = [
    "ServerFit",
    "commit",
    "commit_sql",
    "named_check",
    "read_write_check",
    "server_of",
    "standby_check",
]

_READ_WRITE = frozenset({"read-write", "primary"})
_JUDGED = frozenset({"read-write", "primary", "standby", "prefer-standby", "read-only"})

Server = tuple[str, str]


def server_of(raw: PGConnection) -> Server | None:
    """``(host, port)`` the connection is connected to (no I/O), or None if closed."""
    try:
        info = raw.info
        return (str(info.host), str(info.port))
    except (psycopg2.Error, AttributeError):
        return None


class ServerFit:
    """Whether a connection's server still fits what the pool asked libpq for.

    Built from the pool's libpq parameters (``target_session_attrs``):

    - ``read-write``: the server must accept writes: not in recovery, and not
      ``default_transaction_read_only`` (a fenced primary fails this);
    - ``primary``: the server must not be in recovery (a fenced primary still is
      one: libpq would reconnect to it, so only a demoted server is left);
    - ``standby``: the server must be in recovery;
    - ``prefer-standby``: a connection made to a standby must leave it once it is
      promoted; one libpq made to a primary as a fallback may stay;
    - ``read-only``: the server must not accept writes;
    - anything else (``any``): nothing is ever judged unfit.
    """

    __slots__ = ("_any_doomed", "_doomed", "_first_seen", "wants")

    def __init__(self, params: dict[str, str]) -> None:
        attrs = params.get("target_session_attrs", "any")
        self.wants = attrs if attrs in _JUDGED else None
        # Lent connections to a server found unfit, judged when they come back.
        self._doomed: weakref.WeakSet[PGConnection] = weakref.WeakSet()
        self._any_doomed = False  # anything was ever added to _doomed
        # in_hot_standby as first seen on each connection (prefer-standby only).
        self._first_seen: weakref.WeakKeyDictionary[PGConnection, str | None] = weakref.WeakKeyDictionary()

    def saw_error(self, raw: PGConnection, exc: BaseException) -> None:
        """A statement on ``raw`` raised ``exc``: remember if it says the server
        no longer accepts writes (not just this transaction, which the caller may
        have made read-only)."""
        if self.wants not in _READ_WRITE or not isinstance(exc, psycopg2.errors.ReadOnlySqlTransaction):
            return
        if raw.closed:
            return
        status = raw.get_parameter_status
        hot_standby, read_only = status("in_hot_standby"), status("default_transaction_read_only")
        if hot_standby is None and read_only is None:
            # A server older than 14 reports neither: the error must be the server's
            # unless this connection asked for read-only itself.
            server_wide = not raw.readonly
        elif self.wants == "primary":
            server_wide = hot_standby == "on"
        else:
            server_wide = hot_standby == "on" or read_only == "on"
        if server_wide:
            self._doomed.add(raw)
            self._any_doomed = True

    def unfit(self, raw: PGConnection) -> bool:
        """On return (no I/O): True when ``raw`` must go because its server changed role."""
        if self._any_doomed and raw in self._doomed:  # (a flag first: the common case is cheap)
            self._doomed.discard(raw)
            return True
        wants = self.wants
        if wants is None or raw.closed:
            return False
        status = raw.get_parameter_status
        # Reported by PostgreSQL 14+ whenever they change (None from older servers).
        hot_standby = status("in_hot_standby")
        if wants == "primary":
            return hot_standby == "on"
        if wants == "standby":
            return hot_standby == "off"
        if wants == "prefer-standby":
            first = self._first_seen.setdefault(raw, hot_standby)
            return first == "on" and hot_standby == "off"
        read_only = status("default_transaction_read_only")
        if wants == "read-write":
            return hot_standby == "on" or read_only == "on"
        return hot_standby == "off" and read_only == "off"  # read-only


# -- checks before lending (worker threads) ------------------------------------------


def _ask(raw: PGConnection, sql: str) -> Any:
    was_autocommit = raw.autocommit
    if not was_autocommit:
        raw.autocommit = True  # no BEGIN/ROLLBACK pair around one query
    try:
        with raw.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            return None if row is None else row[0]
    finally:
        if not was_autocommit and not raw.closed:
            raw.autocommit = False


def read_write_check(raw: PGConnection) -> None:
    """``check="read-write"``: raise unless the server accepts writes (not in
    recovery, not ``default_transaction_read_only``). One round trip."""
    if _ask(raw, "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool"):
        raise psycopg2.errors.ReadOnlySqlTransaction("the server no longer accepts writes")


def standby_check(raw: PGConnection) -> None:
    """``check="standby"``: raise unless the server is in recovery. One round trip."""
    if not _ask(raw, "SELECT pg_is_in_recovery()"):
        raise psycopg2.OperationalError("the server is no longer a standby")


Hook = Callable[[PGConnection], Any]


def named_check(check: bool | str | Hook | None) -> bool | Hook | None:
    """Turn ``check="read-write"``/``"standby"`` into its function; anything else as is.

    :raises PoolConfigError: an unknown name.
    """
    if not isinstance(check, str):
        return check
    checks: dict[str, Hook] = {
        "read-write": read_write_check,
        "standby": standby_check,
    }
    try:
        return checks[check]
    except KeyError:
        raise PoolConfigError(
            f"check must be True, False, None, a callable, 'read-write' or 'standby', got {check!r}"
        ) from None


# -- COMMIT (worker threads) -------------------------------------------------------------


class commit_in_flight:  # (lower case: called like a function, as contextlib.suppress is)
    """``with commit_in_flight(raw):`` around a COMMIT (sent alone or with its
    statements, from a thread or the loop): losing the connection meanwhile raises
    :class:`CommitOutcomeUnknown` (an ``OperationalError``) from psycopg2's error.
    ``when=False``: no COMMIT was in flight after all (autocommit), psycopg2's
    error stands. (A class, not a generator: it is on every commit's path.)"""

    __slots__ = ("raw", "when")

    def __init__(self, raw: PGConnection, when: bool = True) -> None:
        self.raw = raw
        # Closed already (the server ended it earlier): no COMMIT can leave, so
        # psycopg2's error stands (InterfaceError, "connection already closed").
        self.when = when and not raw.closed

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if (
            exc is not None
            and self.when
            and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
            and self.raw.closed
        ):
            raise outcome_unknown(self.raw, exc) from exc


def outcome_unknown(raw: PGConnection, exc: psycopg2.Error) -> CommitOutcomeUnknown:
    """The error for a COMMIT lost with ``raw`` (``exc``: psycopg2's), naming the server."""
    where = server_of(raw)
    err = CommitOutcomeUnknown(
        "the connection was lost during COMMIT: the transaction may or may not have been "
        f"committed ({type(exc).__name__}: {str(exc).strip()}); check on the server, or retry "
        "only if the transaction is idempotent"
        + ("" if where is None else f" (server {where[0]}:{where[1]})")
    )
    return err


def commit(raw: PGConnection) -> None:
    """``raw.commit()``; a COMMIT lost with the connection raises
    :class:`CommitOutcomeUnknown` (an ``OperationalError``) from the original error."""
    with commit_in_flight(raw):
        raw.commit()


def commit_sql(raw: PGConnection, sql: str) -> None:
    """Run an explicit ``COMMIT`` statement (autocommit connections), with the same rule."""
    with commit_in_flight(raw), raw.cursor() as cur:
        cur.execute(sql)
