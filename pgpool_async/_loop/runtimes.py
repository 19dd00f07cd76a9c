"""Waiting on a connection's socket, one waiter per runtime, chosen once.

The loop-native runner (:mod:`~pgpool_async._loop.native`) advances a
statement with libpq calls that never wait (its ``pump``); how the task waits
between two of them is the runtime's business, and only that lives here:

- :class:`AsyncioWaiter`: the socket is watched with ``add_reader`` for as long
  as the runner holds the connection; a reader callback pumps the statement and
  wakes the task once, when it is over (one future per statement). A cancelled
  task asks the server to cancel, then waits on futures that refuse
  cancellation (:class:`_Uncancellable`) until the statement is over or
  ``cancel_grace`` has passed (then the runner closes the connection).
  uvloop stops watching a socket with an error (``EPOLLERR``: a reset
  connection, a TCP timeout) without calling the reader, so on uvloop the
  statement is also pumped once right after it is sent and then every
  :data:`UVLOOP_RECHECK` seconds while it waits: an error there ends it.
- :class:`TrioWaiter`: ``trio.lowlevel.wait_readable``/``wait_writable`` per
  wait; a cancelled task waits for the statement's end in a shielded scope
  bounded by ``cancel_grace``.

:func:`waiter_for` picks one for the loop running now.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import PoolError

__all__ = ["UVLOOP_RECHECK", "AsyncioWaiter", "Pumped", "TrioWaiter", "Waiter", "on_loop", "waiter_for"]

#: Seconds between two looks at a statement's socket on uvloop (see above).
UVLOOP_RECHECK = 1.0


class Pumped(Protocol):
    """What a waiter drives: the runner's steps that never wait."""

    @property
    def entered(self) -> bool: ...

    @property
    def flushing(self) -> bool: ...

    def pump(self) -> bool:
        """Advance the statement as far as libpq can without waiting; True when over."""

    def cancel_requested(self) -> None:
        """Ask the server to cancel the statement (once)."""

    def close(self) -> None:
        """Close the connection (a waiting statement ends)."""


class Waiter(Protocol):
    """How a runner waits, on the runtime it was entered on."""

    #: asyncio's loop, or None (trio).
    loop: asyncio.AbstractEventLoop | None

    @property
    def quiet(self) -> bool:
        """True when the socket is watched and nothing arrived since the last statement."""

    def watch(self, fd: int) -> None:
        """The runner took the connection whose socket is ``fd``."""

    def unwatch(self) -> None:
        """The runner gave the connection back: stop watching, leave the socket open."""

    def closing(self) -> None:
        """The socket is about to be closed: stop watching; a waiting statement wakes."""

    def wake(self) -> None:
        """The connection was closed: end the wait of the statement in flight."""

    async def statement(self, flushing: bool) -> None:
        """Wait until the statement just sent is over (``pump()`` said so), the
        rest of the query still to be written if ``flushing``. A cancellation
        is delivered only once the statement is over."""

    def stop_writing(self) -> None:
        """The query is written: stop waiting for the socket to be writable."""

    def cancel_notice(self) -> tuple[Any, Callable[[bool], object]]:
        """An awaitable-ish token and the callback (from any thread) that sets it."""

    def arm_abort(self, grace: float) -> None:
        """Close the connection if the cancelled statement is not over in ``grace`` seconds."""

    def disarm_abort(self) -> None: ...

    async def settle(self, sent: Any, grace: float) -> bool:
        """Wait for ``sent`` (see :meth:`cancel_notice`); False if ``grace`` passed first."""

    async def checkpoint(self) -> None:
        """Let the loop run other tasks."""


class _Uncancellable(asyncio.Future[None]):
    """The wait for a cancelled statement to end: ``cancel()`` is refused, so a
    cancellation arriving meanwhile (anyio re-delivers one every loop turn) does
    not wake the task until the statement is over: asyncio delivers a refused
    cancellation when the future completes."""

    __slots__ = ()

    def cancel(self, msg: Any = None) -> bool:
        return False


