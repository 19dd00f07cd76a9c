"""Connection health: the policy (checks, hooks, lifetimes) and its upkeep.

The policy is decided here; what talks to the server runs in a worker thread
(the ``*_in_thread`` methods); the rest (liveness peeks, lifetimes, logging)
runs on the event loop and never blocks.

A hook that fails (``check``, ``configure``, ``reset``, ``reconnect_failed``)
is logged at WARNING, at most once per :data:`HOOK_LOG_INTERVAL` seconds per
hook with a count of the failures in between, and the connection it ran on is
discarded: a hook that always fails never floods the log, and the pool's
backoff keeps it from reconnecting back to back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extensions import connection as PGConnection

from .._config import check_seconds
from .._thread.blocking import commit_if_open, liveness_check, outside_transaction, reset_for_reuse
from ..errors import PoolConfigError

__all__ = ["HOOK_LOG_INTERVAL", "Health", "HookFailed", "HookLog", "looks_alive"]

Hook = Callable[[PGConnection], Any]
HOOK_LOG_INTERVAL = 10.0
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


class HookFailed(Exception):
    """A user hook raised: ``hook`` names it, ``__cause__`` is what it raised."""

    def __init__(self, hook: str) -> None:
        super().__init__(f"the {hook} hook failed")
        self.hook = hook


def looks_alive(conn: PGConnection, runner: Any = None) -> bool:
    """Tell, without a round trip and without blocking, whether an idle
    connection still looks alive.

    A closed connection is not. An idle connection's socket has nothing to read
    unless the server sent something: a NOTIFY or notice (fine), or the error and
    EOF it sends when the backend is terminated or the server shuts down. When
    the loop-native ``runner`` watches the socket and has seen nothing arrive
    (``runner.quiet``), that is known without a system call.
    """
    if conn.closed:
        return False
    if runner is not None and runner.quiet:
        return True
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if readable and _server_hung_up(conn):
            return False
    except (psycopg2.Error, OSError, ValueError):
        return False
    return conn.get_transaction_status() == _STATUS_IDLE


def _server_hung_up(conn: PGConnection) -> bool:
    sock = socket.socket(fileno=conn.fileno())
    try:
        # libpq keeps its socket non-blocking already: this only tells Python so.
        sock.setblocking(False)
        # A few messages at most: e.g. a WARNING notice before the FATAL error and
        # EOF of an immediate shutdown. Bounded, so a chatty LISTEN cannot spin here.
        for _ in range(8):
            try:
                first = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return False  # all consumed: nothing but notices and notifications
            # EOF, or an ErrorResponse while idle: always FATAL (terminated, shut down).
            if first in (b"", b"E"):
                return True
            conn.poll()  # a NOTIFY, notice or parameter status: let libpq consume it
            if conn.closed:
                return True
        return False
    finally:
        sock.detach()


class HookLog:
    """Rate-limited WARNINGs for failing hooks (one logger per pool)."""

    def __init__(self, logger: logging.Logger, pool_name: str, interval: float = HOOK_LOG_INTERVAL) -> None:
        self._logger = logger
        self._pool_name = pool_name
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def failed(self, hook: str, error: BaseException) -> None:
        """Log that ``hook`` raised ``error`` (with its traceback), unless it was
        logged less than ``interval`` seconds ago: then count it for next time."""
        now = time.monotonic()
        last = self._last.get(hook)
        if last is not None and now - last < self._interval:
            self._suppressed[hook] = self._suppressed.get(hook, 0) + 1
            return
        self._last[hook] = now
        more = self._suppressed.pop(hook, 0)
        also = f" ({more} more failure(s) since the last report)" if more else ""
        self._logger.warning(
            "pool %r: the %s hook failed: %s: %s%s; the connection was discarded",
            self._pool_name,
            hook,
            type(error).__name__,
            str(error).strip(),
            also,
            exc_info=error,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """The pool's health policy; see :class:`~pgpool_async.AsyncConnectionPool`."""

    check: Hook | None
    check_idle: float
    configure: Hook | None
    reset: Hook | None
    max_lifetime: float | None
    max_idle: float | None

    @classmethod
    def build(
        cls,
        check: bool | Hook | None,
        check_idle: float,
        configure: Hook | None,
        reset: Hook | None,
        max_lifetime: float | None,
        max_idle: float | None,
    ) -> Health:
        """Validate the pool's health options; :class:`PoolConfigError` names the bad one."""
        if check is True:
            hook: Hook | None = liveness_check
        elif check is None or check is False:
            hook = None
        elif callable(check):
            hook = check
        else:
            raise PoolConfigError(f"check must be True, False, None or a callable, got {check!r}")
        for name, fn in (("configure", configure), ("reset", reset)):
            if fn is not None and not callable(fn):
                raise PoolConfigError(f"{name} must be a callable taking the connection, got {fn!r}")
        idle = check_seconds("check_idle", check_idle, allow_zero=True)
        assert idle is not None
        return cls(
            check=hook,
            check_idle=idle,
            configure=configure,
            reset=reset,
            max_lifetime=check_seconds("max_lifetime", max_lifetime),
            max_idle=check_seconds("max_idle", max_idle),
        )

    def expires_at(self) -> float:
        """When a connection opened now is to be replaced. Lifetimes get up to
        10% jitter, so connections opened together do not all expire together."""
        if self.max_lifetime is None:
            return math.inf
        return time.monotonic() + self.max_lifetime * random.uniform(0.9, 1.0)

    def check_due(self, idle_since: float) -> bool:
        """Whether a connection idle since ``idle_since`` must be checked first."""
        return self.check is not None and time.monotonic() - idle_since >= self.check_idle

    def idle_too_long(self, idle_since: float, now: float) -> bool:
        return self.max_idle is not None and now - idle_since >= self.max_idle

    # -- in worker threads ----------------------------------------------------

    def check_in_thread(self, raw: PGConnection) -> BaseException | None:
        """Run the check; the reason it failed, or None."""
        assert self.check is not None
        try:
            self.check(raw)
        except BaseException as exc:  # in a worker thread: no cancellation arrives here
            return exc
        if not reset_for_reuse(raw):
            return psycopg2.InterfaceError("the connection was left unusable by the check")
        return None

    def set_up_in_thread(self, raw: PGConnection, autocommit: bool) -> None:
        """Prepare a new connection: autocommit, then ``configure`` (committed).

        :raises HookFailed: ``configure`` raised (the cause attached).
        """
        if autocommit:
            raw.autocommit = True
        if self.configure is not None:
            try:
                self.configure(raw)
                commit_if_open(raw)
            except BaseException as exc:  # in a worker thread: no cancellation arrives here
                raise HookFailed("configure") from exc

    def reset_in_thread(
        self, raw: PGConnection, autocommit: bool, session_changed: bool, listened: bool
    ) -> BaseException | bool:
        """Make a returned connection clean for the next borrower, in one thread hop:
        roll back, undo ``set_session``, ``UNLISTEN *``, then the user's ``reset``
        (outside any transaction, so ``DISCARD ALL`` works; what it does lasts).

        True if the connection can be reused; False if it is broken; the
        :class:`HookFailed` if ``reset`` raised.
        """
        if not reset_for_reuse(raw):
            return False
        try:
            if session_changed:
                raw.set_session(
                    isolation_level="default", readonly="default", deferrable="default", autocommit=autocommit
                )
            if listened:
                with raw.cursor() as cur:
                    cur.execute(sql.SQL("UNLISTEN *"))
                commit_if_open(raw)
                del raw.notifies[:]
        except psycopg2.Error:
            return False
        if self.reset is not None:
            try:
                outside_transaction(raw, self.reset)
            except BaseException as exc:  # in a worker thread: no cancellation arrives here
                failed = HookFailed("reset")
                failed.__cause__ = exc
                return failed
        return not raw.closed and raw.get_transaction_status() == _STATUS_IDLE
