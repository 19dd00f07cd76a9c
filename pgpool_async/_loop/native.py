"""Statements on the event loop through libpq itself, on ordinary psycopg2 connections.

A :class:`LoopStatementRunner` takes one psycopg2 connection for a period (from
:meth:`~LoopStatementRunner.enter` to :meth:`~LoopStatementRunner.leave`) and runs
statements on it from the event loop, with no worker thread: the query text comes
from psycopg2's ``cursor.mogrify``, goes out with libpq's ``PQsendQuery`` in
non-blocking mode, the answer is read as the socket becomes readable
(``PQconsumeInput`` / ``PQisBusy`` / ``PQgetResult``), and the values are
converted by psycopg2's own typecasters (cursor, then connection, then global
registry), so rows, ``description``, ``rowcount`` and errors are psycopg2's.

How it stays safe:

- Only calls that never wait run on the loop (the GIL is kept during them:
  :func:`pgpool_async._libpq.libpq_gil`). ``PQisBusy`` is checked before *every*
  ``PQgetResult``, the final NULL one included: a busy ``PQgetResult`` would wait
  for the network while holding the GIL, stopping the whole process.
- asyncio: the socket's reader is registered once per period, and the reader
  callback itself walks the protocol, so a statement costs one future and one
  task wake-up. trio: ``trio.lowlevel.wait_readable`` per wait.
- psycopg2's view of the connection is the truth, at every moment: the runner
  decides transaction boundaries from psycopg2's own ``status`` and keeps it in
  step (:mod:`pgpool_async._loop.pgstate`), exactly as psycopg2's ``execute``,
  ``commit()`` and ``rollback()`` would. Without autocommit, a statement while
  psycopg2's ``status`` is ready opens a transaction with psycopg2's own
  ``BEGIN`` text, sent in the same packet as the statement (one round trip
  instead of two); ``COMMIT``/``ROLLBACK``/``BEGIN`` sent as SQL change the
  server's state and not psycopg2's, as with psycopg2. psycopg2 code can take
  over at any point, a failed transaction included, with nothing replayed.
- Cancellation (a cancelled task, a timeout): the server is asked to cancel the
  statement from a thread of its own, GIL released, bounded by ``cancel_grace``
  (:func:`pgpool_async._libpq.send_cancel_then`: ``PQcancelPoll`` on libpq
  17+); the answer is read to the end, then the cancellation is delivered. If
  the server has not answered within ``cancel_grace`` seconds, the connection is
  closed instead. The loop never waits.
- Large results are converted a slice at a time, yielding to the loop whenever a
  slice took longer than ``turn_budget`` seconds.
- An I/O failure (a killed backend, a dropped network) closes the psycopg2
  connection, so its ``closed`` is true and a pool discards it.
- On leaving, the socket goes back to blocking mode and ``connection.poll()``
  hands psycopg2 the NOTIFYs and notices read meanwhile (they appear in
  ``connection.notifies`` / ``notices`` then, not after each statement).

Differences from psycopg2 running the same statement (all small, listed so a
caller can decide): errors carry ``pgerror``, ``pgcode`` and ``diag`` like
psycopg2's but ``cursor`` is None; ``COPY`` sent through :meth:`execute` is
refused with psycopg2's message and the connection is left usable; only
tuple rows are built (callers use the thread path for other cursor factories);
the server sees a transaction's first statement as ``BEGIN;<statement>`` (in
``pg_stat_activity.query`` and ``current_query()``; errors are made the same as
psycopg2's, see :meth:`~LoopStatementRunner.execute`); notices reach
``connection.notices`` when the statement ends, NOTIFYs ``connection.notifies``
at :meth:`leave`.

How the pool uses it (``AsyncConnectionPool(io="auto")``, see
:class:`pgpool_async._loan.Loan`): each loan holds one runner, entered at its
first statement; ``Loan.call`` runs the pool's statement functions
(``execute``/``fetch*``, commit, rollback, the one-hop helpers) on it and
leaves it before any other call goes to a thread; the return path leaves it
without a round trip when the connection is idle, and otherwise rolls back on
the loop in the pool's return task first.

When it is not available: not Linux, psycopg2's libpq not found, an async or
GSS-encrypted connection, a two-phase transaction prepared, a psycopg2 build
whose connection layout :mod:`~pgpool_async._loop.pgstate` does not recognise.
:func:`unavailable_reason` and :meth:`LoopStatementRunner.refusal` say why;
callers then use the thread path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext

from .. import _libpq
from ..errors import PoolError
from . import pgstate
from .pgstate import STATUS_BEGIN, STATUS_READY

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PGConnection
    from psycopg2.extensions import cursor as PGCursor

__all__ = [
    "LoopStatementRunner",
    "NativeUnavailable",
    "Result",
    "StatementRunner",
    "begin_text",
    "preload",
    "release",
    "unavailable_reason",
    "watching_loop",
]

Params = Sequence[Any] | dict[str, Any] | None

# libpq enums (libpq-fe.h)
_CONNECTION_BAD = 1
_PGRES_EMPTY_QUERY = 0
_PGRES_COMMAND_OK = 1
_PGRES_TUPLES_OK = 2
_PGRES_COPY_OUT = 3
_PGRES_COPY_IN = 4
_PGRES_COPY_BOTH = 8
_PGRES_ERRORS = (5, 6, 7)  # BAD_RESPONSE, NONFATAL_ERROR, FATAL_ERROR
_OK_STATUSES = (_PGRES_TUPLES_OK, _PGRES_COMMAND_OK)  # a statement's success
_PQTRANS_IDLE = 0
_PQTRANS_INTRANS = 2
_PQTRANS_INERROR = 3
_PG_DIAG_SQLSTATE = ord("C")
_PG_DIAG_POSITION = ord("P")

# psycopg2's own BEGIN variants (pqpath.c, pq_begin_locked).
_ISOLATION = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}

# Rows converted between two looks at the clock during a large result.
_SLICE_ROWS = 256


class NativeUnavailable(PoolError):
    """The loop-native path cannot take this connection; the message says why.
    Callers run the statement on the thread path instead."""


def preload() -> str | None:
    """Find and load psycopg2's libpq (reads ``/proc/self/maps``: call it in a
    worker thread, or before the loop starts); returns :func:`unavailable_reason`."""
    if _libpq.libpq_gil() is None or _libpq.libpq() is None:
        return _libpq.unavailable_reason() or "psycopg2's libpq was not found"
    _cell_functions()
    _accelerator()
    return None


#: Set ``PGPOOL_ASYNC_NO_C=1`` to make the runner's libpq calls through ctypes even
#: where the C module (``_pqfast``) is built: what the tests compare it against.
_USE_C = os.environ.get("PGPOOL_ASYNC_NO_C", "").strip() in ("", "0")


@functools.cache
def _accelerator() -> Any:
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
    return _accelerator.cache_info().currsize > 0 and _accelerator() is not None


def begin_text(raw: PGConnection) -> bytes:
    """The ``BEGIN`` psycopg2 sends on ``raw``, with its session characteristics
    (``set_session``): plain ``b"BEGIN"`` when none is set."""
    level, readonly, deferrable = raw.isolation_level, raw.readonly, raw.deferrable
    if level is None and readonly is None and deferrable is None:
        return b"BEGIN"
    text = "BEGIN"
    if level in _ISOLATION:
        text += " ISOLATION LEVEL " + _ISOLATION[level]
    if readonly is not None:
        text += " READ ONLY" if readonly else " READ WRITE"
    if deferrable is not None:
        text += " DEFERRABLE" if deferrable else " NOT DEFERRABLE"
    return text.encode()


def unavailable_reason() -> str | None:
    """Why the loop-native path is unavailable in this process, or None if it is.

    The first call loads libpq (file I/O): see :func:`preload`.
    """
    return preload()


# Runners entered now, by id of their psycopg2 connection: lets the pool take a
# connection back whose AsyncConnection (and so its runner) was dropped unreturned.
_entered: dict[int, LoopStatementRunner] = {}


def release(raw: PGConnection) -> None:
    """Let psycopg2 have ``raw`` again, without waiting: before a thread touches
    or closes a connection a pool keeps entered (idle between loans), or whose
    owner is gone (garbage-collected unreturned). A runner with no statement
    running just stops watching the socket (psycopg2's state is already true,
    an open transaction included); one with a statement running can't: the
    connection is closed then (the statement ends with ``OperationalError``)
    and the pool discards it. No-op if no runner holds it.

    Call it on the loop thread; from another thread (a pool's ``__del__``) it is
    scheduled on the runner's asyncio loop instead."""
    runner = _entered.get(id(raw))
    if runner is None or runner.raw is not raw:
        return
    loop = runner._asyncio
    if loop is not None and not _on_loop(loop):
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing watches
            loop.call_soon_threadsafe(release, raw)
        return
    if runner._busy:
        runner.close()
    else:
        runner._detach()
        runner._deliver_notices()


def watching_loop(raw: PGConnection) -> asyncio.AbstractEventLoop | None:
    """The asyncio loop whose runner holds ``raw`` now (its socket registered
    there), or None. Lets code on another thread hand the closing of ``raw`` to
    that loop: closed first, its file descriptor could be reused by a new
    socket before the loop stops watching the old number."""
    runner = _entered.get(id(raw))
    if runner is None or runner.raw is not raw:
        return None
    return runner._asyncio


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _asyncio_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _trio_running() -> bool:
    try:
        import trio
    except ImportError:
        return False
    return bool(trio.lowlevel.in_trio_run())


def _loaded() -> bool:
    return _libpq.libpq_path.cache_info().currsize > 0


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
        self._description = _describe(res, codec)
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


class _RowsResult(Result):
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
        return _convert_rows(self._fast, res, self._casts, self._cur, start, stop, into)

    def count(self) -> int:
        return self.rowcount

    @property
    def description(self) -> tuple[ext.Column, ...] | None:
        if self._description is None and self._res is not None:
            self._description = _describe(self._res, self._codec)
        return self._description

    def __del__(self) -> None:
        res, self._res = self._res, None
        if res is not None:
            lib: Any = _libpq.libpq_gil()  # loaded: this result came from it
            with contextlib.suppress(Exception):  # (interpreter shutdown)
                lib.PQclear(res)


def _describe(res: int, codec: str) -> tuple[ext.Column, ...]:
    lib: Any = _libpq.libpq_gil()
    return tuple(
        _column(
            _decode(lib.PQfname(res, i), codec) or "",
            lib.PQftype(res, i),
            lib.PQfsize(res, i),
            lib.PQfmod(res, i),
            lib.PQftable(res, i),
            lib.PQftablecol(res, i),
        )
        for i in range(lib.PQnfields(res))
    )


def _convert_rows(
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
    getvalue, getisnull = _cell_functions()
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


# -- errors like psycopg2's ------------------------------------------------------------------


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


def _exception_class(sqlstate: str) -> type[psycopg2.Error]:
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


def _decode(raw: bytes | None, codec: str) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        return raw.decode(codec, "replace")


# -- the runner -----------------------------------------------------------------------------------


class StatementRunner(Protocol):
    """What AsyncConnection needs from a way to run statements off the thread
    path (:class:`LoopStatementRunner` is the one implementation). The
    connection holds one per loan, calls these with its own lock held, and
    :meth:`leave` before any psycopg2 code runs (``run_sync``, cursors, COPY,
    notifications, the pool's return)."""

    raw: PGConnection

    @property
    def entered(self) -> bool: ...

    @property
    def in_transaction(self) -> bool: ...

    @property
    def settled(self) -> bool: ...

    @property
    def quiet(self) -> bool: ...

    def refusal(self) -> str | None: ...

    def enter(self) -> None: ...

    async def leave(self) -> None: ...

    async def reset(self) -> None: ...

    @property
    def clean(self) -> bool: ...

    async def execute(
        self,
        sql: Any,
        params: Params = None,
        *,
        cursor: PGCursor | None = None,
        commit: bool = False,
        describe: bool = True,
        take: int = -1,
    ) -> Result: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    def close(self) -> None: ...


class _Uncancellable(asyncio.Future[None]):
    """The wait for a cancelled statement to end: ``cancel()`` is refused, so a
    cancellation arriving meanwhile (anyio re-delivers one every loop turn) does
    not wake the task until the statement is over: asyncio delivers a refused
    cancellation when the future completes."""

    __slots__ = ()

    def cancel(self, msg: Any = None) -> bool:
        return False


class LoopStatementRunner:
    """Runs statements on one psycopg2 connection from the event loop.

    Usage::

        runner = LoopStatementRunner(raw)      # no I/O
        runner.enter()                          # on the loop; NativeUnavailable if it can't
        try:
            result = await runner.execute("SELECT %s", (1,))
        finally:
            await runner.leave()               # psycopg2 may use the connection again

    While entered, the runner owns the connection: nothing else may touch it
    (no psycopg2 call, in any thread), and statements run one at a time (a
    second concurrent :meth:`execute` raises :class:`PoolError`). A runner is
    bound to the event loop it was entered on. After an I/O failure or an
    unanswered cancellation the connection is closed and every call raises
    psycopg2's ``InterfaceError`` ("connection already closed").

    ``cancel_grace``: seconds a cancelled statement may take to end on the
    server before the connection is closed instead. ``turn_budget``: seconds of
    row conversion after which a large result yields to the loop.
    """

    def __init__(self, raw: PGConnection, *, cancel_grace: float = 2.0, turn_budget: float = 0.005) -> None:
        if not cancel_grace > 0:
            raise ValueError(f"cancel_grace must be positive, not {cancel_grace!r}")
        if not turn_budget > 0:
            raise ValueError(f"turn_budget must be positive, not {turn_budget!r}")
        self.raw = raw
        self.cancel_grace = cancel_grace
        self.turn_budget = turn_budget
        self._lib: Any = None
        self._fast: Any = None  # the C module (_pqfast), or None: ctypes
        self._pg: int | None = None
        self._fd = -1
        self._asyncio: asyncio.AbstractEventLoop | None = None
        self._trio = False
        self._cursor: PGCursor | None = None
        self._codec = "utf-8"
        self._ssl: int | None = None  # SSL * when the connection uses OpenSSL
        self._ssl_pending: Any = None
        self._busy = False
        # the statement in flight
        self._fut: asyncio.Future[None] | None = None
        self._last: int | None = None  # the last PGresult, kept (psycopg2 keeps the last)
        self._count = 0
        # With commit=True the statement's result is the one before COMMIT's.
        self._prev: int | None = None
        self._keep_prev = False
        self._flushing = False
        self._copy_out = False
        self._copy_seen = 0
        self._io_failed = False
        self._io_message: bytes | None = None
        self._cancelling = False
        self._abort_handle: asyncio.TimerHandle | None = None
        # A cancel request still on its way: the next statement waits for it,
        # or the late request would cancel that statement instead.
        self._cancel_sent: Any = None
        self._reader_off = False
        self._status = -1  # the last result's ExecStatusType
        self._ended = False  # the statement's final NULL result was read
        self._state: pgstate.Layout | None = None  # psycopg2's fields (set by enter)
        self._notices: ctypes.c_void_p | None = None  # psycopg2's pending notices (a view)

    # -- ownership -----------------------------------------------------------------------

    @property
    def entered(self) -> bool:
        """True between :meth:`enter` and :meth:`leave` (or a close)."""
        return self._pg is not None

    def refusal(self) -> str | None:
        """Why :meth:`enter` would refuse this connection now, or None."""
        if not _loaded():
            # Never load on the loop (file I/O): whoever set us up calls preload() first.
            return "libpq is not loaded yet: call pgpool_async._loop.native.preload() in a thread first"
        reason = unavailable_reason()
        if reason is not None:
            return reason
        raw = self.raw
        lib: Any = _libpq.libpq_gil()
        if raw.closed:
            return "the connection is closed"
        if raw.async_:
            return "an asynchronous psycopg2 connection"
        if raw.status not in (STATUS_READY, STATUS_BEGIN):
            return "a two-phase transaction is prepared on this connection (tpc_commit or tpc_rollback it)"
        if pgstate.layout(raw) is None:
            return (
                f"psycopg2 {getattr(psycopg2, '__version__', '?')}'s connection layout is not the one "
                "pgpool_async knows, so its transaction state could not be kept in step"
            )
        if lib.PQgssEncInUse(raw.pgconn_ptr):
            return "GSS encryption can hold data the socket does not show; use the thread path"
        if lib.PQisBusy(raw.pgconn_ptr):
            return "the connection is busy"
        return None

    def enter(self) -> None:
        """Take the connection for the event loop running now.

        :raises NativeUnavailable: see :meth:`refusal`.
        :raises PoolError: already entered, or no asyncio/trio loop running.
        """
        if self._pg is not None:
            raise PoolError("this LoopStatementRunner is already entered: leave() it first")
        reason = self.refusal()
        if reason is not None:
            raise NativeUnavailable(f"statements on this connection run in threads: {reason}")
        library = "asyncio" if _asyncio_running() else "trio" if _trio_running() else "neither"
        raw = self.raw
        lib: Any = _libpq.libpq_gil()
        pg = raw.pgconn_ptr
        if library == "asyncio":
            self._asyncio = asyncio.get_running_loop()
        elif library == "trio":
            self._trio = True
        else:
            raise PoolError("LoopStatementRunner runs on an asyncio or trio event loop: none is running")
        self._state = state = pgstate.layout(raw)
        if state is not None and self._notices is None:
            self._notices = state.notices_word(raw)
        self._lib = lib
        self._fast = _accelerator()
        self._codec = ext.encodings[raw.encoding]
        if self._cursor is None:
            self._cursor = ext.cursor(raw)  # for the typecasters only; no I/O
        if lib.PQsslInUse(pg):
            self._ssl = lib.PQsslStruct(pg, b"OpenSSL")
            self._ssl_pending = _ssl_pending(lib)
        if lib.PQsetnonblocking(pg, 1) != 0:
            raise NativeUnavailable("libpq refused non-blocking mode on this connection")
        self._fd = lib.PQsocket(pg)
        self._pg = pg
        _entered[id(raw)] = self
        if self._asyncio is not None:
            self._asyncio.add_reader(self._fd, self._on_readable)

    async def leave(self) -> None:
        """Give the connection back to psycopg2; safe to call twice.

        Restores blocking mode, stops watching the socket, and lets psycopg2 see
        the NOTIFYs and notices read meanwhile (``connection.poll()``). Nothing
        is sent: psycopg2's transaction state is already true (a transaction
        open or failed on the loop is psycopg2's to commit or roll back).

        :raises PoolError: a statement is still running on this runner.
        """
        if self._pg is None:
            return
        if self._busy:
            raise PoolError("a statement is still running on this runner: wait for it before leave()")
        if self._cancel_sent is not None:
            await self._settle_cancel()
        self._detach()
        try:
            self.raw.poll()  # idle connection: reads what is there, never waits
        except psycopg2.Error:
            self._close_raw()
            raise

    def _detach(self) -> None:
        _entered.pop(id(self.raw), None)
        pg, self._pg = self._pg, None
        if self._asyncio is not None:
            self._asyncio.remove_reader(self._fd)  # (a writer is only ever added mid-statement)
        self._asyncio = None
        self._trio = False
        if pg is not None and not self.raw.closed:
            self._lib.PQsetnonblocking(pg, 0)
        self._ssl = None

    def _deliver_notices(self) -> None:
        """Move the notices libpq handed psycopg2 into ``raw.notices`` now, as
        psycopg2 does at the end of each of its statements (``poll()`` on an
        idle connection reads what is there, never waits). A connection found
        broken meanwhile is psycopg2's to report at its next use."""
        word = self._notices
        if word is not None and word.value is not None and not self.raw.closed:
            with contextlib.suppress(psycopg2.Error):
                self.raw.poll()

    def close(self) -> None:
        """Close the psycopg2 connection now (it can't be trusted any more);
        safe twice, no waiting."""
        self._close_raw()

    def _broken(self) -> None:
        """The server ended the connection: stop watching it and mark it as
        psycopg2 does (``closed == 2``; ``close()`` frees it)."""
        _entered.pop(id(self.raw), None)
        if self._pg is not None:
            loop, fd = self._asyncio, self._fd
            if loop is not None:
                loop.remove_reader(fd)
                if self._flushing:
                    loop.remove_writer(fd)
                    self._flushing = False
            self._pg = None
            self._asyncio = None
            self._trio = False
        if self._state is not None and not self.raw.closed:
            self._state.broken(self.raw)
        else:
            self.raw.close()

    def _close_raw(self) -> None:
        """Close the psycopg2 connection (I/O failure, unanswered cancel)."""
        _entered.pop(id(self.raw), None)
        if self._pg is not None:
            loop, fd = self._asyncio, self._fd
            if loop is not None:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
            elif self._trio:
                import trio

                trio.lowlevel.notify_closing(fd)  # a waiting statement wakes (and ends)
            self._pg = None
            self._asyncio = None
            self._trio = False
        # Still non-blocking: PQfinish's goodbye message cannot wait on the network.
        self.raw.close()
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)  # the statement in flight ends: _result reports the close

    # -- statements --------------------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """True when the loop watches this idle connection's socket (asyncio) and
        nothing has arrived since the last statement: then it is alive as far as
        a look at the socket could tell, and a pool need not look."""
        return self._asyncio is not None and not self._reader_off and not self._busy

    @property
    def settled(self) -> bool:
        """True when nothing is under way: not entered, or entered with no
        statement running and no cancel request on its way (what lets a pool keep
        the runner entered while the connection waits for its next borrower; the
        caller reads the transaction status itself: ``raw.get_transaction_status()``
        asks the same libpq)."""
        return self._pg is None or (not self._busy and self._cancel_sent is None)

    @property
    def in_transaction(self) -> bool:
        """True when the server has a transaction open (or failed) on this connection."""
        self._check()
        # psycopg2's method asks the same libpq (PQtransactionStatus), no I/O, no
        # lock: a C call, cheaper than one through ctypes.
        return bool(self.raw.get_transaction_status() != _PQTRANS_IDLE)

    @property
    def clean(self) -> bool:
        """True when neither the server nor psycopg2 has a transaction open."""
        raw = self.raw
        return bool(raw.get_transaction_status() == _PQTRANS_IDLE and raw.status == STATUS_READY)

    async def execute(
        self,
        sql: Any,
        params: Params = None,
        *,
        cursor: PGCursor | None = None,
        commit: bool = False,
        describe: bool = True,
        take: int = -1,
    ) -> Result:
        """Run one statement (``sql`` with psycopg2 placeholders, or a ``psycopg2.sql``
        object) as psycopg2's ``cursor.execute`` would, and return its :class:`Result`.

        ``cursor``: a psycopg2 cursor of this connection whose typecasters (and
        ``tzinfo_factory``) convert the values; default a plain one. Nothing else
        of it is used or changed.

        ``commit``: then commit, as ``execute`` followed by :meth:`commit` would,
        but in the same round trip, on a connection without autocommit. Outside a
        transaction, with psycopg2's default session characteristics, the statement
        goes alone: the server runs a query string as one implicit transaction and
        commits it as it ends (several statements included), the outcome of
        ``BEGIN; statement; COMMIT`` without their two statements; a failed
        statement leaves no transaction then. Otherwise ``BEGIN; statement;
        COMMIT`` go in one packet, and if the statement fails the server skips the
        COMMIT: the transaction is left failed, to be rolled back.

        ``describe=False``: the caller will not read ``description`` (it is None
        then, ``returns_rows`` still tells), which spares keeping the libpq result;
        then ``take`` rows are converted now (0, 1, or -1: all) and the Result's
        ``rows`` are those. Otherwise rows are converted as they are fetched
        (``Result.fetch``; ``rows``: all), as psycopg2 converts them.

        :raises psycopg2.Error: what psycopg2 would raise (same class, ``pgcode``,
            ``pgerror``, ``diag``); after an I/O failure the connection is closed.
        :raises PoolError: not entered, or another statement is running.
        """
        if self._pg is None:
            self._check()  # (raises)
        if self._busy:
            raise PoolError("another statement is running on this connection: await it first")
        if self._cancel_sent is not None:
            self._busy = True
            try:
                await self._settle_cancel()
            finally:
                self._busy = False
        cur = cursor if cursor is not None else self._cursor
        assert cur is not None
        # Without parameters psycopg2's mogrify only encodes a str (no % handling).
        if params is None and type(sql) is str:
            query: bytes = sql.encode(self._codec)
        else:
            query = cur.mogrify(sql, params)
        statement = query
        if not query:
            raise psycopg2.ProgrammingError("can't execute an empty query")
        raw = self.raw
        # psycopg2's own rule (pq_begin_locked): its status, not the server's.
        begin = not raw.autocommit and raw.status == STATUS_READY
        expected = 1
        wanted_commit = commit
        commit = commit and not raw.autocommit
        if begin:
            text = begin_text(raw)
            if commit and text == b"BEGIN":
                begin = commit = False  # one implicit transaction (see above)
            else:
                query = text + b";" + query
                expected += 1
        if commit:
            query += b";COMMIT"
            expected += 1
            self._keep_prev = True
        state = self._state
        assert state is not None
        if begin and raw.get_transaction_status() != _PQTRANS_IDLE:
            # psycopg2 is ready but the server is in a transaction (a BEGIN sent as SQL
            # in autocommit mode, then autocommit turned off): psycopg2's BEGIN goes
            # alone then (the server warns, or refuses it in a failed transaction),
            # so the outcome is psycopg2's whatever the statement is.
            await self._command(begin_text(raw))
            state.set_status(raw, STATUS_BEGIN)
            return await self.execute(
                sql, params, cursor=cursor, commit=wanted_commit, describe=describe, take=take
            )
        redo = False
        self._busy = True
        try:
            try:
                await self._run(query)
            finally:
                if begin and self._began():
                    state.set_status(raw, STATUS_BEGIN)  # as psycopg2's BEGIN, sent alone, would
            if begin and not self._went_well(expected) and self._glue_shows():
                redo = True
            else:
                result = self._result(cur, expected, commit, describe, take)
                if commit:
                    state.ended(raw)  # psycopg2's commit(): ready again, one more transaction ended
                if cursor is not None:
                    result.query = statement  # psycopg2's cursor.query: the statement alone
                if not describe and type(result) is _RowsResult:  # large: a slice per loop turn
                    result.rows = await self._rows_in_turns(result)
                return result
        finally:
            self._busy = False
            self._deliver_notices()
            self._clear()
        assert redo
        # The error would show our BEGIN glued to the statement (its position, its
        # LINE 1), and nothing of the statement ran: start over as psycopg2 does,
        # BEGIN alone, then the statement, whose error is then psycopg2's own.
        if raw.get_transaction_status() != _PQTRANS_IDLE:
            await self._command(b"ROLLBACK")
        await self._command(begin_text(raw))
        state.set_status(raw, STATUS_BEGIN)
        return await self.execute(
            sql, params, cursor=cursor, commit=wanted_commit, describe=describe, take=take
        )

    def _began(self) -> bool:
        """After a statement sent behind our BEGIN: whether the BEGIN ran (its
        result was read and others followed, or it was the only one and a success)."""
        return self._count >= 2 or (self._count == 1 and self._status not in _PGRES_ERRORS)

    def _glue_shows(self) -> bool:
        """After a failed statement sent behind our BEGIN: True when the user would
        see the BEGIN in the error and none of the statement ran, so it can be sent
        again the way psycopg2 sends it. Either the whole packet failed to parse
        (nothing ran), or the statement's first command failed before it ran (an
        error with a position is raised by parse analysis, before execution)."""
        res, raw = self._last, self.raw
        if (
            res is None
            or self._pg is None
            or raw.closed
            or self._io_failed
            or self._copy_seen
            or self._status not in _PGRES_ERRORS
            or self._lib.PQstatus(self._pg) == _CONNECTION_BAD
        ):
            return False
        status = raw.get_transaction_status()
        if self._count == 1:
            # (It was sent while the server was idle: BEGIN fails only with the connection.)
            return bool(status == _PQTRANS_IDLE)
        return bool(
            self._count == 2
            and status == _PQTRANS_INERROR
            and self._lib.PQresultErrorField(res, _PG_DIAG_POSITION)
        )

    async def commit(self) -> None:
        """psycopg2's ``commit()``: COMMIT if psycopg2 began a transaction (its
        ``status``), else nothing; psycopg2's state is ready again either way."""
        await self._end(b"COMMIT")

    async def rollback(self) -> None:
        """psycopg2's ``rollback()``: ROLLBACK if psycopg2 began a transaction (its
        ``status``), else nothing; psycopg2's state is ready again either way."""
        await self._end(b"ROLLBACK")

    async def _end(self, query: bytes) -> None:
        self._check()
        raw = self.raw
        if raw.autocommit or raw.status != STATUS_BEGIN:
            return
        try:
            await self._command(query)
        finally:
            assert self._state is not None
            self._state.ended(raw)

    async def reset(self) -> None:
        """The pool's return: end any transaction the server or psycopg2 has open
        (a ROLLBACK, also for one opened with ``BEGIN`` sent as SQL in autocommit
        mode), so the next borrower starts clean."""
        self._check()
        raw = self.raw
        try:
            if raw.get_transaction_status() != _PQTRANS_IDLE:
                await self._command(b"ROLLBACK")
        finally:
            if raw.status != STATUS_READY:
                assert self._state is not None
                self._state.ended(raw)

    async def _command(self, query: bytes) -> None:
        """COMMIT, ROLLBACK or BEGIN sent alone: :meth:`execute` without its
        Result (nobody reads it), its errors the same."""
        if self._busy or self._cancel_sent is not None:
            await self.execute(query, describe=False)  # (it raises or waits as it should)
            return
        self._busy = True
        try:
            await self._run(query)
            if not self._went_well(1):
                cur = self._cursor
                assert cur is not None
                self._result(cur, 1, describe=False)  # raises what psycopg2 would
        finally:
            self._busy = False
            self._clear()

    def _check(self) -> None:
        if self._pg is None:
            if self.raw.closed:
                raise psycopg2.InterfaceError("connection already closed")
            raise PoolError("this LoopStatementRunner is not entered: call enter() on the event loop first")

    def _clear(self) -> None:
        if self._last is not None or self._prev is not None:
            clear = self._fast.clear if self._fast is not None else self._lib.PQclear
            for res in (self._last, self._prev):
                if res is not None:
                    clear(res)
            self._last = self._prev = None
        self._keep_prev = self._ended = False
        self._count = self._copy_seen = 0
        if self._flushing and self._asyncio is not None:
            self._asyncio.remove_writer(self._fd)  # a statement that ended mid-send
        self._flushing = self._copy_out = self._io_failed = self._cancelling = False
        self._io_message = None
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None

    # -- the protocol -----------------------------------------------------------------------

    async def _run(self, query: bytes) -> None:
        """Send ``query`` and read every result up to the final NULL."""
        lib, pg, fast = self._lib, self._pg, self._fast
        if fast is not None:
            flushed = fast.send(pg, query)  # PQsendQuery, PQflush: -2 if the first failed
            if flushed == -2:
                self._io_failed = True  # the connection is gone: PQerrorMessage says why
                return
        elif not lib.PQsendQuery(pg, query):
            self._io_failed = True
            return
        else:
            flushed = lib.PQflush(pg)
        if flushed < 0:
            self._io_failed = True
            return
        self._flushing = flushed == 1
        loop = self._asyncio
        if loop is None:
            await self._wait_trio()
            return
        if self._reader_off:
            self._reader_off = False
            loop.add_reader(self._fd, self._on_readable)
        # One plain future per statement (the task awaits it on asyncio's fast
        # path); the reader callback walks the protocol and sets it when done.
        fut = loop.create_future()
        self._fut = fut
        if self._flushing:
            loop.add_writer(self._fd, self._on_writable)
        try:
            await fut
        except asyncio.CancelledError:
            # The task was cancelled: the cancellation is delivered only once the
            # statement is over (cancelled on the server, or the connection closed).
            if self._pg is not None and not self._pump():
                await self._drain_cancelled(loop)
            raise
        finally:
            self._fut = None

    async def _drain_cancelled(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ask the server to cancel the statement, then wait (at most
        ``cancel_grace``: :meth:`_abort` closes the connection then) until it is
        over; further cancellations meanwhile are folded into the one the caller
        raises next."""
        self._cancel_requested()
        while self._pg is not None and not self._pump():  # (_pump is idempotent once over)
            fut = _Uncancellable(loop=loop)
            self._fut = fut
            with contextlib.suppress(asyncio.CancelledError):  # (raised by the caller next)
                await fut

    def _on_readable(self) -> None:
        """asyncio's reader: walk the protocol; wake the task only when done."""
        fut = self._fut
        if fut is None:
            # Between statements: a NOTIFY, a parameter change, or a closing
            # server. Leave it in the socket, where psycopg2 would find it, and
            # stop watching until the next statement (else the loop would call
            # us again and again): the next statement reads it first, as
            # psycopg2's would, and leave() hands NOTIFYs over.
            self._reader_off = True
            if self._asyncio is not None:
                self._asyncio.remove_reader(self._fd)
            return
        if self._pump() and not fut.done():
            fut.set_result(None)

    def _on_writable(self) -> None:
        fut = self._fut
        if fut is None or self._pg is None:
            return
        if self._pump() and not fut.done():
            fut.set_result(None)

    async def _wait_trio(self) -> None:
        import trio

        fd = self._fd
        try:
            while not self._pump():
                if self._flushing:
                    # The server may be writing to us while we write to it: read now and then.
                    with trio.move_on_after(0.05):
                        await trio.lowlevel.wait_writable(fd)
                else:
                    await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:
            return  # closed under us (release()): _result reports it
        except trio.Cancelled:
            self._cancel_requested()
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.cancel_grace
                while self._pg is not None and not self._pump():
                    await trio.lowlevel.wait_readable(fd)
            if scope.cancelled_caught:
                self._close_raw()
            raise

    def _pump(self) -> bool:
        """Advance the statement as far as libpq can without waiting; True when done."""
        lib, pg, fast = self._lib, self._pg, self._fast
        if pg is None:
            return True
        if fast is not None and not (self._flushing or self._ssl or self._copy_out):
            # The common case in one C call: the same steps as the loop below.
            code, self._last, self._prev, added, status = fast.pump(
                pg, self._last, self._prev, self._keep_prev
            )
            if added:
                self._count += added
                self._status = status
            if code == 1:
                self._ended = True  # the final NULL: the connection is ready again
                return True
            if code == 0:
                return self._io_failed
            if code == 3:
                return True  # busy on a dead connection: _result reports it
            if code == -1:
                return self._read_failed()
            if self._unusual(status):  # code 2: a result the C part leaves to us
                return True
            # (then on with the loop below, from PQisBusy)
        else:
            if not lib.PQconsumeInput(pg):
                return self._read_failed()
            if self._flushing:
                flushed = lib.PQflush(pg)
                if flushed != 1:
                    self._flushing = False
                    if self._asyncio is not None:
                        self._asyncio.remove_writer(self._fd)
                    if flushed < 0:
                        self._io_failed = True
            if self._ssl:
                # OpenSSL may hold the rest of a record the socket no longer shows.
                while lib.PQisBusy(pg) and self._ssl_pending(self._ssl) > 0:
                    if not lib.PQconsumeInput(pg):
                        return self._read_failed()
        while True:
            if self._copy_out and not self._drain_copy_out():
                return False
            if lib.PQisBusy(pg):
                # Busy on a dead connection would wait forever: let _result report it.
                return self._io_failed or lib.PQstatus(pg) == _CONNECTION_BAD
            res = lib.PQgetResult(pg)
            if not res:
                self._ended = True  # the final NULL: the connection is ready again
                return True
            if self._keep_prev:
                if self._prev is not None:
                    lib.PQclear(self._prev)
                self._prev = self._last
            elif self._last is not None:
                lib.PQclear(self._last)
            self._last = res
            self._count += 1
            self._status = status = lib.PQresultStatus(res)
            if status in _OK_STATUSES:
                continue  # (the common case)
            if self._unusual(status):
                return True

    def _unusual(self, status: int) -> bool:
        """A result that is neither rows nor a command's success was just read:
        deal with it; True when the statement is over (else read on)."""
        lib, pg = self._lib, self._pg
        if status in (_PGRES_COPY_IN, _PGRES_COPY_OUT):
            self._copy_seen = status
        if status == _PGRES_COPY_IN:
            # psycopg2 refuses COPY outside copy_*(); end it with an error, keep reading.
            lib.PQputCopyEnd(pg, b"COPY FROM STDIN is not supported by execute()")
            lib.PQflush(pg)
        elif status == _PGRES_COPY_OUT:
            self._copy_out = True
        elif status == _PGRES_COPY_BOTH or (status in _PGRES_ERRORS and lib.PQstatus(pg) == _CONNECTION_BAD):
            return True
        return False

    def _read_failed(self) -> bool:
        """The socket failed: the statement is over. psycopg2 raises
        OperationalError with libpq's message at this point (``pq_get_result_async``)."""
        self._io_failed = True
        self._io_message = self._lib.PQerrorMessage(self._pg)
        return True

    def _drain_copy_out(self) -> bool:
        """Discard COPY TO STDOUT data; True when the copy is over."""
        lib, pg = self._lib, self._pg
        buf = ctypes.c_char_p()
        while True:
            n = lib.PQgetCopyData(pg, ctypes.byref(buf), 1)
            if n > 0:
                lib.PQfreemem(buf)
                continue
            if n == 0:
                return False
            self._copy_out = False
            return True

    def _cancel_requested(self) -> None:
        """The caller was cancelled mid-statement: ask the server to stop it, and
        close the connection if it has not answered within ``cancel_grace``."""
        if self._cancelling or self._pg is None:
            return
        self._cancelling = True
        done: Callable[[bool], object]
        sent: Any
        if self._asyncio is not None:
            loop = self._asyncio
            sent = loop.create_future()

            def settle() -> None:
                if not sent.done():
                    sent.set_result(None)

            def done(_delivered: bool) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(settle)

        else:
            import trio

            sent = trio.Event()
            token = trio.lowlevel.current_trio_token()

            def done(_delivered: bool) -> None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(sent.set)

        # Bounded (PQcancelPoll), in a thread of its own, GIL released: the
        # server may be unreachable, and cancel_grace closes the connection then.
        if _libpq.send_cancel_then(self.raw, done, timeout=self.cancel_grace):
            self._cancel_sent = sent
        if self._asyncio is not None:  # (trio: _wait_trio's shielded scope has the deadline)
            self._abort_handle = self._asyncio.call_later(self.cancel_grace, self._abort)

    async def _settle_cancel(self) -> None:
        """Wait (at most ``cancel_grace``) until the last cancel request has
        reached the server; if it never does, close the connection: a request
        landing later would cancel an innocent statement."""
        # Cleared only once settled: a caller cancelled while waiting here leaves
        # it for the next statement to wait for.
        sent = self._cancel_sent
        if self._asyncio is not None:
            try:
                await asyncio.wait_for(asyncio.shield(sent), self.cancel_grace)
                self._cancel_sent = None
                return
            except asyncio.TimeoutError:
                pass
        else:
            import trio

            with trio.move_on_after(self.cancel_grace):
                await sent.wait()
                self._cancel_sent = None
                return
        self._cancel_sent = None
        self._close_raw()
        raise psycopg2.OperationalError(
            "a cancel request did not reach the server in time; the connection was closed"
        )

    def _abort(self) -> None:
        """asyncio: the cancelled statement did not end in time: close the connection."""
        self._abort_handle = None
        fut = self._fut
        if fut is None or fut.done():
            return
        self._close_raw()  # (wakes the statement)

    # -- results ----------------------------------------------------------------------------------

    def _result(
        self, cur: PGCursor, expected: int, committed: bool = False, describe: bool = True, take: int = -1
    ) -> Result:
        """The statement's outcome, or the exception psycopg2 would raise (see
        :meth:`_ok_result` for when rows are converted)."""
        lib = self._lib
        res = self._last
        if self._went_well(expected):
            # The common case, decided without asking libpq again.
            assert res is not None
            return self._ok_result(cur, res, self._status, committed, describe, take)
        if self._pg is None or self.raw.closed:
            raise psycopg2.OperationalError(
                "the connection was closed while the statement ran (a cancel not answered in "
                "time, or the pool closing it)"
            )
        bad = lib.PQstatus(self._pg) == _CONNECTION_BAD
        if self._io_message is not None:
            failure = psycopg2.OperationalError(_decode(self._io_message, self._codec))
            if bad:
                self._broken()  # as psycopg2's pq_get_result_async: closed == 2
            else:
                self._close_raw()
            raise failure
        if res is None or bad:
            error = self._error(res, bad)
            if bad:
                self._broken()
            raise error
        status = lib.PQresultStatus(res)
        if status in _PGRES_ERRORS and not self._copy_seen:
            raise self._error(res, False)
        if self._copy_seen:
            direction = "FROM" if self._copy_seen == _PGRES_COPY_IN else "TO"
            method = "copy_from" if self._copy_seen == _PGRES_COPY_IN else "copy_to"
            raise psycopg2.ProgrammingError(
                f"can't execute COPY {direction}: use the {method}() method instead"
            )
        if status == _PGRES_EMPTY_QUERY or self._count < expected:
            # (A comment-only statement behind our BEGIN yields only BEGIN's result.)
            raise psycopg2.ProgrammingError("can't execute an empty query")
        return self._ok_result(cur, res, status, committed, describe, take)  # (it refuses other statuses)

    def _went_well(self, expected: int) -> bool:
        """The statement is over, every one of its ``expected`` results was read and
        the last was rows or a command's success (what pump() recorded)."""
        return (
            self._ended
            and self._last is not None
            and self._status in _OK_STATUSES
            and self._count >= expected
            and not self._copy_seen
        )

    def _ok_result(
        self, cur: PGCursor, res: int, status: int, committed: bool, describe: bool, take: int = -1
    ) -> Result:
        """The Result of a statement that succeeded (``res``/``status``: the last
        result; with ``committed``, the statement's is the one before COMMIT's)."""
        lib = self._lib
        if committed:
            prev = self._prev  # the COMMIT went through: report the statement
            assert prev is not None
            res, status = prev, lib.PQresultStatus(prev)
        codec = self._codec
        statusmessage = _decode(lib.PQcmdStatus(res), codec) if describe else None
        if status == _PGRES_COMMAND_OK:
            tuples = lib.PQcmdTuples(res)
            lastrowid = lib.PQoidValue(res) if describe else 0
            return Result([], int(tuples) if tuples else -1, statusmessage, lastrowid, None)
        if status != _PGRES_TUPLES_OK:
            raise psycopg2.NotSupportedError(f"got server response with unsupported status {status}")
        fast = self._fast
        if not describe:
            # A one-hop call: what it returns is converted now, as psycopg2's fetch
            # right after its execute would (take: 0 none, 1 the first row, -1 all).
            rows: list[tuple[Any, ...]] | None
            if fast is not None:
                # The typecasters looked up and the rows converted in one C call.
                types = (cur.string_types, self.raw.string_types, ext.string_types, _fallback)
                if take == -1:
                    rows = fast.rows(res, cur, *types, _SLICE_ROWS)  # (None: large)
                    ntuples = len(rows) if rows is not None else fast.ntuples(res)
                else:
                    rows, ntuples = fast.head(res, cur, *types, take)
            else:
                ntuples = lib.PQntuples(res)
                rows = []
                if take and (take == 1 or ntuples <= _SLICE_ROWS):
                    stop = 1 if take == 1 else ntuples
                    rows = _convert_rows(fast, res, self._casts(res, cur), cur, 0, min(stop, ntuples), rows)
                elif take:
                    rows = None
            if rows is not None:
                done = Result(rows, ntuples, statusmessage, 0, None)
                done.returns_rows = True
                return done  # (the PGresult stays ours: _clear frees it)
        # The Result takes the PGresult (rows converted as fetched, its description):
        # no longer ours to clear.
        if res == self._last:
            self._last = None
        else:
            self._prev = None
        ntuples = fast.ntuples(res) if fast is not None else lib.PQntuples(res)
        return _RowsResult(ntuples, statusmessage, res, codec, self._casts(res, cur), cur, fast)

    def _casts(self, res: int, cur: PGCursor) -> list[Callable[[bytes, PGCursor], Any]]:
        """Each column's typecaster, looked up as psycopg2 does: cursor,
        connection, then the global registry (the C module's ``rows`` does the same)."""
        fast = self._fast
        if fast is not None:
            found: list[Callable[[bytes, PGCursor], Any]] = fast.casts(
                res, cur, cur.string_types, self.raw.string_types, ext.string_types, _fallback
            )
            return found
        lib = self._lib
        cursor_types = cur.string_types
        conn_types = self.raw.string_types
        global_types = ext.string_types
        casts: list[Callable[[bytes, PGCursor], Any]] = []
        for column in range(lib.PQnfields(res)):
            oid = lib.PQftype(res, column)
            cast: Any = None
            if cursor_types:
                cast = cursor_types.get(oid)
            if cast is None:
                cast = conn_types.get(oid) or global_types.get(oid)
            if cast is None:
                # psycopg2's default caster is not exposed: cursor.cast() reaches it.
                cast = _fallback(cur, oid)
            casts.append(cast)
        return casts

    async def _rows_in_turns(self, result: _RowsResult) -> list[tuple[Any, ...]]:
        """Every row of a large result, a slice at a time, yielding to the loop
        whenever a turn took over ``turn_budget``."""
        ntuples = result.rowcount
        rows: list[tuple[Any, ...]] = []
        start = 0
        budget = self.turn_budget
        clock = time.perf_counter
        turn_started = clock()
        while start < ntuples:
            stop = min(start + _SLICE_ROWS, ntuples)
            result.fetch(start, stop, rows)
            start = stop
            if start < ntuples and clock() - turn_started > budget:
                await self._yield()
                if self._pg is None:
                    raise psycopg2.InterfaceError("connection already closed")
                turn_started = clock()
        return rows

    async def _yield(self) -> None:
        if self._asyncio is not None:
            await asyncio.sleep(0)
        else:
            import trio

            await trio.lowlevel.checkpoint()

    def _error(self, res: int | None, bad: bool, message: bytes | None = None) -> psycopg2.Error:
        """The exception psycopg2's ``pq_raise`` would build for this result."""
        lib, codec = self._lib, self._codec
        code: bytes | None = None
        if res is not None:
            message = lib.PQresultErrorMessage(res)
            code = lib.PQresultErrorField(res, _PG_DIAG_SQLSTATE)
        if not message:
            message = lib.PQerrorMessage(self._pg) if self._pg is not None else None
        if not message:
            return psycopg2.DatabaseError("error with no message from the libpq")
        text = _decode(message, codec) or ""
        sqlstate = _decode(code, codec)
        cls: type[psycopg2.Error]
        if sqlstate:
            cls = _exception_class(sqlstate)
        else:
            cls = psycopg2.OperationalError if bad or self._io_failed else psycopg2.DatabaseError
        exc = cls(_strip_severity(text))
        exc.__setstate__({"pgerror": text, "pgcode": sqlstate})  # type: ignore[no-untyped-call]
        if res is not None and _PGRES_OFFSET is not None and res == self._last:
            # The exception owns the PGresult from now on, as psycopg2's do: its
            # ``diag`` reads the fields, and it PQclears it when collected.
            ctypes.c_void_p.from_address(id(exc) + _PGRES_OFFSET).value = res
            self._last = None
        return exc


def _fallback(cur: PGCursor, oid: int) -> Callable[[bytes, PGCursor], Any]:
    cast = cur.cast

    def by_cursor(value: bytes, _cur: PGCursor) -> Any:
        return cast(oid, value)

    return by_cursor


@functools.cache
def _cell_functions() -> tuple[Any, Any]:
    """PQgetvalue and PQgetisnull without ``argtypes``: the hot path of row
    conversion, called once per cell. Without argtypes ctypes passes the ints
    and the ``c_void_p`` result pointer as they are, about a third cheaper."""
    lib = ctypes.PyDLL(_libpq.libpq_path())
    getvalue, getisnull = lib["PQgetvalue"], lib["PQgetisnull"]
    getvalue.restype = ctypes.c_char_p
    getisnull.restype = ctypes.c_int
    return getvalue, getisnull


def _ssl_pending(lib: Any) -> Callable[[int], int]:
    """OpenSSL's SSL_pending from libpq's own dependencies."""
    func = lib.SSL_pending
    func.argtypes = [ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]
