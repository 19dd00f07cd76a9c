"""Checking what users pass in, without any I/O.

Every check raises :class:`~pgpool_async.errors.PoolConfigError` (also a
``ValueError``) with a message that names the bad value and the fix, and never
the password.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg2
import psycopg2.extensions

from ._redact import connect_args_error
from .errors import PoolConfigError

__all__ = [
    "check_connect_args",
    "check_seconds",
    "check_sizes",
    "check_timeout",
    "describe_target",
    "with_connect_timeout",
]

#: The pool's ``io`` when none is given (``AsyncConnectionPool(io=None)``).
DEFAULT_IO = "auto"

_CONNECT_ONLY = ("connection_factory", "cursor_factory")


def check_sizes(minconn: int, maxconn: int) -> None:
    """Raise :class:`PoolConfigError` unless ``0 <= minconn <= maxconn`` and ``maxconn >= 1``."""
    for name, value in (("minconn", minconn), ("maxconn", maxconn)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PoolConfigError(f"{name} must be an int, got {value!r}")
    if minconn < 0:
        raise PoolConfigError(f"minconn must be >= 0, got {minconn}")
    if maxconn < 1:
        raise PoolConfigError(f"maxconn must be >= 1, got {maxconn}")
    if minconn > maxconn:
        raise PoolConfigError(
            f"minconn ({minconn}) is greater than maxconn ({maxconn}): pass minconn <= maxconn"
        )


def check_timeout(name: str, value: float) -> float:
    """A positive number of seconds (``math.inf`` allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PoolConfigError(f"{name} must be a number of seconds, got {value!r}")
    if value <= 0:
        raise PoolConfigError(f"{name} must be > 0 seconds (use math.inf to wait forever), got {value}")
    return float(value)


def check_seconds(name: str, value: float | None, allow_zero: bool = False) -> float | None:
    """A number of seconds, or None (disabled)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PoolConfigError(f"{name} must be a number of seconds or None, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise PoolConfigError(f"{name} must be > 0 seconds (or None to disable), got {value}")
    return float(value)


def check_connect_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    """Check, without any I/O, that ``psycopg2.connect(*args, **kwargs)`` is well formed.

    Catches a malformed DSN, an unknown libpq keyword and arguments the pool
    cannot honour, with a :class:`PoolConfigError` that says what to change.
    Returns the libpq parameters they amount to (the password among them).
    """
    if len(args) > 1:
        raise PoolConfigError(
            f"expected at most one positional connection argument (the DSN), got {len(args)}; "
            "pass libpq parameters as keywords"
        )
    if kwargs.get("async") or kwargs.get("async_"):
        raise PoolConfigError(
            "asynchronous psycopg2 connections cannot be pooled here: the pool runs each "
            "connection in worker threads; drop async=True"
        )
    dsn = args[0] if args else kwargs.get("dsn")
    if dsn is not None and not isinstance(dsn, str):
        raise PoolConfigError(f"the DSN must be a str, got {type(dsn).__name__}")
    libpq = {k: v for k, v in kwargs.items() if k not in (*_CONNECT_ONLY, "dsn", "async", "async_")}
    try:
        params: dict[str, str] = psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(dsn, **libpq))
    except (psycopg2.ProgrammingError, UnicodeDecodeError):
        # libpq quotes what it choked on, a password included: never echo it.
        raise PoolConfigError(
            f"invalid connection arguments ({connect_args_error(dsn, libpq)}): fix the DSN or the "
            "libpq keyword arguments given to the pool"
        ) from None
    return params


def with_connect_timeout(kwargs: dict[str, Any], params: dict[str, str], timeout: float) -> dict[str, Any]:
    """libpq waits forever for an unresponsive server: bound each connect attempt
    by the pool timeout unless the user set ``connect_timeout`` themselves."""
    if "connect_timeout" in params:
        return kwargs
    seconds = 2 if math.isinf(timeout) else max(2, math.ceil(timeout))
    return {**kwargs, "connect_timeout": seconds}


def describe_target(params: dict[str, str]) -> str:
    """``database 'db' as user 'u' at host:port`` for messages: never the password."""
    host = params.get("host", "") or "the default host"
    port = params.get("port", "")
    where = f"{host}:{port}" if port else host
    parts = [f"database {params['dbname']!r}" if params.get("dbname") else "the default database"]
    if params.get("user"):
        parts.append(f"as user {params['user']!r}")
    parts.append(f"at {where}")
    return " ".join(parts)
