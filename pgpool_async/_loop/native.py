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
- On leaving, the socket goes back to blocking mode and the NOTIFYs read
  meanwhile are appended to ``connection.notifies`` (then, not after each
  statement); nothing more is read from the socket.

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

Where the parts are: this module decides what to send and keeps psycopg2's
state in step; :mod:`~pgpool_async._loop.runtimes` waits on the socket (one
waiter per runtime, chosen at :meth:`~LoopStatementRunner.enter`);
:mod:`~pgpool_async._loop.pqcalls` binds libpq once (the C module or ctypes);
:mod:`~pgpool_async._loop.pgrows` and :mod:`~pgpool_async._loop.pgerrors` make
psycopg2's rows, descriptions and exceptions from libpq's results.

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
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import psycopg2
import psycopg2.extensions as ext

from .. import _libpq
from ..errors import PoolError
from . import pgerrors, pgrows, pgstate, runtimes
from .pgrows import SLICE_ROWS, Result, RowsResult
from .pgstate import STATUS_BEGIN, STATUS_READY
from .pqcalls import (
    CONNECTION_BAD,
    OK_STATUSES,
    PG_DIAG_POSITION,
    PGRES_COMMAND_OK,
    PGRES_COPY_BOTH,
    PGRES_COPY_IN,
    PGRES_COPY_OUT,
    PGRES_EMPTY_QUERY,
    PGRES_ERRORS,
    PGRES_TUPLES_OK,
    PQTRANS_IDLE,
    PQTRANS_INERROR,
    accelerator,
    loaded,
    preload,
    ssl_pending,
    unavailable_reason,
)

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

# psycopg2's own BEGIN variants (pqpath.c, pq_begin_locked).
_ISOLATION = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}


class NativeUnavailable(PoolError):
    """The loop-native path cannot take this connection; the message says why.
    Callers run the statement on the thread path instead."""


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
    loop = runner.loop
    if loop is not None and not runtimes.on_loop(loop):
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing watches
            loop.call_soon_threadsafe(release, raw)
        return
    if runner._busy:
        runner.close()
    else:
        runner._hand_over_notifies()
        runner._detach()


