"""libpq for the loop path, bound once: the C module or ctypes.

The loop-native runner (:mod:`~pgpool_async._loop.native`) calls psycopg2's own
libpq. The per-statement calls go through the C module ``_pqfast`` where it
was built (bound here to the libpq psycopg2 loaded), else through ctypes; which
one is decided once per process, not in the hot methods. Also here: libpq's
enums the runner reads, and whether the path is available at all.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

from .. import _libpq
from . import pgrows, pgstate

__all__ = [
    "CONNECTION_BAD",
    "OK_STATUSES",
    "PGRES_COMMAND_OK",
    "PGRES_COPY_BOTH",
    "PGRES_COPY_IN",
    "PGRES_COPY_OUT",
    "PGRES_EMPTY_QUERY",
    "PGRES_ERRORS",
    "PGRES_TUPLES_OK",
    "PG_DIAG_POSITION",
    "PG_DIAG_SQLSTATE",
    "PQTRANS_IDLE",
    "PQTRANS_INERROR",
    "accelerated",
    "accelerator",
    "loaded",
    "preload",
    "ssl_pending",
    "unavailable_reason",
]

# libpq enums (libpq-fe.h)
CONNECTION_BAD = 1
PGRES_EMPTY_QUERY = 0
PGRES_COMMAND_OK = 1
PGRES_TUPLES_OK = 2
PGRES_COPY_OUT = 3
PGRES_COPY_IN = 4
PGRES_COPY_BOTH = 8
PGRES_ERRORS = (5, 6, 7)  # BAD_RESPONSE, NONFATAL_ERROR, FATAL_ERROR
OK_STATUSES = (PGRES_TUPLES_OK, PGRES_COMMAND_OK)  # a statement's success
PQTRANS_IDLE = 0
PQTRANS_INERROR = 3
PG_DIAG_SQLSTATE = ord("C")
PG_DIAG_POSITION = ord("P")


def preload() -> str | None:
    """Find and load psycopg2's libpq (reads ``/proc/self/maps``: call it in a
    worker thread, or before the loop starts); returns :func:`unavailable_reason`."""
    if _libpq.libpq_gil() is None or _libpq.libpq() is None:
        return _libpq.unavailable_reason() or "psycopg2's libpq was not found"
    pgrows.cell_functions()
    accelerator()
    return None


def unavailable_reason() -> str | None:
    """Why the loop-native path is unavailable in this process, or None if it is.

    The first call loads libpq (file I/O): see :func:`preload`.
    """
    return preload()


def loaded() -> bool:
    """True once libpq was loaded (by :func:`preload`): the loop may use it then."""
    return _libpq.libpq_path.cache_info().currsize > 0


#: Set ``PGPOOL_ASYNC_NO_C=1`` to make the runner's libpq calls through ctypes even
#: where the C module (``_pqfast``) is built: what the tests compare it against.
_USE_C = os.environ.get("PGPOOL_ASYNC_NO_C", "").strip() in ("", "0")


@functools.cache
def accelerator() -> Any:
    """The C module for the per-statement libpq calls, bound to psycopg2's libpq;
    None where it was not built (the calls go through ctypes then, a few times
    slower each) or ``PGPOOL_ASYNC_NO_C`` is set."""
    if not _USE_C:
        return None
    try:
        from . import _pqfast
    except ImportError:
        return None
    lib = _libpq.libpq_gil()
    if lib is None:
        return None
    names = (
        *("PQsendQuery", "PQflush", "PQconsumeInput", "PQisBusy", "PQgetResult", "PQstatus"),
        *("PQresultStatus", "PQclear", "PQntuples", "PQnfields", "PQftype"),
        *("PQgetvalue", "PQgetlength", "PQgetisnull"),
    )
    _pqfast.bind(*(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0 for name in names))
    typecasters = pgstate.typecast_layout()
    if typecasters is not None:
        _pqfast.set_typecast(*typecasters)  # NULL cells reach Python casters, as in psycopg2
    return _pqfast


def accelerated() -> bool:
    """True when the runner's per-statement libpq calls go through the C module
    (after :func:`preload`); False: through ctypes."""
    return accelerator.cache_info().currsize > 0 and accelerator() is not None


def ssl_pending(lib: Any) -> Callable[[int], int]:
    """OpenSSL's SSL_pending from libpq's own dependencies."""
    func = lib.SSL_pending
    func.argtypes = [ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]
