"""One loan of a pooled connection: the interface every call on it goes through.

:class:`Loan` is what :mod:`~pgpool_async.connection`,
:mod:`~pgpool_async.cursor`, :mod:`~pgpool_async.copying` and
:mod:`~pgpool_async.notifications` use to run calls on a lent psycopg2
connection: ``raw``, :meth:`Loan.call` (the pool's own calls: statements on the
event loop through the connection's loop-native runner where the pool's ``io``
allows, the rest in its worker threads), :meth:`Loan.call_user` (user code, in a
thread, which may call back into the loop), the :class:`Turn` that keeps calls
one at a time, and what the loan changed that the pool must undo on return.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import psycopg2
from psycopg2.extensions import connection as PGConnection

from . import _libpq
from ._loop import failover
from ._loop.failover import ServerFit
from ._loop.native import LoopStatementRunner, NativeUnavailable, Result, StatementRunner
from ._loop.stats import PoolStats
from ._telemetry import METER_SLOT, TRACE_SLOT, PoolTelemetry, sql_commenter
from ._thread import blocking
from ._thread.offload import Offloader
from .errors import ConnectionReleased, StatementNotAwaited, TransactionFailed

__all__ = ["RELEASED", "Loan", "Turn", "run_cursor_method"]

T = TypeVar("T")

_TRANSACTION_INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR

RELEASED = (
    "this connection was returned to the pool and can't be used anymore: "
    "take a new one with pool.connection() or pool.getconn()"
)


class Turn:
    """Runs the calls on one connection one at a time, in call order.

    Lives on the event loop thread only; free when uncontended (no event, no
    checkpoint). A waiter cancelled after being handed the turn passes it on.
    """

    __slots__ = ("_busy", "_idle", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._waiters: deque[anyio.Event] | None = None  # made at the first contention
        self._idle: anyio.Event | None = None

    def locked(self) -> bool:
        return self._busy

    def try_take(self) -> bool:
        """Take the turn if it is free, without awaiting; False: await
        ``__aenter__`` to wait in line (then ``_release`` when done)."""
        if self._busy:
            return False
        self._busy = True
        return True

    async def __aenter__(self) -> None:
        if not self._busy:
            self._busy = True
            return
        turn = anyio.Event()
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self._release()  # handed the turn while being cancelled
            else:
                self._waiters.remove(turn)  # (not None: appended above)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the turn passes on; still busy
            return
        self._busy = False
        if self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Wait until no call runs and none is queued (the pool's return path)."""
        while self._busy:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()


