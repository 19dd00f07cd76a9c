"""psycopg2's rows, made on the loop path from a libpq result.

What a statement returned (:class:`Result`), its ``description`` as psycopg2
builds it (``pqpath.c``, ``_make_column``), and its rows converted as psycopg2
converts them: each column's typecaster looked up when the statement ends
(cursor, connection, then the global registry: :func:`casts`), called for the
rows fetched only, NULL cells included where a caster takes them
(:func:`~pgpool_async._loop.pgstate.null_caster`). The C module does the same
walk where it was built (``fast``); ctypes otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg2.extensions as ext

from .. import _libpq
from . import pgstate
from .pgerrors import decode

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PGConnection
    from psycopg2.extensions import cursor as PGCursor

__all__ = [
    "SLICE_ROWS",
    "Result",
    "RowsResult",
    "casts",
    "cell_functions",
    "convert_rows",
    "describe",
    "fallback",
]

#: Rows converted between two looks at the clock during a large result.
SLICE_ROWS = 256


class Result:
    """What one statement returned, as a psycopg2 cursor would show it.

    ``rows``: tuples (empty for a statement that returns none), ``rowcount``,
    ``statusmessage``, ``lastrowid`` (the OID of an inserted row, else 0),
    ``query`` (for a cursor's statement: the text sent, as psycopg2's ``cursor.query``),
    ``returns_rows`` (psycopg2's ``description is not None``) and
    ``description`` (a tuple of psycopg2 ``Column`` objects, or None), built on
    first access from the libpq result this object keeps (and frees with itself).
    """

    __slots__ = (
        "_codec",
        "_description",
        "_res",
        "lastrowid",
        "query",
        "returns_rows",
        "rowcount",
        "rows",
        "statusmessage",
    )

    def __init__(
        self,
        rows: list[tuple[Any, ...]],
        rowcount: int,
        statusmessage: str | None,
        lastrowid: int,
        res: int | None,
        codec: str = "utf-8",
    ) -> None:
        self.rows = rows
        self.rowcount = rowcount
        self.statusmessage = statusmessage
        self.lastrowid = lastrowid
        self.returns_rows = res is not None
        self.query: bytes | None = None  # set for a cursor's statement (psycopg2's cursor.query)
        # Owned until description is built from it (a PGresult outlives its connection).
        self._res = res
        self._codec = codec
        self._description: tuple[ext.Column, ...] | None = None

    @property
    def description(self) -> tuple[ext.Column, ...] | None:
        """psycopg2's ``cursor.description`` for this result (pqpath.c ``_make_column``)."""
        res, codec = self._res, self._codec
        if res is None:  # built already, or a statement without rows
            return self._description
        self._description = describe(res, codec)
        self._res = None
        lib: Any = _libpq.libpq_gil()
        lib.PQclear(res)
        return self._description

    def fetch(self, start: int, stop: int, into: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Rows ``start`` to ``stop``, appended to ``into`` (and returned)."""
        into.extend(self.rows[start:stop])
        return into

    def count(self) -> int:
        """How many rows there are to fetch."""
        return len(self.rows)

    def __repr__(self) -> str:
        return f"<Result {self.statusmessage!r} rowcount={self.rowcount}>"


class RowsResult(Result):
    """A :class:`Result` whose rows are converted when they are fetched, as
    psycopg2 converts them (:meth:`fetch`; ``rows``: all of them, converted at
    first access): a value its typecaster refuses raises at the fetch of its
    row, and typecasters run for the rows fetched only. The typecasters were
    looked up when the statement ended, as psycopg2 does. It owns its PGresult
    and frees it with itself."""

    __slots__ = ("_casts", "_cur", "_fast")

    def __init__(
        self,
        ntuples: int,
        statusmessage: str | None,
        res: int,
        codec: str,
        casts: list[Callable[[bytes, PGCursor], Any]],
        cur: PGCursor,
        fast: Any,
    ) -> None:
        # (rows is left unset: __getattr__ converts them all when first read)
        self.rowcount = ntuples
        self.statusmessage = statusmessage
        self.lastrowid = 0
        self.returns_rows = True
        self.query = None
        self._res = res
        self._codec = codec
        self._description = None
        self._casts = casts
        self._cur = cur
        self._fast = fast

    def __getattr__(self, name: str) -> Any:
        if name != "rows":
            raise AttributeError(name)
        rows = self.fetch(0, self.rowcount, [])
        self.rows = rows
        return rows

    def fetch(self, start: int, stop: int, into: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Rows ``start`` to ``stop`` converted now, appended to ``into``; if a
        typecaster raises, ``into`` holds the rows converted before it."""
        res = self._res
        assert res is not None
        return convert_rows(self._fast, res, self._casts, self._cur, start, stop, into)

    def count(self) -> int:
        return self.rowcount

    @property
    def description(self) -> tuple[ext.Column, ...] | None:
        if self._description is None and self._res is not None:
            self._description = describe(self._res, self._codec)
        return self._description

    def __del__(self) -> None:
        res, self._res = self._res, None
        if res is not None:
            lib: Any = _libpq.libpq_gil()  # loaded: this result came from it
            with contextlib.suppress(Exception):  # (interpreter shutdown)
                lib.PQclear(res)


def describe(res: int, codec: str) -> tuple[ext.Column, ...]:
    lib: Any = _libpq.libpq_gil()
    return tuple(
        _column(
            decode(lib.PQfname(res, i), codec) or "",
            lib.PQftype(res, i),
            lib.PQfsize(res, i),
            lib.PQfmod(res, i),
            lib.PQftable(res, i),
            lib.PQftablecol(res, i),
        )
        for i in range(lib.PQnfields(res))
    )


def convert_rows(
    fast: Any,
    res: int,
    casts: list[Callable[[bytes, PGCursor], Any]],
    cur: PGCursor,
    start: int,
    stop: int,
    rows: list[tuple[Any, ...]],
) -> list[tuple[Any, ...]]:
    """Rows ``start`` to ``stop`` of ``res``, converted by ``casts``, appended to ``rows``:
    in the C module, else through ctypes."""
    if fast is not None:
        return fast.convert(res, casts, cur, start, stop, rows)  # type: ignore[no-any-return]
    getvalue, getisnull = cell_functions()
    res_ptr = ctypes.c_void_p(res)
    append = rows.append
    nulls = [pgstate.null_caster(cast) for cast in casts]  # (psycopg2 calls these with None)
    for r in range(start, stop):
        append(
            tuple(
                [
                    cast(value, cur)
                    if (value := getvalue(res_ptr, r, c)) or not getisnull(res_ptr, r, c)
                    else (None if (null := nulls[c]) is None else null(None, cur))
                    for c, cast in enumerate(casts)
                ]
            )
        )
    return rows


def _column(name: str, oid: int, fsize: int, fmod: int, ftable: int, ftablecol: int) -> ext.Column:
    if fmod > 0:
        fmod -= 4
    numeric = oid == 1700
    kwargs: dict[str, Any] = {"name": name, "type_code": oid, "display_size": None}
    if fsize == -1:
        kwargs["internal_size"] = fmod >> 16 if numeric else fmod
    else:
        kwargs["internal_size"] = fsize
    if numeric:
        kwargs["precision"] = (fmod >> 16) & 0xFFFF
        kwargs["scale"] = fmod & 0xFFFF
    if ftable:
        kwargs["table_oid"] = ftable
    if ftablecol > 0:
        kwargs["table_column"] = ftablecol
    return ext.Column(**kwargs)


def fallback(cur: PGCursor, oid: int) -> Callable[[bytes, PGCursor], Any]:
    """psycopg2's default typecaster for ``oid``, reached through ``cur.cast``."""
    cast = cur.cast

    def by_cursor(value: bytes, _cur: PGCursor) -> Any:
        return cast(oid, value)

    return by_cursor


@functools.cache
def cell_functions() -> tuple[Any, Any]:
    """PQgetvalue and PQgetisnull without ``argtypes``: the hot path of row
    conversion, called once per cell. Without argtypes ctypes passes the ints
    and the ``c_void_p`` result pointer as they are, about a third cheaper."""
    lib = ctypes.PyDLL(_libpq.libpq_path())
    getvalue, getisnull = lib["PQgetvalue"], lib["PQgetisnull"]
    getvalue.restype = ctypes.c_char_p
    getisnull.restype = ctypes.c_int
    return getvalue, getisnull


def casts(
    fast: Any, lib: Any, raw: PGConnection, res: int, cur: PGCursor
) -> list[Callable[[bytes, PGCursor], Any]]:
    """Each column's typecaster, looked up as psycopg2 does: cursor,
    connection, then the global registry (the C module's ``rows`` does the same)."""
    if fast is not None:
        found: list[Callable[[bytes, PGCursor], Any]] = fast.casts(
            res, cur, cur.string_types, raw.string_types, ext.string_types, fallback
        )
        return found
    cursor_types = cur.string_types
    conn_types = raw.string_types
    global_types = ext.string_types
    casters: list[Callable[[bytes, PGCursor], Any]] = []
    for column in range(lib.PQnfields(res)):
        oid = lib.PQftype(res, column)
        cast: Any = None
        if cursor_types:
            cast = cursor_types.get(oid)
        if cast is None:
            cast = conn_types.get(oid) or global_types.get(oid)
        if cast is None:
            # psycopg2's default caster is not exposed: cursor.cast() reaches it.
            cast = fallback(cur, oid)
        casters.append(cast)
    return casters
