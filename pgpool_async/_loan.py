"""One loan of a pooled connection: the interface every call on it goes through.

:class:`Loan` is what :mod:`~pgpool_async.connection`,
:mod:`~pgpool_async.cursor`, :mod:`~pgpool_async.copying` and
:mod:`~pgpool_async.notifications` use to run calls on a lent psycopg2
connection: ``raw``, :meth:`Loan.call` (the pool's own calls, in its worker
threads), :meth:`Loan.call_user` (user code, which may call back into the
loop), the :class:`Turn` that keeps calls one at a time, and what the loan
changed that the pool must undo on return. It is the one place where a second
way to run a statement (on the event loop, through libpq) can plug in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import psycopg2
from psycopg2.extensions import connection as PGConnection

from . import _libpq
from ._loop.failover import ServerFit
from ._thread.offload import Offloader
from .errors import ConnectionReleased

__all__ = ["RELEASED", "Loan", "Turn"]

T = TypeVar("T")

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
        self._waiters: deque[anyio.Event] = deque()
        self._idle: anyio.Event | None = None

    def locked(self) -> bool:
        return self._busy

    async def __aenter__(self) -> None:
        if not self._busy:
            self._busy = True
            return
        turn = anyio.Event()
        self._waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self._release()  # handed the turn while being cancelled
            else:
                self._waiters.remove(turn)
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

    __slots__ = ("detached", "fit", "listened", "offload", "raw", "session_changed", "turn", "tx_depth")

    def __init__(self, raw: PGConnection, offload: Offloader) -> None:
        self.detached = False  # the connection went back to the pool
        self.raw = raw
        self.offload = offload
        self.turn = Turn()
        self.tx_depth = 0  # open transaction() blocks
        self.session_changed = False  # set_session() was called: reset on return
        self.listened = False  # LISTEN was sent: UNLISTEN * on return
        # The pool's judge of "this server can no longer serve the pool" (failover.py).
        self.fit: ServerFit | None = None

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """``func(raw, *args)`` in a worker thread, in turn. For calls that never
        call back into the loop. If the caller is cancelled meanwhile, the
        server is asked to cancel the running statement, the thread is waited
        for, then the cancellation is raised.

        :raises ConnectionReleased: the connection went back to the pool.
        """
        self.check()
        async with self.turn:
            try:
                return await self.offload.run(func, self.raw, *args, on_cancel=self.cancel_statement)
            except psycopg2.Error as exc:
                if self.fit is not None:
                    self.fit.saw_error(self.raw, exc)  # a read-only server is retired on return
                raise

    async def call_user(
        self, func: Callable[..., T], *args: Any, on_cancel: Callable[[], object] | None = None
    ) -> T:
        """``func(raw, *args)`` in an anyio worker thread, in turn: ``func`` may
        call back into the loop with ``anyio.from_thread``. ``on_cancel()`` runs
        on the loop as soon as the caller is cancelled (the thread is waited for).

        :raises ConnectionReleased: the connection went back to the pool.
        """
        self.check()
        async with self.turn:
            try:
                return await self.offload.run_anyio(func, self.raw, *args, on_cancel=on_cancel)
            except psycopg2.Error as exc:
                if self.fit is not None:
                    self.fit.saw_error(self.raw, exc)
                raise

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
