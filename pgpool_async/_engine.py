"""An async face over a ``ThreadedConnectionPool``: the engine's connections, its budget.

:meth:`AsyncConnectionPool.over(engine) <pgpool_async.AsyncConnectionPool.over>`
builds an :class:`EngineFace`. The engine (psycopg2's ``ThreadedConnectionPool``,
this package's, or a subclass of either) owns the connections and their count:
``maxconn`` counts what threads hold and what tasks hold. The face owns only
its borrowers: a :class:`~._loop.ledger.Ledger` of the connections it holds
(taken from the engine, lent to a task, given back), its queue of waiting
tasks, and the loans (statements on the loop or in threads, as any pool's).

Taking (one path per kind of engine):

- this package's engine: on the loop, under its lock, without I/O: the
  connection lent under a key, an idle one, a free slot (a connection is then
  opened in a worker thread) or a place in the engine's FIFO queue, shared
  with threads waiting in ``getconn(timeout=...)``; a return from either side
  hands the connection to the first in line, on the loop through a
  thread-safe callback.
- psycopg2's (or any other): ``getconn`` in a worker thread (it connects under
  its lock), one request at a time in the face's FIFO order; "exhausted", the
  request waits until the engine's ``putconn`` (wrapped on the instance to
  tell the face, whoever calls it) or ``closeall`` is called, then tries again.

Giving back: the face keeps nothing idle. :func:`~._loop.ledger.decide_return`
decides: clean, to this package's engine, checked in on the loop
(``Return.ENGINE``); otherwise, in a pool task and a worker thread, rolled back
and reset, then the engine's ``putconn`` (``close=True`` if broken).

Every connection a request takes is handed through a
:class:`~._loop.waiting.Waiter`, so a request cancelled or timed out at any
await never swallows one: what it was handed goes back to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import anyio
import anyio.lowlevel
import psycopg2.extensions
import psycopg2.pool
from psycopg2.extensions import connection as PGConnection

from . import sync
from ._config import check_timeout
from ._libpq import shutdown_sockets, was_shut_down
from ._loan import Loan
from ._loop import native
from ._loop.health import Health, looks_alive
from ._loop.ledger import Return, Slot, SlotState, decide_return
from ._loop.waiting import Waiter, current_time
from ._thread.blocking import close_quietly
from .connection import AsyncConnection
from .errors import PoolClosed, PoolConfigError, PoolError, TooManyRequests
from .pool import AsyncConnectionPool, _ConnectionContext

__all__ = ["EngineFace", "check_engine"]

logger = logging.getLogger("pgpool_async")
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_PSYCOPG2_READY = psycopg2.extensions.STATUS_READY
_RESET = Health.build(None, 1.0, None, None, None, None)  # rollback, set_session, UNLISTEN: no hooks


def check_engine(engine: Any) -> None:
    """Refuse what cannot be an engine, saying what to pass instead.

    :raises PoolConfigError: not a ``ThreadedConnectionPool`` (a
        ``SimpleConnectionPool`` is not thread-safe: a face calls it from worker threads).
    :raises PoolClosed: the engine is closed.
    """
    if isinstance(engine, psycopg2.pool.SimpleConnectionPool):
        raise PoolConfigError(
            f"{type(engine).__name__} is not thread-safe (a SimpleConnectionPool has no lock) and an "
            "async face calls its engine from worker threads: use a ThreadedConnectionPool "
            "(psycopg2.pool's or pgpool_async's) as the engine"
        )
    if not isinstance(engine, psycopg2.pool.ThreadedConnectionPool):
        raise PoolConfigError(
            f"over() takes a ThreadedConnectionPool (psycopg2.pool's, pgpool_async's, or a subclass), "
            f"got {type(engine).__name__}; to pool connections of its own use AsyncConnectionPool(...)"
        )
    if engine.closed:
        raise PoolClosed("the engine is closed (closeall() was called): give over() an open pool")


def _threadsafe_caller() -> Callable[..., None]:
    """``call(fn, *args)``: run ``fn(*args)`` soon on the current event loop,
    from any thread (a no-op once the loop is gone: nobody waits then)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        token = trio.lowlevel.current_trio_token()

        def call_trio(fn: Callable[..., object], *args: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(fn, *args)

        return call_trio

    loop_thread = threading.get_ident()

    def call_asyncio(fn: Callable[..., object], *args: Any) -> None:
        if threading.get_ident() == loop_thread:  # a task's return: no wake-up write needed
            loop.call_soon(fn, *args)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(fn, *args)

    return call_asyncio


#: Set while a face's worker thread calls the engine's putconn: that return is not a
#: thread's, and is not taken for a waiting task (see EngineFace._grab_for_first).
_face_return = threading.local()


def _put_back(engine: Any, raw: PGConnection, close: bool, session_changed: bool, listened: bool) -> None:
    """In a worker thread: make ``raw`` clean (rollback, ``set_session``
    defaults, ``UNLISTEN *``) and give it to the engine's ``putconn``; closed
    there (``close=True``) if it is broken or could not be made clean. An
    engine that no longer takes it (closed meanwhile: psycopg2 raises) gets
    nothing: it is closed here."""
    if not close and not raw.closed:
        close = _RESET.reset_in_thread(raw, bool(raw.autocommit), session_changed, listened) is not True
    _face_return.active = True
    try:
        engine.putconn(raw, close=close or bool(raw.closed))
    except Exception:  # psycopg2: the engine is closed, or the connection not its own any more
        close_quietly(raw)
    finally:
        _face_return.active = False


def _forget_lent(engine: Any, raws: list[PGConnection]) -> None:
    """Take connections a dropped face held off the engine's books (they are
    being closed): its budget is whole again."""
    if isinstance(engine, sync._Engine):
        for raw in raws:
            engine._forget(raw)
        return
    with engine._lock:  # psycopg2's documented state, as its _putconn keeps it
        for raw in raws:
            key = engine._rused.pop(id(raw), None)
            if key is not None:
                engine._used.pop(key, None)


class _Hook:
    """psycopg2's engine tells no one of a return: its instance's ``putconn``
    and ``closeall`` are wrapped (once per engine, while a face is open) to
    call each open face's listener, whoever called them (a thread, a task)."""

    def __init__(self, engine: Any) -> None:
        self.listeners: list[Callable[[], None]] = []
        self.engine = engine
        putconn, closeall = engine.putconn, engine.closeall

        def tell() -> None:
            for listener in list(self.listeners):
                listener()

        def putconn_and_tell(*args: Any, **kwargs: Any) -> Any:
            try:
                return putconn(*args, **kwargs)
            finally:
                tell()

        def closeall_and_tell(*args: Any, **kwargs: Any) -> Any:
            try:
                return closeall(*args, **kwargs)
            finally:
                tell()

        self.wrappers = (putconn_and_tell, closeall_and_tell)
        engine.putconn, engine.closeall = self.wrappers

    def unwrap(self) -> None:
        engine = self.engine
        if engine.__dict__.get("putconn") is self.wrappers[0]:
            del engine.putconn
        if engine.__dict__.get("closeall") is self.wrappers[1]:
            del engine.closeall


_hooks: weakref.WeakKeyDictionary[Any, _Hook] = weakref.WeakKeyDictionary()
_hooks_lock = threading.Lock()


def _listen(engine: Any, listener: Callable[[], None]) -> None:
    with _hooks_lock:
        hook = _hooks.get(engine)
        if hook is None:
            hook = _hooks[engine] = _Hook(engine)
        hook.listeners.append(listener)


def _unlisten(engine: Any, listener: Callable[[], None]) -> None:
    with _hooks_lock:
        hook = _hooks.get(engine)
        if hook is None or listener not in hook.listeners:
            return
        hook.listeners.remove(listener)
        if not hook.listeners:
            hook.unwrap()
            del _hooks[engine]


class _Request:
    """A task's request queued in this package's engine (its FIFO, with threads)."""

    __slots__ = ("claimed", "engine_waiter", "face", "key", "waiter")

    def __init__(self, face: EngineFace, key: Hashable | None) -> None:
        self.face = face
        self.key = key
        self.waiter: Waiter | None = None  # the face's: deadline, cancellation
        self.engine_waiter: sync.Waiter | None = None
        # Set (on the loop) by whichever of the hand-off and the giving up comes
        # first: the other then does nothing.
        self.claimed = False

    def wake(self) -> None:
        """The engine served this request (called under its lock, any thread)."""
        face = self.face
        if threading.get_ident() == face._loop_thread and face._serve_now(self):
            return  # (a task's return handed it on: no loop round trip)
        face._call_soon(face._engine_served, self)


class EngineFace(AsyncConnectionPool):
    """An :class:`AsyncConnectionPool` whose connections are a ``ThreadedConnectionPool``'s.

    Build it with :meth:`AsyncConnectionPool.over`; see :mod:`pgpool_async._engine`.
    Everything a pool offers works on its connections (statements on the loop
    or in threads, cursors, transactions, COPY, LISTEN, the one-hop helpers,
    ``run_sync``, stats), except what belongs to the engine: its sizes
    (``resize``), its connections' lifetimes (``drain``), ``configure`` and
    ``reset`` hooks (give the engine a subclass with ``_connect``).
    """

    def __init__(
        self,
        engine: Any,
        *,
        timeout: float = 30.0,
        max_waiting: int = 0,
        name: str | None = None,
        io: str | None = None,
        leak_threshold: float | None = None,
    ) -> None:
        check_engine(engine)
        args, kwargs = getattr(engine, "_args", ()), dict(getattr(engine, "_kwargs", {}))
        options: dict[str, Any] = dict(
            timeout=timeout,
            max_waiting=max_waiting,
            name=name,
            io=io,
            leak_threshold=leak_threshold,
            max_lifetime=None,
            max_idle=None,
        )
        try:  # the engine's connect arguments, for repr and log lines (redacted)
            super().__init__(0, engine.maxconn, *args, **kwargs, **options)
        except PoolConfigError:  # (a subclass's own arguments): no description then
            super().__init__(0, engine.maxconn, **options)
        self._engine = engine
        # This package's engine: checked out and in on the loop, and one FIFO
        # queue with its threads. Any other: worker threads and a wrapped putconn.
        self._native = isinstance(engine, sync._Engine)
        self._ledger.serve_no_queue()
        self._call_soon: Callable[..., None] = _no_loop
        self._loop_thread = -1  # the event loop's thread, once open
        # psycopg2's engine: requests taken one at a time, in order.
        self._queue: deque[tuple[Waiter, Hashable | None]] = deque()
        self._taking = False
        self._returns = 0  # engine returns seen (any thread): a request retries after one
        self._returned: anyio.Event | None = None
        self._listener: Callable[[], None] | None = None
        self._starter: _Later | None = None  # starts tasks asked for from loop callbacks
        # The slot (and its loop-native runner) of each engine connection this face
        # has lent, by id: made once per connection, not per loan.
        self._slots: dict[int, Slot] = {}

    @property
    def engine(self) -> Any:
        """The ``ThreadedConnectionPool`` whose connections this face lends."""
        return self._engine

    # -- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        """Start serving; takes nothing from the engine (which keeps its own
        ``minconn``), so it opens at once even while threads hold every connection.

        :raises PoolClosed: the face was closed, or the engine is closed.
        """
        if self._engine.closed:
            raise PoolClosed("the engine is closed (closeall() was called): give over() an open pool")
        first = not self._opened and not self.closed
        await super().open()
        if first:
            self._call_soon = _threadsafe_caller()
            self._loop_thread = threading.get_ident()
            self._starter = _Later(self._tasks)
            self._tasks.spawn(self._starter.run)
            if not self._native:
                self._returned = anyio.Event()
                # Held by the engine's hook: weakly, so a face dropped unclosed is collected.
                face = weakref.ref(self)
                call_soon = self._call_soon

                def listener() -> None:  # any thread
                    alive = face()
                    if alive is not None:
                        alive._returns += 1
                        alive._grab_for_first()
                        del alive
                        call_soon(_kick_weakly, face)

                self._listener = listener
                _listen(self._engine, listener)

    async def close(self, timeout: float = 5.0) -> None:
        """End the async face, not the engine (its owner closes it): waiting
        requests get :class:`PoolClosed`; connections lent to tasks get up to
        ``timeout`` seconds to come back, then their sockets are shut down (a
        ``connection()`` block still running raises :class:`PoolClosed`) and
        they go back to the engine closed (``putconn(conn, close=True)``), so
        the engine's budget is whole again. Safe to call twice, and concurrently;
        cancelling it stops the waiting, not the closing.
        """
        await super().close(timeout)

    async def closeall(self) -> None:
        """Close the face as :meth:`close` with no grace (connections lent to
        tasks are closed now), then the engine: its ``closeall()`` in a worker
        thread, which closes every connection it has, those threads hold included.

        :raises PoolClosed: the face was already closed.
        :raises psycopg2.pool.PoolError: the engine was already closed (psycopg2's error).
        """
        if self.closed:
            raise PoolClosed(f"connection pool is closed (pool {self.name!r})")
        await super().closeall()
        await anyio.to_thread.run_sync(self._engine.closeall)

    async def _finish_closing(self, idle: list[Slot], timeout: float, done: anyio.Event) -> None:
        """The face's closing, in a pool task (see :meth:`close`)."""
        try:
            empty = anyio.Event()
            self._ledger.when_empty(empty.set)
            with anyio.move_on_after(timeout):
                await empty.wait()
            lent = list(self._ledger.lent())  # (returning ones: their return gives them back)
            self._ledger.close_lent()
            for slot in lent:
                native.release(slot.raw)  # a statement running on the loop ends now
                if not slot.raw.closed:
                    anyio.notify_closing(slot.raw)  # wakes a notifies() waiting on its socket
            shutdown_sockets(s.raw for s in lent)  # a worker blocked on a dead network fails now
            for slot in lent:
                await self._offload.run_return(_put_back, self._engine, slot.raw, True, False, False)
        finally:
            self._stop_listening()
            self._offload.shutdown()
            done.set()
            self._tasks.stop()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            _unlisten(self._engine, self._listener)
            self._listener = None

    async def resize(self, minconn: int, maxconn: int) -> None:
        """:raises PoolError: always: the engine's sizes are the budget; a face has none."""
        raise PoolError("a face over an engine has no sizes of its own: size the engine instead")

    async def drain(self) -> None:
        """:raises PoolError: always: the engine owns its connections' lifetimes."""
        raise PoolError("a face over an engine replaces no connections: the engine owns them")

    def __del__(self) -> None:
        """Dropped open (never closed): the base pool warns and closes the
        connections lent to tasks; the engine is told they are gone, so its
        ``_used`` keeps none that nobody holds."""
        listener = getattr(self, "_listener", None)
        if listener is not None:
            _unlisten(self._engine, listener)
        if getattr(self, "_opened", False) and self._closed_done is None:
            lent = [slot.raw for slot in self._ledger.lent()]
            if lent:
                # In a thread of its own: garbage collection may run here while this
                # thread holds the engine's lock.
                threading.Thread(target=_forget_lent, args=(self._engine, lent), daemon=True).start()
        super().__del__()

    # -- taking -----------------------------------------------------------------

    async def _checkout(
        self, key: Hashable | None, timeout: float | None, into: _ConnectionContext | None
    ) -> AsyncConnection:
        self._check_serving()
        wait = self.timeout if timeout is None else check_timeout("timeout", timeout)
        self._stats.requests_num += 1
        conn = self._held(key) if key is not None else None
        if conn is None:
            if key is not None and key in self._engine._used:
                raise PoolError(
                    f"the key {key!r} is lent by the engine to a thread: a task cannot share it; "
                    "use another key"
                )
            take = self._take_native if self._native else self._take_foreign
            conn = self._lend(await take(key, wait))
        if into is not None:
            into._conn = conn
        return conn

    def _check_queue_room(self) -> None:
        if self.max_waiting and len(self._waiting) >= self.max_waiting:
            self._stats.requests_errors += 1
            raise TooManyRequests(
                f"pool {self.name!r}: {len(self._waiting)} requests are already waiting for a "
                f"connection (max_waiting={self.max_waiting}): raise max_waiting or the engine's "
                "maxconn, or retry later"
            )

    async def _take_native(self, key: Hashable | None, wait: float) -> Slot:
        """From this package's engine: on the loop if one is ready, else in its queue."""
        engine = self._engine
        deadline = current_time() + wait
        while True:  # each pass that does not return drops a broken idle connection
            request = _Request(self, key)
            try:
                got = engine._take_or_queue(key, request.wake, self)
            except PoolClosed as exc:
                raise PoolClosed(f"the engine of pool {self.name!r} is closed") from exc
            if isinstance(got, (sync.Waiter, sync._Reserved)):
                return await self._wait_for(request, got, deadline, wait)
            assert isinstance(got, PGConnection)
            if not looks_alive(got):
                self._stats.connections_lost += 1
                engine._forget(got)
                self._close_off_loop([got])
                continue
            slot = self._adopt(got, key)
            try:
                await anyio.lowlevel.checkpoint()  # every call is a checkpoint (trio's rule)
            except BaseException:
                self._give_back_unused(slot)
                raise
            return slot

    async def _wait_for(
        self, request: _Request, got: sync.Waiter | sync._Reserved, deadline: float, wait: float
    ) -> Slot:
        """Wait for the engine to serve ``request`` (queued there: ``got`` is its
        waiter), or for a connection opened in the slot it reserved."""
        if isinstance(got, sync.Waiter):
            request.engine_waiter = got
            try:
                self._check_queue_room()
            except BaseException:
                self._abandon(request)
                raise
        self._stats.requests_queued += 1
        request.waiter = self._waiting.push(request.key, deadline, wait)
        if got is sync.RESERVED:
            self._spawn_open(request)
        return await self._await_waiter(request.waiter, functools.partial(self._abandon, request))

    async def _await_waiter(self, waiter: Waiter, abandon: Callable[[], None]) -> Slot:
        """Wait to be handed a slot; whatever ends the wait early (timeout,
        cancellation of any kind, the face closing), nothing stays taken."""
        try:
            await waiter.signalled()
            return waiter.result()
        except BaseException as exc:
            handed = self._waiting.leave(waiter)
            abandon()
            if handed is not None:
                self._give_back_unused(handed)
            if isinstance(exc, PoolClosed):
                self._stats.requests_errors += 1
            raise

    def _abandon(self, request: _Request) -> None:
        """A request gives up (on the loop): out of the engine's queue, or what
        the engine handed it meanwhile goes back."""
        if request.claimed:
            return
        request.claimed = True
        if request.engine_waiter is None:
            return  # (a connection being opened for it: _deliver gives it back)
        got = self._engine._leave_queue(request.engine_waiter)
        if got is sync.RESERVED:
            self._engine._release_slot()
        elif isinstance(got, PGConnection):
            self._engine_checkin(got)

    def _serve_now(self, request: _Request) -> bool:
        """The common hand-off, done at once on the loop thread, under the engine's
        lock: a connection to a request still waiting. Anything else (which may
        need that lock) returns False, for :meth:`_engine_served` to do soon."""
        got = request.engine_waiter.result if request.engine_waiter is not None else None
        waiter = request.waiter
        if request.claimed or not isinstance(got, PGConnection) or waiter is None or waiter.done:
            return False
        request.claimed = True
        self._waiting.serve(waiter, self._adopt(got, request.key))
        return True

    def _engine_served(self, request: _Request) -> None:
        """On the loop, after the engine handed ``request`` something."""
        if request.claimed:
            return  # it gave up first and took care of it
        assert request.engine_waiter is not None
        got = request.engine_waiter.result
        if isinstance(got, PoolClosed):
            request.claimed = True
            self._serve(request, error=PoolClosed(f"the engine of pool {self.name!r} was closed"))
        elif got is sync.RESERVED:
            request.engine_waiter = None  # (nothing to leave: the slot is its own now)
            self._spawn_open(request)
        else:
            assert isinstance(got, PGConnection)
            self._deliver(request, got)

    def _spawn_open(self, request: _Request) -> None:
        def instead() -> None:  # the face's tasks are gone
            self._engine._release_slot()
            if not request.claimed:
                request.claimed = True
                self._serve(request, error=PoolClosed(f"pool {self.name!r} is closed"))

        self._later(instead, self._open_for, request)

    def _later(self, instead: Callable[[], object], func: Callable[..., Any], *args: Any) -> None:
        """Start ``func(*args)`` as a pool task, from anywhere on the loop thread:
        a loop callback too (the engine's hand-offs arrive as callbacks, where
        anyio cannot start a task), through :class:`_Later`. ``instead()`` runs
        if the face's tasks are gone (closed) before it starts."""
        later = self._starter
        if later is None or not self._tasks.running:
            instead()
        else:
            later.add(instead, func, args)

    async def _open_for(self, request: _Request) -> None:
        """Open a connection in the engine's slot reserved for ``request``."""
        engine = self._engine
        try:
            with anyio.CancelScope(shield=True):  # (the face closing: finish, then give it back)
                raw = await self._offload.run(engine._open_connection)
        except Exception as exc:
            engine._release_slot()
            if not request.claimed:
                request.claimed = True
                self._serve(request, error=exc)
            return
        if not engine._adopt(raw, request.key):  # the engine was closed meanwhile
            await self._offload.run_return(close_quietly, raw)
            if not request.claimed:
                request.claimed = True
                self._serve(request, error=PoolClosed(f"the engine of pool {self.name!r} was closed"))
            return
        self._deliver(request, raw)

    def _deliver(self, request: _Request, raw: PGConnection) -> None:
        """``raw``, lent by the engine under the request's key, to its waiter."""
        if request.claimed:
            self._engine_checkin(raw)  # it gave up meanwhile: unused, clean
            return
        request.claimed = True
        slot = self._adopt(raw, request.key)
        assert request.waiter is not None
        if not self._waiting.serve(request.waiter, slot):
            self._give_back_unused(slot)

    def _serve(self, request: _Request, error: BaseException) -> None:
        if request.waiter is not None:
            self._waiting.serve(request.waiter, error=error)

    def _adopt(self, raw: PGConnection, key: Hashable | None) -> Slot:
        """A connection just taken from the engine, on the face's books, lent under
        ``key``, in the slot (with the loop-native runner) it had last time here,
        if any: made once per connection, not per loan (a runner is only let go
        between loans)."""
        slots = self._slots
        before = slots.get(id(raw))
        slot = self._ledger.adopt(raw, key, before)
        if slot is not before:
            if len(slots) >= 2 * self.maxconn:  # connections the engine dropped since
                self._slots = slots = {k: s for k, s in slots.items() if not s.raw.closed}
            slots[id(raw)] = slot
            if before is not None and before.raw is raw:
                slot.runner = before.runner
        if self.io != "thread" and slot.runner is None:
            slot.runner = native.LoopStatementRunner(raw)
        return slot

    def _engine_checkin(self, raw: PGConnection) -> None:
        """A connection of this package's engine, unused or clean, back on the loop.
        Its runner stays entered if it goes straight to another task of this face
        (the loop keeps watching it); else it is let go first, under the engine's lock."""
        try:
            kept = self._engine._give_back_clean(raw, self, functools.partial(native.release, raw))
        except PoolError:  # the engine no longer knows it
            kept = False
        if not kept:
            native.release(raw)
            self._close_off_loop([raw])

    def _give_back_unused(self, slot: Slot) -> None:
        """A slot taken and never lent goes back to the engine as it came."""
        self._ledger.release(slot)
        native.release(slot.raw)
        if self._native:
            self._engine_checkin(slot.raw)
        else:
            self._put_back_later(slot.raw, close=False)

    def _put_back_later(self, raw: PGConnection, close: bool) -> None:
        def instead() -> None:  # no task can run any more: a thread of its own
            threading.Thread(
                target=_put_back, args=(self._engine, raw, close, False, False), daemon=True
            ).start()

        self._later(instead, self._offload.run_return, _put_back, self._engine, raw, close, False, False)

    # -- psycopg2's engine (or another): getconn in a thread, one at a time ------

    async def _take_foreign(self, key: Hashable | None, wait: float) -> Slot:
        self._check_queue_room()
        waiter = self._waiting.push(key, current_time() + wait, wait)
        self._queue.append((waiter, key))
        if not self._taking:
            self._taking = True
            try:
                self._tasks.spawn(self._take_in_order)
            except PoolClosed:
                self._taking = False
                self._waiting.leave(waiter)
                raise
        return await self._await_waiter(waiter, self._kick)

    def _grab_for_first(self) -> None:
        """In a thread that just gave psycopg2's engine a connection back: if a
        task waits and the engine has one idle, take it now for the first task,
        under the engine's lock, without I/O (psycopg2's ``_getconn`` pops an idle
        one). Otherwise threads retrying ``getconn`` would nearly always win the
        race against a worker-thread hop, and tasks would starve. Not for the
        face's own returns: those are left to the race, so that threads, which
        psycopg2 never queues, are not starved either (each side gets the
        other's returns)."""
        if getattr(_face_return, "active", False):
            return
        queue, engine = self._queue, self._engine
        try:
            waiter, key = queue[0]
        except IndexError:
            return
        lock = getattr(engine, "_lock", None)
        if waiter.done or lock is None:
            return
        with lock:
            if engine.closed or not engine._pool or (key is not None and key in engine._used):
                return
            raw = engine._getconn(key)
        self._call_soon(self._grabbed, raw, waiter, key)

    def _grabbed(self, raw: PGConnection, waiter: Waiter, key: Hashable | None) -> None:
        """On the loop: a connection :meth:`_grab_for_first` took for ``waiter``."""
        if waiter.done or not looks_alive(raw):
            self._put_back_later(raw, close=not looks_alive(raw))
            return
        with contextlib.suppress(ValueError):
            self._queue.remove((waiter, key))
        slot = self._adopt(raw, key)
        if not self._waiting.serve(waiter, slot):
            self._give_back_unused(slot)

    def _kick(self) -> None:
        """Wake the taking task: something was returned, or a request left."""
        if self._returned is not None:
            self._returned.set()

    async def _take_in_order(self) -> None:
        """Serve the queued requests in order, each by the engine's ``getconn``
        in a worker thread; while it is exhausted, wait for a return."""
        engine, queue = self._engine, self._queue
        try:
            while queue:
                waiter, key = queue[0]
                if waiter.done:
                    queue.popleft()
                    continue
                self._returned = returned = anyio.Event()
                seen = self._returns
                try:
                    with anyio.CancelScope(shield=True):  # (the face closing: finish, then give it back)
                        raw = await self._offload.run(engine.getconn, key)
                except psycopg2.pool.PoolError:
                    if engine.closed:
                        error = PoolClosed(f"the engine of pool {self.name!r} is closed")
                        while queue:
                            self._waiting.serve(queue.popleft()[0], error=error)
                        return
                    # Exhausted: wait for a return (counted from before the try) or a leaver.
                    if self._returns == seen:
                        await returned.wait()
                    continue
                except Exception as exc:  # a connect error: this request's
                    queue.popleft()
                    self._waiting.serve(waiter, error=exc)
                    continue
                if not looks_alive(raw):  # psycopg2 lends idle connections unchecked
                    self._stats.connections_lost += 1
                    await self._offload.run_return(_put_back, engine, raw, True, False, False)
                    continue
                if queue and queue[0][0] is waiter:  # (else served meanwhile: _grabbed)
                    queue.popleft()
                slot = self._adopt(raw, key)
                if not self._waiting.serve(waiter, slot):
                    self._give_back_unused(slot)
        finally:
            self._taking = False
            if queue and not self.closed:  # (cancelled with the face's tasks otherwise)
                with contextlib.suppress(PoolClosed):
                    self._taking = True
                    self._tasks.spawn(self._take_in_order)

    # -- giving back ------------------------------------------------------------

    def _start_return_slot(self, slot: Slot, loan: Loan | None, close: bool) -> anyio.Event | None:
        if slot.state is not SlotState.LENT:  # closed by close() meanwhile: given back there
            return None
        raw = slot.raw
        if loan is None:
            native.release(raw)  # an orphan's runner, if any, went with it
        closed = bool(raw.closed)
        settled = clean = False
        if loan is not None and loan.loop_settled():
            settled = True
            clean = (
                not loan.session_changed
                and not loan.listened
                and not closed
                and raw.get_transaction_status() == _STATUS_IDLE
                and raw.status == _PSYCOPG2_READY
            )
        route = decide_return(
            close=close,
            settled=settled,
            clean=clean,
            closed=closed,
            shut_down=was_shut_down(raw),
            must_close=False,
            engine=True,
            engine_on_loop=self._native,
        )
        ledger = self._ledger
        if route is Return.ENGINE:  # no I/O: the engine's lock only
            ledger.release(slot)
            self._engine_checkin(raw)
            return None
        ledger.begin_return(slot)
        done = anyio.Event()
        try:
            self._tasks.spawn(self._finish_engine_return, slot, loan, close, done)
        except PoolClosed:  # no task can run any more
            native.release(raw)
            ledger.release(slot)
            self._put_back_later(raw, close=True)
            return None
        return done

    async def _finish_engine_return(
        self, slot: Slot, loan: Loan | None, close: bool, done: anyio.Event
    ) -> None:
        """Wait for a call still running on it, then clean it and give it to the
        engine's ``putconn`` in a worker thread (closed if broken)."""
        try:
            if loan is not None:
                await loan.turn.wait_idle()
                await loan.give_back_loop()
            raw = slot.raw
            native.release(raw)
            route = decide_return(
                close=close,
                settled=True,
                clean=False,
                closed=bool(raw.closed),
                shut_down=was_shut_down(raw),
                must_close=False,
                engine=True,
                engine_on_loop=self._native,
            )
            if route is Return.ENGINE_CLOSE and not close:
                self._stats.returns_bad += 1
            await self._offload.run_return(
                _put_back,
                self._engine,
                raw,
                route is Return.ENGINE_CLOSE,
                loan.session_changed if loan is not None else True,
                loan.listened if loan is not None else True,
            )
        finally:
            self._ledger.release(slot)
            done.set()

    # -- reporting ----------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """The face's stats (its borrowers: ``pool_size`` counts connections
        tasks hold) and the engine's: ``engine_idle``, ``engine_used`` (threads
        and tasks), ``engine_max``."""
        engine = self._engine
        return {
            **super().get_stats(),
            "engine_idle": len(engine._pool),
            "engine_used": len(engine._used),
            "engine_max": engine.maxconn,
        }

    def __repr__(self) -> str:
        ledger, engine = self._ledger, self._engine
        state = "closed" if self.closed else ("open" if self._opened else "not open")
        return (
            f"<AsyncConnectionPool {self.name!r} over {type(engine).__name__} [{state}, io={self.io}] | "
            f"Requests: {ledger.lent_count} active, {len(self._waiting)} queued | "
            f"Engine: {len(engine._pool)} idle, {len(engine._used)} in use, max {engine.maxconn}>"
        )


AsyncConnectionPool._face = EngineFace


class _Later:
    """Tasks asked for from loop callbacks, started by one pool task (:meth:`run`),
    which holds no reference to the face (a face dropped unclosed is collected)."""

    def __init__(self, tasks: Any) -> None:
        self._tasks = tasks
        self._queue: deque[tuple[Callable[[], object], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._added = anyio.Event()

    def add(self, instead: Callable[[], object], func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._queue.append((instead, func, args))
        self._added.set()

    def _start(self, instead: Callable[[], object], func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._tasks.spawn(func, *args)

    async def run(self) -> None:
        """Start what was added; at the end (the face closing), run what is left's ``instead``."""
        try:
            while True:
                added = self._added
                while self._queue:
                    self._start(*self._queue.popleft())  # (no local keeps the face while waiting)
                await added.wait()
                self._added = anyio.Event()
        finally:
            while self._queue:
                self._queue.popleft()[0]()


def _kick_weakly(face: weakref.ref[EngineFace]) -> None:
    alive = face()
    if alive is not None:
        alive._kick()


def _no_loop(fn: Callable[..., object], *args: Any) -> None:
    """The face is not open yet: nothing can be waiting on it."""
