"""Rules for a pool behind a transaction pooler (``transaction_pooling=True``).

PgBouncer in transaction mode (and PgCat, Odyssey, RDS Proxy, Supavisor) hands
each *transaction* to whichever server connection is free. Anything that outlives
a transaction on the server (a ``SET``, ``LISTEN``, a ``WITH HOLD`` cursor, a
prepared statement) lands on a server connection another client will use next,
and the client that made it never sees it again. So with ``transaction_pooling``
the pool keeps every promise inside a transaction, and refuses, with a
:class:`~pgpool_async.errors.PoolError` that names the reason, what cannot be:

- ``set_session(readonly=..., isolation_level=..., deferrable=...)`` applies per
  transaction (psycopg2 sends ``BEGIN READ ONLY ISOLATION LEVEL ...``); in
  autocommit mode psycopg2 would send ``SET default_transaction_...`` instead,
  so it is refused there.
- ``listen()`` and ``notifies()``: ``LISTEN`` registers on one server session;
  notifications never reach the client.
- ``WITH HOLD`` cursors, and named cursors in autocommit (psycopg2 allows only
  ``WITH HOLD`` ones there): the cursor stays on a server connection the next
  fetch may not get.
- On return the pool sends no standalone statement: the session characteristics
  are reset on the client only, and ``reset=`` (which would run on some other
  client's server connection) is refused when the pool is created.

The checks are bookkeeping on the event loop (no I/O); :func:`reset_in_thread` and
:func:`restore_session` run in a worker thread on the return path.
"""

from __future__ import annotations

from typing import Any

from psycopg2.extensions import connection as PGConnection

from .._thread.blocking import reset_for_reuse
from ..errors import PoolConfigError, TransactionPoolingError

__all__ = [
    "check_cursor",
    "check_listen",
    "check_options",
    "check_set_session",
    "reset_in_thread",
    "restore_session",
]

_CHARACTERISTICS = ("isolation_level", "readonly", "deferrable")
_WHY = "through a transaction pooler (transaction_pooling=True) "
_DIRECT = "use a pool without transaction_pooling, connected to the server directly or in session mode"


def check_options(transaction_pooling: bool, reset: object) -> bool:
    """Validate the pool options; return ``transaction_pooling`` as a bool.

    :raises PoolConfigError: ``reset=`` with ``transaction_pooling``: the hook
        would run outside any transaction, on a server connection that belongs
        to whoever the pooler picks.
    """
    if not isinstance(transaction_pooling, bool):
        raise PoolConfigError(f"transaction_pooling must be True or False, got {transaction_pooling!r}")
    if transaction_pooling and reset is not None:
        raise PoolConfigError(
            "reset= cannot be used with transaction_pooling=True: it would run on whichever "
            "server connection the pooler picks, not on yours; the pooler resets sessions "
            "itself (PgBouncer: server_reset_query in session mode), so drop reset="
        )
    return transaction_pooling


def check_set_session(raw: PGConnection, settings: dict[str, Any]) -> None:
    """Refuse session characteristics that psycopg2 would send as ``SET`` (autocommit).

    :raises TransactionPoolingError: readonly, isolation_level or deferrable
        asked for while the connection is (or is being put) in autocommit.
    """
    asked = [name for name in _CHARACTERISTICS if name in settings]
    autocommit = bool(settings.get("autocommit", raw.autocommit))
    if asked and autocommit:
        raise TransactionPoolingError(
            f"set_session({', '.join(f'{n}=...' for n in asked)}) in autocommit mode would send "
            f"SET default_transaction_... {_WHY}and change the server connection of another "
            "client; set them with autocommit=False (they then apply to each transaction, "
            "BEGIN READ ONLY ISOLATION LEVEL ...), or use 'async with conn.transaction()'"
        )


def check_listen() -> None:
    """:raises TransactionPoolingError: always (LISTEN needs a session)."""
    raise TransactionPoolingError(
        f"LISTEN does not work {_WHY}: the pooler moves the session between server "
        f"connections and notifications never arrive; {_DIRECT}"
    )


def check_cursor(raw: PGConnection, name: str | None, kwargs: dict[str, Any]) -> None:
    """Refuse server-side cursors that would outlive their transaction.

    :raises TransactionPoolingError: ``withhold=True``, or a named cursor on an
        autocommit connection (psycopg2 allows only WITH HOLD ones there).
    """
    if name is None:
        return
    if kwargs.get("withhold"):
        raise TransactionPoolingError(
            f"WITH HOLD cursors do not work {_WHY}: the cursor stays on a server connection "
            'your next fetch may not get ("cursor does not exist", and later DuplicateCursor '
            f"for another client); fetch inside one transaction without withhold, or {_DIRECT}"
        )
    if raw.autocommit:
        raise TransactionPoolingError(
            f"a named cursor outside a transaction does not work {_WHY}: in autocommit it "
            "would have to be WITH HOLD, and each fetch could go to another server "
            "connection; use it with autocommit=False (conn.set_session(autocommit=False)), "
            "where it lives in the loan's transaction"
        )


def restore_session(raw: PGConnection, autocommit: bool) -> None:
    """In a worker thread, on return: put the session characteristics back to their
    defaults *on the client only*.

    psycopg2 keeps them client-side while autocommit is off (they go out with each
    ``BEGIN``) but sends ``SET ... TO DEFAULT`` when it is on; so switch it off
    first (no I/O when idle), reset, then restore the pool's autocommit.
    """
    raw.autocommit = False
    raw.set_session(isolation_level="default", readonly="default", deferrable="default")
    raw.autocommit = autocommit


def reset_in_thread(raw: PGConnection, autocommit: bool, session_changed: bool, listened: bool) -> bool:
    """The return path of a ``transaction_pooling`` pool, in a worker thread: roll
    back an open transaction (inside it, so on the same server connection), reset
    the session characteristics on the client only, and nothing else (no LISTEN
    can have happened, no ``reset`` hook is allowed). True if reusable.
    """
    if not reset_for_reuse(raw):
        return False
    if session_changed:
        restore_session(raw, autocommit)
    return not raw.closed
