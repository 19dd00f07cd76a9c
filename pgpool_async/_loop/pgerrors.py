"""psycopg2's errors, made on the loop path from a libpq result.

The loop-native runner reads results itself; what it raises must be what
psycopg2's ``pq_raise`` would: the same class for each SQLSTATE (psycopg2's
``errors.lookup``, else its fallback by class, ``error_type.c``), the message
without its severity, ``pgerror`` and ``pgcode``, and ``diag`` reading the
libpq result the exception owns (a checked write into psycopg2's
``errorObject``, see :func:`_pgres_offset`).
"""

from __future__ import annotations

import ctypes
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

__all__ = ["decode", "exception_class", "hand_result", "make_error"]

_PG_DIAG_SQLSTATE = ord("C")  # (libpq-fe.h)


def _base_exception(sqlstate: str) -> type[psycopg2.Error]:
    """psycopg2's fallback class for an SQLSTATE it has no class for (error_type.c)."""
    c0, c1 = sqlstate[:1], sqlstate[1:2]
    table: dict[str, dict[str, type[psycopg2.Error]]] = {
        "0": {"8": psycopg2.OperationalError, "A": psycopg2.NotSupportedError},
        "2": {
            "0": psycopg2.ProgrammingError,
            "1": psycopg2.ProgrammingError,
            "2": psycopg2.DataError,
            "3": psycopg2.IntegrityError,
            "4": psycopg2.InternalError,
            "5": psycopg2.InternalError,
            "6": psycopg2.OperationalError,
            "7": psycopg2.OperationalError,
            "8": psycopg2.OperationalError,
            "B": psycopg2.InternalError,
            "D": psycopg2.InternalError,
            "F": psycopg2.InternalError,
        },
        "3": {
            "4": psycopg2.OperationalError,
            "8": psycopg2.InternalError,
            "9": psycopg2.InternalError,
            "B": psycopg2.InternalError,
            "D": psycopg2.ProgrammingError,
            "F": psycopg2.ProgrammingError,
        },
        "4": {
            "0": psycopg2.extensions.TransactionRollbackError,
            "2": psycopg2.ProgrammingError,
            "4": psycopg2.ProgrammingError,
        },
    }
    if c0 == "5":
        return psycopg2.extensions.QueryCanceledError if sqlstate == "57014" else psycopg2.OperationalError
    if c0 in ("F", "P", "X"):
        return psycopg2.InternalError
    if c0 == "H":
        return psycopg2.OperationalError
    return table.get(c0, {}).get(c1, psycopg2.DatabaseError)


def exception_class(sqlstate: str) -> type[psycopg2.Error]:
    try:
        cls: type[psycopg2.Error] = psycopg2.errors.lookup(sqlstate)
    except KeyError:
        return _base_exception(sqlstate)
    return cls


def _pgres_offset() -> int | None:
    """Where psycopg2's ``errorObject`` keeps its ``PGresult *`` (what ``diag`` reads).

    The struct (psycopg/error.h) is a ``PyBaseExceptionObject`` followed by five
    pointers: pgerror, pgcode, cursor, pydecoder, pgres. The layout is checked on
    a live object (the first two pointers must be the attributes just set)
    before anything is written; None when it does not hold (then ``diag`` stays
    empty on this path).
    """
    ptr = ctypes.sizeof(ctypes.c_void_p)
    base = Exception.__basicsize__
    if psycopg2.Error.__basicsize__ != base + 5 * ptr:
        return None
    probe = psycopg2.Error("probe")
    pgerror, pgcode = "probe-pgerror", "probe-pgcode"
    probe.__setstate__({"pgerror": pgerror, "pgcode": pgcode})  # type: ignore[no-untyped-call]
    at = id(probe)
    if (
        ctypes.c_void_p.from_address(at + base).value != id(probe.pgerror)
        or ctypes.c_void_p.from_address(at + base + ptr).value != id(probe.pgcode)
        or ctypes.c_void_p.from_address(at + base + 4 * ptr).value is not None
    ):
        return None
    return base + 4 * ptr


_PGRES_OFFSET = _pgres_offset()


def _strip_severity(message: str) -> str:
    if len(message) > 8 and message[:8] in ("ERROR:  ", "FATAL:  ", "PANIC:  "):
        return message[8:]
    return message


def decode(raw: bytes | None, codec: str) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        return raw.decode(codec, "replace")


def make_error(
    lib: Any, pg: int | None, res: int | None, connection_lost: bool, codec: str
) -> psycopg2.Error:
    """The exception psycopg2's ``pq_raise`` would build for this result (``res``:
    the failed PGresult, or None: then libpq's connection message says why).
    ``connection_lost``: the class for a message without SQLSTATE is
    ``OperationalError``, else ``DatabaseError``, as psycopg2 chooses. The
    result stays the caller's: see :func:`hand_result`."""
    code: bytes | None = None
    message: bytes | None = None
    if res is not None:
        message = lib.PQresultErrorMessage(res)
        code = lib.PQresultErrorField(res, _PG_DIAG_SQLSTATE)
    if not message:
        message = lib.PQerrorMessage(pg) if pg is not None else None
    if not message:
        return psycopg2.DatabaseError("error with no message from the libpq")
    text = decode(message, codec) or ""
    sqlstate = decode(code, codec)
    cls: type[psycopg2.Error]
    if sqlstate:
        cls = exception_class(sqlstate)
    else:
        cls = psycopg2.OperationalError if connection_lost else psycopg2.DatabaseError
    exc = cls(_strip_severity(text))
    exc.__setstate__({"pgerror": text, "pgcode": sqlstate})  # type: ignore[no-untyped-call]
    return exc


def hand_result(exc: psycopg2.Error, res: int) -> bool:
    """Give the PGresult ``res`` to ``exc``, as psycopg2's exceptions own theirs:
    its ``diag`` reads the fields, and it PQclears it when collected. False
    (``res`` stays the caller's, ``diag`` empty) where psycopg2's layout is not
    the one :func:`_pgres_offset` knows."""
    if _PGRES_OFFSET is None:
        return False
    ctypes.c_void_p.from_address(id(exc) + _PGRES_OFFSET).value = res
    return True