def watching_loop(raw: PGConnection) -> asyncio.AbstractEventLoop | None:
    """The asyncio loop whose runner holds ``raw`` now (its socket registered
    there), or None. Lets code on another thread hand the closing of ``raw`` to
    that loop: closed first, its file descriptor could be reused by a new
    socket before the loop stops watching the old number."""
    runner = _entered.get(id(raw))
    if runner is None or runner.raw is not raw:
        return None
    return runner.loop


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
        self._waiter: runtimes.Waiter | None = None  # how to wait, on the loop entered on
        self._cursor: PGCursor | None = None
        self._codec = "utf-8"
        self._ssl: int | None = None  # SSL * when the connection uses OpenSSL
        self._ssl_pending: Any = None
        self._busy = False
        # the statement in flight
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
        # A cancel request still on its way: the next statement waits for it,
        # or the late request would cancel that statement instead.
        self._cancel_sent: Any = None
        self._status = -1  # the last result's ExecStatusType
        self._ended = False  # the statement's final NULL result was read
        self._state: pgstate.Layout | None = None  # psycopg2's fields (set by enter)
        self._notices: ctypes.c_void_p | None = None  # psycopg2's pending notices (a view)

    # -- ownership -----------------------------------------------------------------------

    @property
    def entered(self) -> bool:
        """True between :meth:`enter` and :meth:`leave` (or a close)."""
        return self._pg is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop this runner was entered on (None: trio, or not entered)."""
        waiter = self._waiter
        return waiter.loop if waiter is not None else None

    @property
    def flushing(self) -> bool:
        """True while the statement's text is still being written (the waiters ask)."""
        return self._flushing

    def refusal(self) -> str | None:
        """Why :meth:`enter` would refuse this connection now, or None."""
        if not loaded():
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
        waiter = runtimes.waiter_for(self, self.cancel_grace)
        raw = self.raw
        lib: Any = _libpq.libpq_gil()
        pg = raw.pgconn_ptr
        self._state = state = pgstate.layout(raw)
        if state is not None and self._notices is None:
            self._notices = state.notices_word(raw)
        self._lib = lib
        self._fast = accelerator()
        self._codec = ext.encodings[raw.encoding]
        if self._cursor is None:
            self._cursor = ext.cursor(raw)  # for the typecasters only; no I/O
        if lib.PQsslInUse(pg):
            self._ssl = lib.PQsslStruct(pg, b"OpenSSL")
            self._ssl_pending = ssl_pending(lib)
        if lib.PQsetnonblocking(pg, 1) != 0:
            raise NativeUnavailable("libpq refused non-blocking mode on this connection")
        self._fd = lib.PQsocket(pg)
        self._pg = pg
        _entered[id(raw)] = self
        self._waiter = waiter
        waiter.watch(self._fd)

    async def leave(self) -> None:
        """Give the connection back to psycopg2; safe to call twice.

        Restores blocking mode, stops watching the socket, and appends the
        NOTIFYs read meanwhile to ``connection.notifies``. Nothing is sent or
        read: psycopg2's transaction state is already true (a transaction open
        or failed on the loop is psycopg2's to commit or roll back).

        :raises PoolError: a statement is still running on this runner.
        """
        if self._pg is None:
            return
        if self._busy:
            raise PoolError("a statement is still running on this runner: wait for it before leave()")
        if self._cancel_sent is not None:
            await self._settle_cancel()
        self._hand_over_notifies()
        self._detach()

    def _hand_over_notifies(self) -> None:
        """Append the NOTIFYs libpq has already read to ``raw.notifies``, as
        psycopg2 does after each of its statements. Nothing is read from the
        socket: what the server sent since (a NOTIFY, or the goodbye of a
        connection it ended) stays there for psycopg2's next call, where
        psycopg2 itself would find it."""
        pg, lib = self._pg, self._lib
        codec = self._codec
        while True:
            ptr = lib.PQnotifies(pg)
            if not ptr:
                return
            try:
                item = ptr.contents
                channel = (item.relname or b"").decode(codec, "replace")
                payload = (item.extra or b"").decode(codec, "replace")
                self.raw.notifies.append(ext.Notify(item.be_pid, channel, payload))
            finally:
                lib.PQfreemem(ptr)

    def _detach(self) -> None:
        _entered.pop(id(self.raw), None)
        pg, self._pg = self._pg, None
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.unwatch()
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
            waiter = self._waiter
            if waiter is not None:
                waiter.unwatch()
                waiter.stop_writing()
            self._flushing = False
            self._pg = None
            self._waiter = None
        if self._state is not None and not self.raw.closed:
            self._state.broken(self.raw)
        else:
            self.raw.close()

    def _close_raw(self) -> None:
        """Close the psycopg2 connection (I/O failure, unanswered cancel)."""
        _entered.pop(id(self.raw), None)
        waiter = self._waiter
        if self._pg is not None:
            if waiter is not None:
                waiter.closing()
            self._pg = None
            self._waiter = None
        # Still non-blocking: PQfinish's goodbye message cannot wait on the network.
        self.raw.close()
        if waiter is not None:
            waiter.wake()  # the statement in flight ends: _result reports the close

    # -- statements --------------------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """True when the loop watches this idle connection's socket (asyncio) and
        nothing has arrived since the last statement: then it is alive as far as
        a look at the socket could tell, and a pool need not look."""
        waiter = self._waiter
        return waiter is not None and waiter.quiet and not self._busy

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
        return bool(self.raw.get_transaction_status() != PQTRANS_IDLE)

    @property
    def clean(self) -> bool:
        """True when neither the server nor psycopg2 has a transaction open."""
        raw = self.raw
        return bool(raw.get_transaction_status() == PQTRANS_IDLE and raw.status == STATUS_READY)

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
        if begin and raw.get_transaction_status() != PQTRANS_IDLE:
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
                if not describe and type(result) is RowsResult:  # large: a slice per loop turn
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
        if raw.get_transaction_status() != PQTRANS_IDLE:
            await self._command(b"ROLLBACK")
        await self._command(begin_text(raw))
        state.set_status(raw, STATUS_BEGIN)
        return await self.execute(
            sql, params, cursor=cursor, commit=wanted_commit, describe=describe, take=take
        )

    def _began(self) -> bool:
        """After a statement sent behind our BEGIN: whether the BEGIN ran (its
        result was read and others followed, or it was the only one and a success)."""
        return self._count >= 2 or (self._count == 1 and self._status not in PGRES_ERRORS)

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
            or self._status not in PGRES_ERRORS
            or self._lib.PQstatus(self._pg) == CONNECTION_BAD
        ):
            return False
        status = raw.get_transaction_status()
        if self._count == 1:
            # (It was sent while the server was idle: BEGIN fails only with the connection.)
            return bool(status == PQTRANS_IDLE)
        return bool(
            self._count == 2
            and status == PQTRANS_INERROR
            and self._lib.PQresultErrorField(res, PG_DIAG_POSITION)
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
            if raw.get_transaction_status() != PQTRANS_IDLE:
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
        if (self._flushing or self._cancelling) and (waiter := self._waiter) is not None:
            waiter.stop_writing()  # a statement that ended mid-send
            waiter.disarm_abort()
        self._flushing = self._copy_out = self._io_failed = self._cancelling = False
        self._io_message = None

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
        waiter = self._waiter
        assert waiter is not None
        await waiter.statement(self._flushing)

    def pump(self) -> bool:
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
                    if self._waiter is not None:
                        self._waiter.stop_writing()
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
                return self._io_failed or lib.PQstatus(pg) == CONNECTION_BAD
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
            if status in OK_STATUSES:
                continue  # (the common case)
            if self._unusual(status):
                return True

    def _unusual(self, status: int) -> bool:
        """A result that is neither rows nor a command's success was just read:
        deal with it; True when the statement is over (else read on)."""
        lib, pg = self._lib, self._pg
        if status in (PGRES_COPY_IN, PGRES_COPY_OUT):
            self._copy_seen = status
        if status == PGRES_COPY_IN:
            # psycopg2 refuses COPY outside copy_*(); end it with an error, keep reading.
            lib.PQputCopyEnd(pg, b"COPY FROM STDIN is not supported by execute()")
            lib.PQflush(pg)
        elif status == PGRES_COPY_OUT:
            self._copy_out = True
        elif status == PGRES_COPY_BOTH or (status in PGRES_ERRORS and lib.PQstatus(pg) == CONNECTION_BAD):
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

    def cancel_requested(self) -> None:
        """The caller was cancelled mid-statement: ask the server to stop it, and
        close the connection if it has not answered within ``cancel_grace``
        (the waiters call this)."""
        waiter = self._waiter
        if self._cancelling or self._pg is None or waiter is None:
            return
        self._cancelling = True
        sent, done = waiter.cancel_notice()
        # Bounded (PQcancelPoll), in a thread of its own, GIL released: the
        # server may be unreachable, and cancel_grace closes the connection then.
        if _libpq.send_cancel_then(self.raw, done, timeout=self.cancel_grace):
            self._cancel_sent = sent
        waiter.arm_abort(self.cancel_grace)

    async def _settle_cancel(self) -> None:
        """Wait (at most ``cancel_grace``) until the last cancel request has
        reached the server; if it never does, close the connection: a request
        landing later would cancel an innocent statement."""
        # Cleared only once settled: a caller cancelled while waiting here leaves
        # it for the next statement to wait for.
        waiter = self._waiter
        if waiter is not None and await waiter.settle(self._cancel_sent, self.cancel_grace):
            self._cancel_sent = None
            return
        self._cancel_sent = None
        self._close_raw()
        raise psycopg2.OperationalError(
            "a cancel request did not reach the server in time; the connection was closed"
        )

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
        bad = lib.PQstatus(self._pg) == CONNECTION_BAD
        if self._io_message is not None:
            failure = psycopg2.OperationalError(pgerrors.decode(self._io_message, self._codec))
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
        if status in PGRES_ERRORS and not self._copy_seen:
            raise self._error(res, False)
        if self._copy_seen:
            direction = "FROM" if self._copy_seen == PGRES_COPY_IN else "TO"
            method = "copy_from" if self._copy_seen == PGRES_COPY_IN else "copy_to"
            raise psycopg2.ProgrammingError(
                f"can't execute COPY {direction}: use the {method}() method instead"
            )
        if status == PGRES_EMPTY_QUERY or self._count < expected:
            # (A comment-only statement behind our BEGIN yields only BEGIN's result.)
            raise psycopg2.ProgrammingError("can't execute an empty query")
        return self._ok_result(cur, res, status, committed, describe, take)  # (it refuses other statuses)

    def _went_well(self, expected: int) -> bool:
        """The statement is over, every one of its ``expected`` results was read and
        the last was rows or a command's success (what pump() recorded)."""
        return (
            self._ended
            and self._last is not None
            and self._status in OK_STATUSES
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
        statusmessage = pgerrors.decode(lib.PQcmdStatus(res), codec) if describe else None
        if status == PGRES_COMMAND_OK:
            tuples = lib.PQcmdTuples(res)
            lastrowid = lib.PQoidValue(res) if describe else 0
            return Result([], int(tuples) if tuples else -1, statusmessage, lastrowid, None)
        if status != PGRES_TUPLES_OK:
            raise psycopg2.NotSupportedError(f"got server response with unsupported status {status}")
        fast = self._fast
        if not describe:
            # A one-hop call: what it returns is converted now, as psycopg2's fetch
            # right after its execute would (take: 0 none, 1 the first row, -1 all).
            rows: list[tuple[Any, ...]] | None
            if fast is not None:
                # The typecasters looked up and the rows converted in one C call.
                types = (cur.string_types, self.raw.string_types, ext.string_types, pgrows.fallback)
                if take == -1:
                    rows = fast.rows(res, cur, *types, SLICE_ROWS)  # (None: large)
                    ntuples = len(rows) if rows is not None else fast.ntuples(res)
                else:
                    rows, ntuples = fast.head(res, cur, *types, take)
            else:
                ntuples = lib.PQntuples(res)
                rows = []
                if take and (take == 1 or ntuples <= SLICE_ROWS):
                    stop = 1 if take == 1 else ntuples
                    rows = pgrows.convert_rows(
                        fast, res, self._casts(res, cur), cur, 0, min(stop, ntuples), rows
                    )
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
        return RowsResult(ntuples, statusmessage, res, codec, self._casts(res, cur), cur, fast)

    def _casts(self, res: int, cur: PGCursor) -> list[Any]:
        return pgrows.casts(self._fast, self._lib, self.raw, res, cur)

    async def _rows_in_turns(self, result: RowsResult) -> list[tuple[Any, ...]]:
        """Every row of a large result, a slice at a time, yielding to the loop
        whenever a turn took over ``turn_budget``."""
        ntuples = result.rowcount
        rows: list[tuple[Any, ...]] = []
        start = 0
        budget = self.turn_budget
        clock = time.perf_counter
        turn_started = clock()
        while start < ntuples:
            stop = min(start + SLICE_ROWS, ntuples)
            result.fetch(start, stop, rows)
            start = stop
            if start < ntuples and clock() - turn_started > budget:
                waiter = self._waiter
                assert waiter is not None
                await waiter.checkpoint()
                if self._pg is None:
                    raise psycopg2.InterfaceError("connection already closed")
                turn_started = clock()
        return rows

    def _error(self, res: int | None, bad: bool) -> psycopg2.Error:
        """The exception psycopg2's ``pq_raise`` would build for this result; it
        takes the PGresult if it is the last one (its ``diag`` reads it)."""
        exc = pgerrors.make_error(self._lib, self._pg, res, bad or self._io_failed, self._codec)
        if res is not None and res == self._last and pgerrors.hand_result(exc, res):
            self._last = None
        return exc
