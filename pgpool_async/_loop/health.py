"""Connection health: checks before lending, set-up and reset hooks, lifetimes.

Everything that talks to the server here runs in a worker thread; the rest is
bookkeeping done on the event loop.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from typing import Any

from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extensions import connection as PGConnection

from ..errors import PoolConfigError
from ..sync import reset_for_reuse

__all__ = ["ConnInfo", "Health", "liveness_check"]

Hook = Callable[[PGConnection], Any]


def liveness_check(raw: PGConnection) -> None:
    """The built-in check: one round trip (``SELECT 1``), leaving no transaction.

    Raises whatever psycopg2 raises when the connection is dead.
    """
    was_autocommit = raw.autocommit
    if not was_autocommit:
        raw.autocommit = True  # no I/O when idle; avoids a BEGIN/ROLLBACK pair
    try:
        with raw.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        if not was_autocommit and not raw.closed:
            raw.autocommit = False


def _check_seconds(name: str, value: float | None, allow_zero: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PoolConfigError(f"{name} must be a number of seconds or None, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise PoolConfigError(f"{name} must be > 0 seconds (or None to disable), got {value}")
    return float(value)


@dataclasses.dataclass(slots=True)
class ConnInfo:
    """What the pool remembers of one open connection."""

    expires_at: float  # monotonic time after which it is replaced
    generation: int  # drain() retires every connection of an older generation
    idle_since: float | None = None  # when it last went idle


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
        idle = _check_seconds("check_idle", check_idle, allow_zero=True)
        assert idle is not None
        return cls(
            check=hook,
            check_idle=idle,
            configure=configure,
            reset=reset,
            max_lifetime=_check_seconds("max_lifetime", max_lifetime),
            max_idle=_check_seconds("max_idle", max_idle),
        )

    def new_info(self, generation: int) -> ConnInfo:
        """Bookkeeping for a new connection. Lifetimes get up to 10% jitter, so
        connections opened together do not all expire together."""
        if self.max_lifetime is None:
            expires = math.inf
        else:
            expires = time.monotonic() + self.max_lifetime * random.uniform(0.9, 1.0)
        return ConnInfo(expires, generation)

    def check_due(self, idle_since: float | None) -> bool:
        """Whether a connection idle since ``idle_since`` must be checked first."""
        if self.check is None or idle_since is None:
            return False
        return time.monotonic() - idle_since >= self.check_idle

    # -- in worker threads ----------------------------------------------------

    def run_check(self, raw: PGConnection) -> bool:
        """Run the check; False if it raised or broke the connection."""
        assert self.check is not None
        try:
            self.check(raw)
        except Exception:
            return False
        return reset_for_reuse(raw)

    def set_up(self, raw: PGConnection, autocommit: bool) -> None:
        """Prepare a new connection: autocommit, then ``configure`` (committed)."""
        if autocommit:
            raw.autocommit = True
        if self.configure is not None:
            self.configure(raw)
            if raw.get_transaction_status() != TRANSACTION_STATUS_IDLE:
                raw.commit()

    def reset_returned(self, raw: PGConnection) -> bool:
        """Roll back, then the user's ``reset``; False if the connection must go."""
        if not reset_for_reuse(raw):
            return False
        if self.reset is None:
            return True
        try:
            self.reset(raw)
            if raw.get_transaction_status() != TRANSACTION_STATUS_IDLE:
                raw.commit()  # what reset() did must last, like configure()
        except Exception:
            return False
        return not raw.closed