class AsyncioWaiter:
    """Waits on asyncio (and uvloop): a reader callback walks the protocol."""

    __slots__ = (
        "_abort_handle",
        "_fd",
        "_fut",
        "_reader_off",
        "_recheck_handle",
        "_runner",
        "_uvloop",
        "_writing",
        "loop",
    )

    def __init__(self, runner: Pumped, loop: asyncio.AbstractEventLoop) -> None:
        self.loop: asyncio.AbstractEventLoop | None = loop
        self._runner = runner
        self._uvloop = type(loop).__module__.split(".")[0] == "uvloop"
        self._recheck_handle: asyncio.TimerHandle | None = None
        self._fd = -1
        self._fut: asyncio.Future[None] | None = None
        self._reader_off = False
        self._writing = False
        self._abort_handle: asyncio.TimerHandle | None = None

    @property
    def quiet(self) -> bool:
        return not self._reader_off

    def watch(self, fd: int) -> None:
        self._fd = fd
        self._loop().add_reader(fd, self._on_readable)

    def unwatch(self) -> None:
        self._loop().remove_reader(self._fd)  # (a writer is only ever added mid-statement)

    def closing(self) -> None:
        loop = self._loop()
        loop.remove_reader(self._fd)
        loop.remove_writer(self._fd)
        self._writing = False

    def wake(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)  # the statement in flight ends: the runner reports the close

    async def statement(self, flushing: bool) -> None:
        loop, fd = self._loop(), self._fd
        if self._reader_off:
            self._reader_off = False
            loop.add_reader(fd, self._on_readable)
        if self._uvloop:
            if self._runner.pump():  # (an error already on the socket: uvloop won't call us)
                return
            self._recheck_handle = loop.call_later(UVLOOP_RECHECK, self._recheck)
        # One plain future per statement (the task awaits it on asyncio's fast
        # path); the reader callback walks the protocol and sets it when done.
        fut = loop.create_future()
        self._fut = fut
        if flushing:
            self._writing = True
            loop.add_writer(fd, self._on_writable)
        try:
            await fut
        except asyncio.CancelledError:
            # The task was cancelled: the cancellation is delivered only once the
            # statement is over (cancelled on the server, or the connection closed).
            runner = self._runner
            if runner.entered and not runner.pump():
                await self._drain_cancelled()
            raise
        finally:
            self._fut = None
            if self._recheck_handle is not None:
                self._recheck_handle.cancel()
                self._recheck_handle = None

    def _recheck(self) -> None:
        """uvloop: look at the socket ourselves (see the module's docstring)."""
        self._recheck_handle = None
        fut = self._fut
        if fut is None or fut.done() or not self._runner.entered:
            return
        if self._runner.pump():
            fut.set_result(None)
            return
        self._recheck_handle = self._loop().call_later(UVLOOP_RECHECK, self._recheck)

    async def _drain_cancelled(self) -> None:
        """Ask the server to cancel the statement, then wait (at most
        ``cancel_grace``: the abort closes the connection then) until it is
        over; further cancellations meanwhile are folded into the one the caller
        raises next."""
        runner = self._runner
        runner.cancel_requested()
        while runner.entered and not runner.pump():  # (pump is idempotent once over)
            fut = _Uncancellable(loop=self._loop())
            self._fut = fut
            with contextlib.suppress(asyncio.CancelledError):  # (raised by the caller next)
                await fut

    def _on_readable(self) -> None:
        """The reader: walk the protocol; wake the task only when done."""
        fut = self._fut
        if fut is None:
            # Between statements: a NOTIFY, a parameter change, or a closing
            # server. Leave it in the socket, where psycopg2 would find it, and
            # stop watching until the next statement (else the loop would call
            # us again and again): the next statement reads it first, as
            # psycopg2's would.
            self._reader_off = True
            self._loop().remove_reader(self._fd)
            return
        if self._runner.pump() and not fut.done():
            fut.set_result(None)

    def _on_writable(self) -> None:
        fut = self._fut
        if fut is None or not self._runner.entered:
            return
        if self._runner.pump() and not fut.done():
            fut.set_result(None)

    def stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop().remove_writer(self._fd)

    def cancel_notice(self) -> tuple[Any, Callable[[bool], object]]:
        loop = self._loop()
        sent = loop.create_future()

        def settle() -> None:
            if not sent.done():
                sent.set_result(None)

        def done(_delivered: bool) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle)

        return sent, done

    def arm_abort(self, grace: float) -> None:
        self._abort_handle = self._loop().call_later(grace, self._abort)

    def disarm_abort(self) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None

    def _abort(self) -> None:
        """The cancelled statement did not end in time: close the connection."""
        self._abort_handle = None
        fut = self._fut
        if fut is None or fut.done():
            return
        self._runner.close()  # (wakes the statement)

    async def settle(self, sent: Any, grace: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(sent), grace)
        except asyncio.TimeoutError:
            return False
        return True

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        assert loop is not None
        return loop


class TrioWaiter:
    """Waits on trio: ``wait_readable``/``wait_writable`` per wait."""

    __slots__ = ("_fd", "_grace", "_runner", "loop")

    def __init__(self, runner: Pumped, grace: float) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._runner = runner
        self._grace = grace
        self._fd = -1

    @property
    def quiet(self) -> bool:
        return False  # (nothing watches an idle socket on trio)

    def watch(self, fd: int) -> None:
        self._fd = fd

    def unwatch(self) -> None:
        pass

    def closing(self) -> None:
        import trio

        trio.lowlevel.notify_closing(self._fd)  # a waiting statement wakes (and ends)

    def wake(self) -> None:
        pass  # (closing() woke it)

    async def statement(self, flushing: bool) -> None:
        import trio

        runner, fd = self._runner, self._fd
        try:
            while not runner.pump():
                if runner.flushing:
                    # The server may be writing to us while we write to it: read now and then.
                    with trio.move_on_after(0.05):
                        await trio.lowlevel.wait_writable(fd)
                else:
                    await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:
            return  # closed under us (release()): the runner reports it
        except trio.Cancelled:
            runner.cancel_requested()
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._grace
                while runner.entered and not runner.pump():
                    await trio.lowlevel.wait_readable(fd)
            if scope.cancelled_caught:
                runner.close()
            raise

    def stop_writing(self) -> None:
        pass

    def cancel_notice(self) -> tuple[Any, Callable[[bool], object]]:
        import trio

        sent = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def done(_delivered: bool) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(sent.set)

        return sent, done

    def arm_abort(self, grace: float) -> None:
        pass  # (statement()'s shielded scope has the deadline)

    def disarm_abort(self) -> None:
        pass

    async def settle(self, sent: Any, grace: float) -> bool:
        import trio

        with trio.move_on_after(grace):
            await sent.wait()
            return True
        return False

    async def checkpoint(self) -> None:
        import trio

        await trio.lowlevel.checkpoint()


def waiter_for(runner: Pumped, grace: float) -> Waiter:
    """The waiter for the event loop running now.

    :raises PoolError: neither an asyncio nor a trio loop is running.
    """
    try:
        return AsyncioWaiter(runner, asyncio.get_running_loop())
    except RuntimeError:
        pass
    try:
        import trio
    except ImportError:
        trio = None  # type: ignore[assignment]
    if trio is not None and trio.lowlevel.in_trio_run():
        return TrioWaiter(runner, grace)
    raise PoolError("LoopStatementRunner runs on an asyncio or trio event loop: none is running")


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """True when called on ``loop``'s thread, while it runs."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