class Loan:
    """One loan of a pooled connection: how calls run on it, and what the loan
    changed that the pool must undo when it comes back.

    The interface for this package's modules (cursor, COPY, notifications):
    ``raw``, :meth:`call` (the pool's own calls), :meth:`call_user` (user code,
    which may call back into the loop), ``turn``, and the flags below.
    """

    __slots__ = (
        "detached",
        "first_error",
        "fit",
        "io",
        "last_on_loop",
        "listened",
        "offload",
        "raw",
        "runner",
        "session_changed",
        "stats",
        "telemetry",
        "turn",
        "tx_depth",
        "unawaited",
        "unawaited_name",
    )

    def __init__(
        self,
        raw: PGConnection,
        offload: Offloader,
        io: str = "thread",
        runner: StatementRunner | None = None,
        fit: ServerFit | None = None,
        telemetry: PoolTelemetry | None = None,
    ) -> None:
        self.detached = False  # the connection went back to the pool
        self.raw = raw
        self.offload = offload
        self.io = io  # the pool's io option: "thread", or "auto"/"loop" (statements on the loop)
        # The slot's runner (the pool keeps it entered between loans), or one of
        # the loan's own, made at the first statement.
        self.runner: StatementRunner | None = runner
        self.turn = Turn()
        self.tx_depth = 0  # open transaction() blocks
        self.session_changed = False  # set_session() was called: reset on return
        self.listened = False  # LISTEN was sent: UNLISTEN * on return
        # The pool's judge of "this server can no longer serve the pool" (failover.py).
        self.fit = fit
        # The first database error of this loan's transaction, named when the
        # block ends on a failed transaction (TransactionFailed).
        self.first_error: BaseException | None = None
        # Statement coroutines made by the public methods and not yet started
        # (see statement()): a block that ends with some never awaited raises.
        self.unawaited = 0
        self.unawaited_name = ""
        self.last_on_loop = False  # the last call() ran on the loop (cursors read it on failure)
        # The pool's spans, metrics and per-path statement counts (_telemetry.py).
        if telemetry is None:
            telemetry = PoolTelemetry("(no pool)", io, PoolStats(), enabled=False)
        self.telemetry = telemetry
        self.stats = telemetry.stats

    def count_statement(self, name: str) -> None:
        """A public statement method (``name``) made its coroutine, whose first
        step is ``loan.unawaited -= 1``: counted as :meth:`statement` counts.

        :raises ConnectionReleased: the connection went back to the pool.
        """
        if self.detached:
            raise ConnectionReleased(RELEASED)
        self.unawaited += 1
        self.unawaited_name = name

    def check_finished(self, where: str) -> None:
        """At the normal end of a ``connection()`` or ``transaction()`` block,
        before its COMMIT (``where`` names the block).

        :raises StatementNotAwaited: a statement coroutine made on this
            connection was never awaited (nothing is committed).
        :raises TransactionFailed: the transaction failed earlier (an error the
            code caught and went on from): the server would turn the COMMIT into
            a ROLLBACK, so nothing is committed.
        """
        if self.unawaited:
            count, self.unawaited = self.unawaited, 0
            raise StatementNotAwaited(
                f"{count} statement(s) on this connection were created and never awaited "
                f"(the last: {self.unawaited_name}()), so {where} was rolled back, not committed: "
                "await every statement (for psycopg2.extras' execute_batch/execute_values, use "
                "pgpool_async.extras)"
            )
        raw = self.raw
        if not raw.closed and raw.get_transaction_status() == _TRANSACTION_INERROR:
            first = self.first_error
            if first is None:
                named = "an error"
            elif isinstance(first, psycopg2.Error):
                named = f"{type(first).__name__}: {_first_line(first)}"
            else:
                named = "a statement cancelled by a timeout or a cancellation, then cancelled on the server"
            raise TransactionFailed(
                f"the transaction failed earlier ({named}) and the code went on, so {where} "
                "rolled it back: nothing was committed. Let the error propagate, or roll back "
                "(or use a nested transaction() block, a savepoint) where you catch it"
            )

    def call(self, func: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
        """``func(raw, *args)`` (``await`` it), in turn: on the event loop when
        ``func`` is one of the pool's statement functions with a loop version
        (``_ON_LOOP``) and the runner can take the connection, else in a worker
        thread (for calls that never call back into the loop). If the caller is
        cancelled meanwhile, the server is asked to cancel the running statement,
        the statement (or the thread) is waited for, then the cancellation is raised.

        :raises ConnectionReleased: the connection went back to the pool.
        """
        return self._run(func, args, False)

    def statement(self, name: str, func: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
        """:meth:`call` for a public statement method (``name``, e.g.
        ``"conn.execute"``): the coroutine is counted until it starts, so a block
        that ends while one was never awaited raises instead of committing
        without it (see :meth:`check_finished`).

        :raises ConnectionReleased: the connection went back to the pool.
        """
        self.count_statement(name)
        return self._run(func, args, True)

    def call_statement(self, sql: Any, func: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
        """:meth:`call` for a statement (``sql``: its text, for the span) that runs
        in a thread whatever ``func`` is (a cursor psycopg2 must run itself).

        :raises ConnectionReleased: the connection went back to the pool.
        """
        return self._run(func, args, False, sql)

    async def _run(self, func: Callable[..., T], args: tuple[Any, ...], counted: bool, sql: Any = None) -> T:
        if counted:
            self.unawaited -= 1
        if self.detached:
            raise ConnectionReleased(RELEASED)
        # (The routes' results are T by construction: the tables above pair each function
        # with its loop version, which mypy cannot follow; hence the ignores below.)
        route = _ROUTES.get(func) if self.io != "thread" else None
        if route is not None:
            raw = self.raw
            if route == _HELPER and args[0] not in _EXTRACT:
                route = None  # run_sync's user code: a thread
            elif raw.cursor_factory is not None or type(raw) is not PGConnection:
                # Asked before each statement, so a cursor_factory set later takes
                # effect at once: rows of other cursor factories are built by psycopg2
                # only, and a connection subclass (e.g. LoggingConnection) expects its
                # cursor() to run. Said once per pool (io="auto"), refused (io="loop");
                # OpenTelemetry's traced cursor factory stays on the loop.
                route = None if self.telemetry.off_loop(raw) else route
        turn = self.turn
        if not turn.try_take():
            await turn.__aenter__()  # in line behind another task's call
        telemetry = self.telemetry
        statement = None
        try:
            # telemetry.live(), inlined: with no provider set, two attribute reads per statement.
            if telemetry.enabled and (
                TRACE_SLOT._TRACER_PROVIDER is not None or METER_SLOT._METER_PROVIDER is not None
            ):
                if sql is not None:
                    statement = telemetry.begin(self.raw, sql)
                else:
                    sql = _statement_of(func, args)
                    if sql is not None:
                        statement = telemetry.begin(self.raw, sql)
                        if self.raw.cursor_factory is not None:
                            args = _with_sql_comment(statement, self.raw, func, args)
            runner = None
            if route is not None:
                runner = self.runner
                if runner is None or not runner.entered:
                    runner = self._loop_runner()  # (entered at the first statement, or None)
            self.last_on_loop = runner is not None
            if runner is not None:
                self.stats.statements_on_loop += 1
                # The hot calls with no coroutine in between: a statement, a commit
                # (a COMMIT lost with the connection raises CommitOutcomeUnknown), a
                # one-hop helper's statement and commit.
                if route == _STATEMENT:
                    result = await runner.execute(args[0], args[1], describe=False, take=_TAKE[func])
                    return _EXTRACT[func](result)  # type: ignore[no-any-return]
                if route == _COMMIT:
                    with failover.commit_in_flight(self.raw):
                        await runner.commit()
                    return None  # type: ignore[return-value]
                if route == _HELPER:
                    helper, raw = args[0], self.raw
                    # The commit travels with the statement (unless autocommit): it may have been done.
                    with failover.commit_in_flight(raw, when=not raw.autocommit):
                        result = await runner.execute(
                            args[1], args[2], commit=True, describe=False, take=_TAKE[helper]
                        )
                    if helper is not blocking.execute and not result.returns_rows:
                        raise psycopg2.ProgrammingError(blocking.NO_ROWS_COMMITTED)
                    return _EXTRACT[helper](result)  # type: ignore[no-any-return]
                return await _ON_LOOP[func](runner, *args)  # type: ignore[no-any-return]
            await self.leave_loop()  # (psycopg2 code next: it must see the connection)
            if sql is not None or _statement_of(func, args) is not None:
                self.stats.statements_in_threads += 1
            if statement is None:
                return await self.offload.run(func, self.raw, *args, on_cancel=self.cancel_statement)
            token = statement.in_thread()
            try:
                return await self.offload.run(func, self.raw, *args, on_cancel=self.cancel_statement)
            finally:
                statement.out_of_thread(token)
        except psycopg2.Error as exc:
            self._saw_error(exc)
            if statement is not None:
                statement.failed(exc)
            raise
        except BaseException as exc:
            # A cancelled statement was cancelled on the server too (QueryCanceled).
            if self.first_error is None and isinstance(exc, anyio.get_cancelled_exc_class()):
                self.first_error = exc
            if statement is not None:
                statement.failed(exc)
            raise
        finally:
            turn._release()
            if statement is not None:
                statement.end()

    async def call_user(
        self,
        func: Callable[..., T],
        *args: Any,
        on_cancel: Callable[[], object] | None = None,
        statement: Any = None,
    ) -> T:
        """``func(raw, *args)`` in an anyio worker thread, in turn: ``func`` may
        call back into the loop with ``anyio.from_thread``. ``on_cancel()`` runs
        on the loop as soon as the caller is cancelled (the thread is waited for).
        ``statement``: the text of the one statement ``func`` runs (COPY), for its
        span and the per-path count; None for user code (not traced by the pool).

        :raises ConnectionReleased: the connection went back to the pool.
        """
        self.check()
        telemetry = self.telemetry
        traced = telemetry.begin(self.raw, statement) if statement is not None and telemetry.live() else None
        try:
            async with self.turn:
                await self.leave_loop()
                if statement is not None:
                    self.stats.statements_in_threads += 1
                token = traced.in_thread() if traced is not None else None
                try:
                    return await self.offload.run_anyio(func, self.raw, *args, on_cancel=on_cancel)
                except psycopg2.Error as exc:
                    self._saw_error(exc)
                    raise
                finally:
                    if token is not None:
                        traced.out_of_thread(token)  # type: ignore[union-attr]
        except BaseException as exc:
            if traced is not None:
                traced.failed(exc)
            raise
        finally:
            if traced is not None:
                traced.end()

    def _saw_error(self, exc: psycopg2.Error) -> None:
        """A call on the connection raised ``exc``: the transaction's first error
        (TransactionFailed names it), and the pool's judge of the server sees it (a
        read-only server is retired on return)."""
        if self.first_error is None:
            self.first_error = exc
        if self.fit is not None:
            self.fit.saw_error(self.raw, exc)

    # -- the loop-native path (pool option io="auto"/"loop"; pgpool_async._loop.native) --

    def _loop_runner(self) -> StatementRunner | None:
        """The runner for a statement now, entered; None: use a thread. In turn."""
        runner = self.runner
        if runner is not None and runner.entered:
            return runner
        raw = self.raw
        if runner is None:
            runner = self.runner = LoopStatementRunner(raw)
        try:
            runner.enter()
        except NativeUnavailable:
            return None  # e.g. psycopg2 holds a transaction: threads until it ends
        return runner

    @property
    def on_loop(self) -> bool:
        """True while statements of this loan run on the event loop."""
        return self.runner is not None and self.runner.entered

    async def leave_loop(self) -> None:
        """In turn, before psycopg2 code runs: hand the connection back to
        psycopg2 (a transaction opened on the loop is handed over too)."""
        runner = self.runner
        if runner is not None and runner.entered:
            await runner.leave()

    def loop_settled(self) -> bool:
        """The return path, without awaiting: True when nothing is under way on
        the loop (the runner, if entered, stays entered for the next loan: the
        pool lets it go before a thread touches the connection). The caller
        checks the transaction status itself (a transaction open on the loop:
        :meth:`give_back_loop` must run first). False: a call (on the loop or in
        a thread) still runs, or a cancel is on its way."""
        if self.turn.locked():
            return False
        runner = self.runner
        return runner is None or runner.settled

    async def give_back_loop(self) -> None:
        """The return path, in a pool task, the turn idle: end a transaction left
        open on the loop (the pool would roll it back anyway), then leave."""
        runner = self.runner
        if runner is None or not runner.entered:
            return
        with anyio.CancelScope(shield=True):
            if not runner.clean:
                with anyio.move_on_after(4.0):
                    with contextlib.suppress(psycopg2.Error):
                        await runner.reset()
            if runner.entered and not runner.clean:
                runner.close()  # the rollback did not happen: never reuse it
            if runner.entered:
                await runner.leave()

    def check(self) -> None:
        """:raises ConnectionReleased: the connection went back to the pool."""
        if self.detached:
            raise ConnectionReleased(RELEASED)

    def cancel_statement(self) -> Callable[[], None] | None:
        """Ask the server to cancel the statement running on this connection.
        The request opens a connection of its own, so it is sent from a thread of
        its own, with a deadline, GIL released (never psycopg2's ``cancel()``).
        Returns what shuts the socket down if the worker is still busy after a
        grace period (see :mod:`pgpool_async._libpq`)."""
        return _libpq.cancel_in_background(self.raw)


# -- the pool's statement functions, as run on the loop ------------------------------------


def _check_rows(result: Result) -> list[Any]:
    if not result.returns_rows:
        raise psycopg2.ProgrammingError("no results to fetch")  # psycopg2's words
    return result.rows


def _rowcount(result: Result) -> int:
    return result.rowcount


def _first_row(result: Result) -> Any:
    rows = _check_rows(result)
    return rows[0] if rows else None


def _first_value(result: Result) -> Any:
    rows = _check_rows(result)
    return rows[0][0] if rows else None


# How many rows each converts, as psycopg2's fetch after its execute would
# (0 none, 1 the first, -1 all): a value that can't be converted in a row not
# taken raises nothing, as with psycopg2.
_TAKE: dict[Callable[..., Any], int] = {
    blocking.execute: 0,
    blocking.fetchone: 1,
    blocking.fetchall: -1,
    blocking.fetchval: 1,
}

# What blocking.execute/fetch* return, from a loop-path Result.
_EXTRACT: dict[Callable[..., Any], Callable[[Result], Any]] = {
    blocking.execute: _rowcount,
    blocking.fetchone: _first_row,
    blocking.fetchall: _check_rows,
    blocking.fetchval: _first_value,
}


async def _cursor_execute(runner: StatementRunner, cur: Any, sql: Any, params: Any) -> Result:
    """An AsyncCursor's statement on the loop: the result (``query`` included)."""
    return await runner.execute(sql, params, cursor=cur)


async def _commit_sql(runner: StatementRunner, sql: str) -> None:
    """``failover.commit_sql`` on the loop (an explicit COMMIT in autocommit mode)."""
    with failover.commit_in_flight(runner.raw):
        await runner.execute(sql, None)


async def _rollback(runner: StatementRunner) -> None:
    await runner.rollback()


# The calls that commit (Loan.call runs them on the loop as the runner's commit()).
_COMMITS = frozenset({blocking.commit_if_open, failover.commit, PGConnection.commit})

# The loop versions of the pool's other calls (statements go through _EXTRACT,
# commits through _COMMITS; the one-hop helpers' run_and_commit is handled in
# Loan.call itself).
_ON_LOOP: dict[Callable[..., Any], Callable[..., Any]] = {
    failover.commit_sql: _commit_sql,
    blocking.cursor_execute: _cursor_execute,
    PGConnection.rollback: _rollback,
}

# How Loan.call runs each of these on the loop, found with one lookup; a function
# not here runs in a thread.
_STATEMENT, _COMMIT, _HELPER, _OTHER = 1, 2, 3, 4
_ROUTES: dict[Callable[..., Any], int] = {
    **dict.fromkeys(_EXTRACT, _STATEMENT),
    **dict.fromkeys(_COMMITS, _COMMIT),
    blocking.run_and_commit: _HELPER,  # (of a statement function: else run_sync's user code)
    **dict.fromkeys(_ON_LOOP, _OTHER),
}


def run_cursor_method(raw: PGConnection, method: Callable[..., T], sql: Any, *args: Any) -> T:
    """``method(sql, *args)`` in a worker thread: a psycopg2 cursor's ``execute`` or
    ``executemany`` that the loop path does not run (its span, per-path count and
    SQL comment come from ``sql``, as for the pool's other statement functions)."""
    return method(sql, *args)


def _with_sql_comment(
    statement: Any, raw: PGConnection, func: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[Any, ...]:
    """``args`` with the statement's text commented as OpenTelemetry's psycopg2
    instrumentation would comment it (its SQL commenter on), else unchanged: the
    instrumentation itself adds nothing where the pool makes the span."""
    commenter = sql_commenter(raw)
    if commenter is None:
        return args
    where = _STATEMENT_TEXT[func]
    if isinstance(where, str):
        return args  # (COMMIT/ROLLBACK: psycopg2's commit() and rollback() carry no comment)
    index = 1 if where == _HELPER_TEXT else where
    return (*args[:index], statement.commented(args[index], commenter), *args[index + 1 :])


def _statement_of(func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """The statement text of a :meth:`Loan.call` (for its span and the per-path
    count), or None when the call is not a statement of the pool's (user code,
    a session setting)."""
    where = _STATEMENT_TEXT.get(func)
    if where is None:
        return None
    if where == _HELPER_TEXT:
        return args[1] if args[0] in _EXTRACT else None  # (else run_sync's user code)
    return where if isinstance(where, str) else args[where]


_HELPER_TEXT = -1
# Where each statement function's text is: an index into its arguments, the
# text itself, or _HELPER_TEXT (the one-hop helpers: run_and_commit(helper, sql, params)).
_STATEMENT_TEXT: dict[Callable[..., Any], int | str] = {
    **dict.fromkeys(_EXTRACT, 0),
    **dict.fromkeys(_COMMITS, "COMMIT"),
    PGConnection.rollback: "ROLLBACK",
    failover.commit_sql: 0,
    blocking.cursor_execute: 1,
    blocking.run_and_commit: _HELPER_TEXT,
    run_cursor_method: 1,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
