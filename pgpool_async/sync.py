"""The synchronous engine: psycopg2's pools, made to keep the promises of their docs.

:class:`ThreadedConnectionPool` and :class:`SimpleConnectionPool` are subclasses of
psycopg2's classes of the same names, with the same signatures, keys and errors.
On top of psycopg2 they:

- connect *outside* the pool lock, so one slow connect no longer stalls every
  other ``getconn``/``putconn``;
- validate an idle connection before handing it out (closed, or its socket shows
  the server hung up) and replace a broken one;
- roll back a connection returned mid-transaction, outside the lock, and close
  it instead if the rollback fails;
- keep returned connections idle up to ``maxconn`` instead of closing every
  connection above ``minconn``;
- work as context managers (``with ThreadedConnectionPool(...) as pool``).

Differences from psycopg2 a user may notice: ``putconn`` after ``closeall`` closes
the connection instead of raising (nothing leaks from a ``finally`` block), and
pool errors are the :mod:`pgpool_async.errors` subclasses of ``PoolError``.

``getconn(key, timeout=...)`` waits (FIFO) instead of raising "connection pool
exhausted"; without ``timeout``, psycopg2's behaviour.

These pools are separate from the default ``AsyncConnectionPool(minconn, maxconn,
dsn)``, which keeps connections of its own. ``AsyncConnectionPool.over(pool)``
makes one of them the engine of an async face (``_engine.py``): the state
changes, small methods that do no I/O (``_take_or_queue``, ``_leave_queue``,
``_give_back_clean``, ``_adopt``, ``_release_slot`` ...), are called on its
event loop under the lock; the I/O helpers (``_open_connection``,
``close_quietly``), which touch no pool state, in worker threads. Tasks and
threads wait in one queue (:class:`Waiter`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.pool
from psycopg2.extensions import connection as PGConnection

from ._config import check_connect_args, check_sizes, check_timeout
from ._loop.health import looks_alive as is_usable
from ._thread.blocking import close_quietly, reset_for_reuse
from ._thread.blocking import connect as blocking_connect
from .errors import PoolClosed, PoolError, PoolTimeout

__all__ = ["SimpleConnectionPool", "ThreadedConnectionPool"]


CLOSED_MESSAGE = "connection pool is closed"
EXHAUSTED_MESSAGE = "connection pool exhausted"


class _Reserved:
    """A waiter's hand-off when a slot came free with no connection in it: the
    waiter opens one there (``_open_connection`` then ``_adopt``)."""

    def __repr__(self) -> str:
        return "RESERVED"


RESERVED = _Reserved()


class Waiter:
    """A request queued for a connection, first come first served: a thread in
    ``getconn(timeout=...)`` or a task of an async face (``AsyncConnectionPool.over``).

    ``wake()`` is called under the pool's lock once ``result`` is set: it must
    only signal (set an event, schedule a callback on a loop), never block.
    ``result``: a connection lent under ``key``, :data:`RESERVED` (a slot to
    open a connection in), or a :class:`PoolClosed` to raise.
    """

    __slots__ = ("key", "owner", "result", "wake")

    def __init__(self, key: Hashable | None, wake: Callable[[], object], owner: object = None) -> None:
        self.key = key
        self.wake = wake
        self.owner = owner  # who queued it (an async face), for _give_back_clean
        self.result: PGConnection | _Reserved | PoolClosed | None = None


class _NoLock:
    """The lock of :class:`SimpleConnectionPool`: single-threaded, so none."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Engine(psycopg2.pool.AbstractConnectionPool):
    """The shared implementation. State changes hold ``_lock`` and do no I/O."""

    _lock: Any

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        """Create the pool and open ``minconn`` connections, like psycopg2.

        :raises PoolConfigError: bad sizes or connection arguments.
        :raises psycopg2.OperationalError: the server cannot be reached.
        """
        self._setup(minconn, maxconn, args, kwargs)
        try:
            for _ in range(self.minconn):
                self._open_idle()
        except BaseException:
            self.closeall()
            raise

    @classmethod
    def unopened(cls, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> Any:
        """Build a pool without opening any connection (no I/O): the async pool's way."""
        pool = cls.__new__(cls)
        pool._setup(minconn, maxconn, args, kwargs)
        return pool

    def _setup(self, minconn: int, maxconn: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        check_sizes(minconn, maxconn)
        check_connect_args(args, kwargs)
        # psycopg2's attribute names, kept so existing subclasses still work.
        self.minconn = minconn
        self.maxconn = maxconn
        self.closed = False
        self._args = args
        self._kwargs = kwargs
        self._pool: list[PGConnection] = []  # idle, most recently returned last
        self._used: dict[Hashable, PGConnection] = {}
        self._rused: dict[int, Hashable] = {}
        self._keys = 0
        # Slots held by connections being opened or reset: counted against maxconn.
        self._pending = 0
        # Requests waiting for a connection, oldest first (threads and async faces):
        # while any wait, nothing is taken past them (no barging).
        self._waiters: deque[Waiter] = deque()
        self.connections_opened = 0
        self._lock = self._make_lock()

    def _make_lock(self) -> Any:
        return threading.Lock()

    # -- state changes: no I/O, short, under the lock ------------------------

    @property
    def size(self) -> int:
        """Connections open or being opened, idle and in use."""
        return len(self._pool) + len(self._used) + self._pending

    @property
    def idle_count(self) -> int:
        """Connections idle in the pool, ready to be handed out."""
        return len(self._pool)

    @property
    def used_count(self) -> int:
        """Connections handed out and not yet returned."""
        return len(self._used)

    def _check_open(self) -> None:
        if self.closed:
            raise PoolClosed(CLOSED_MESSAGE)

    def _in_use(self, key: Hashable) -> PGConnection | None:
        """The connection lent under ``key``, if any."""
        with self._lock:
            self._check_open()
            return self._used.get(key)

    def _take_idle(self, key: Hashable | None = None) -> PGConnection | None:
        """Lend the most recently returned idle connection under ``key``, or None."""
        with self._lock:
            self._check_open()
            if not self._pool or self._waiters:
                return None
            conn = self._pool.pop()
            self._lend(conn, key)
            return conn

    def _lend(self, conn: PGConnection, key: Hashable | None) -> None:
        if key is None:
            self._keys += 1
            key = self._keys
        self._used[key] = conn
        self._rused[id(conn)] = key

    def _reserve(self) -> bool:
        """Hold a slot for a new connection if below ``maxconn``."""
        with self._lock:
            self._check_open()
            if self.size >= self.maxconn or self._waiters:
                return False
            self._pending += 1
            return True

    def _release_slot(self) -> None:
        """Give back a slot held by ``_reserve`` or ``_detach`` that ends with no
        connection: the first waiter, if any, gets it to open a connection in."""
        with self._lock:
            self._pending -= 1
            self._hand_slot()

    def _hand_slot(self) -> None:
        """A slot is free: hand it to the first waiter (under the lock)."""
        if self._waiters and not self.closed and self.size < self.maxconn:
            waiter = self._waiters.popleft()
            self._pending += 1
            waiter.result = RESERVED
            waiter.wake()

    def _adopt(self, conn: PGConnection, key: Hashable | None) -> bool:
        """Lend a newly opened connection in its reserved slot; False if the pool closed."""
        with self._lock:
            self._pending -= 1
            if self.closed:
                return False
            self.connections_opened += 1
            self._lend(conn, key)
            return True

    def _adopt_idle(self, conn: PGConnection) -> bool:
        """Put a newly opened connection idle in its reserved slot; False if the pool closed."""
        with self._lock:
            if self.closed:
                self._pending -= 1
                return False
            self.connections_opened += 1
        return self._checkin(conn)

    def _forget(self, conn: PGConnection) -> None:
        """Drop a lent connection that turned out broken: its slot is free again."""
        with self._lock:
            key = self._rused.pop(id(conn), None)
            if key is not None:
                self._used.pop(key, None)
            self._hand_slot()

    def _owner_key(self, conn: PGConnection | None, key: Hashable | None) -> Hashable:
        if conn is None:
            if key is None or key not in self._used:
                raise PoolError(f"no connection is lent under the key {key!r}")
            return key
        found = self._rused.get(id(conn))
        if found is None or self._used.get(found) is not conn:
            raise PoolError(
                "connection is not a member of this pool: it was taken from another pool, "
                "or was already returned"
            )
        if key is not None and key != found:
            raise PoolError(f"connection was taken under the key {found!r}, not {key!r}")
        return found

    def _detach(self, conn: PGConnection | None, key: Hashable | None) -> PGConnection | None:
        """Take a returned connection off the books; its slot stays held until
        ``_checkin`` or ``_release_slot``. None if the pool is closed (the caller
        closes the connection).

        :raises PoolError: the connection is not lent by this pool.
        """
        with self._lock:
            if self.closed:
                return None
            found = self._owner_key(conn, key)
            conn = self._used.pop(found)
            del self._rused[id(conn)]
            self._pending += 1
            return conn

    def _checkin(self, conn: PGConnection) -> bool:
        """Put a reset connection idle in its held slot; False if the pool closed."""
        with self._lock:
            self._pending -= 1
            if self.closed:
                return False
            self._hand_or_keep(conn)
            return True

    def _hand_or_keep(
        self, conn: PGConnection, owner: object = None, elsewhere: Callable[[], object] | None = None
    ) -> None:
        """A clean connection off the books: to the first waiter, lent under its
        key, else idle (under the lock). A waiter whose key was lent meanwhile
        gets that connection (psycopg2's keys) and the next one is served.
        ``elsewhere()`` is called first unless the connection goes to a waiter
        queued by ``owner``."""
        while self._waiters:
            waiter = self._waiters.popleft()
            held = self._used.get(waiter.key) if waiter.key is not None else None
            if held is not None:
                waiter.result = held
                waiter.wake()
                continue
            if elsewhere is not None and (owner is None or waiter.owner is not owner):
                elsewhere()
            self._lend(conn, waiter.key)
            waiter.result = conn
            waiter.wake()
            return
        if elsewhere is not None:
            elsewhere()
        self._pool.append(conn)

    # -- waiting (threads and async faces, one FIFO queue) ----------------------

    def _take_or_queue(
        self, key: Hashable | None, wake: Callable[[], object], owner: object = None
    ) -> PGConnection | _Reserved | Waiter:
        """At once: the connection lent under ``key``, an idle one (lent, not yet
        checked), or :data:`RESERVED` (a free slot: open a connection in it);
        else a :class:`Waiter` queued last, woken by ``wake()`` when served.

        :raises PoolClosed: the pool is closed.
        """
        with self._lock:
            self._check_open()
            if key is not None and (held := self._used.get(key)) is not None:
                return held
            if not self._waiters:
                if self._pool:
                    conn = self._pool.pop()
                    self._lend(conn, key)
                    return conn
                if self.size < self.maxconn:
                    self._pending += 1
                    return RESERVED
            waiter = Waiter(key, wake, owner)
            self._waiters.append(waiter)
            return waiter

    def _leave_queue(self, waiter: Waiter) -> PGConnection | _Reserved | PoolClosed | None:
        """``waiter`` gives up: None if it was still queued (now out of the queue),
        else what it was handed meanwhile, which the caller now owns (a lent
        connection to give back, a slot to release) or the error."""
        with self._lock:
            if waiter.result is None:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                return None
            return waiter.result

    def _give_back_clean(
        self, conn: PGConnection, owner: object = None, elsewhere: Callable[[], object] | None = None
    ) -> bool:
        """Check in a lent connection known clean (no transaction, nothing to
        reset): no I/O, the lock only; the next waiter gets it. ``elsewhere()``
        is called first, under the lock, unless that waiter was queued by
        ``owner`` (an async face lets its loop stop watching the connection,
        unless another of its tasks gets it). False if the pool is closed (the
        caller closes it; ``elsewhere`` not called).

        :raises PoolError: the connection is not lent by this pool.
        """
        with self._lock:  # (_detach then _checkin, in one hold of the lock)
            if self.closed:
                return False
            del self._used[self._owner_key(conn, None)]
            del self._rused[id(conn)]
            self._hand_or_keep(conn, owner, elsewhere)
            return True

    def _getconn_waiting(self, key: Hashable | None, timeout: float) -> PGConnection:
        """getconn, waiting up to ``timeout`` seconds in the queue."""
        deadline = time.monotonic() + timeout
        while True:  # each pass that does not return drops a broken idle connection
            event = threading.Event()
            got = self._take_or_queue(key, event.set)
            if isinstance(got, Waiter):
                if event.wait(max(0.0, deadline - time.monotonic())):
                    result = got.result
                else:
                    result = self._leave_queue(got)
                    if result is None:
                        raise PoolTimeout(
                            f"couldn't get a connection after {timeout:.2f} sec ({self.maxconn} in use): "
                            "raise maxconn or the timeout, or return connections sooner"
                        )
                if isinstance(result, PoolClosed):
                    raise result
                assert result is not None
                got = result
            if got is RESERVED:
                return self._open_lent(key)
            assert not isinstance(got, _Reserved)
            if is_usable(got):
                return got
            self._forget(got)
            close_quietly(got)

    def _open_lent(self, key: Hashable | None) -> PGConnection:
        """Open a connection in a reserved slot and lend it under ``key``."""
        try:
            conn = self._open_connection()
        except BaseException:
            self._release_slot()
            raise
        if not self._adopt(conn, key):
            close_quietly(conn)
            raise PoolClosed(CLOSED_MESSAGE)
        return conn

    def _evict_idle(self, evict: Callable[[PGConnection], bool], keep: int) -> list[PGConnection]:
        """Take idle connections off the books, oldest first, for which ``evict``
        is true, as long as at least ``keep`` connections remain; the caller
        closes them. Their slots are free at once."""
        with self._lock:
            evicted = []
            for conn in list(self._pool):
                if self.size <= keep:
                    break
                if evict(conn):
                    self._pool.remove(conn)
                    evicted.append(conn)
            return evicted

    def _close_all_state(self) -> list[PGConnection]:
        """Mark closed and hand back every connection, idle and lent, to close."""
        with self._lock:
            self._check_open()
            self.closed = True
            conns = self._pool + list(self._used.values())
            self._pool.clear()
            self._used.clear()
            self._rused.clear()
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.result = PoolClosed(CLOSED_MESSAGE)
                waiter.wake()
            return conns

    # -- I/O helpers: no pool state ----------------------------------------

    def _open_connection(self) -> PGConnection:
        """Open one connection (network I/O; never under the lock)."""
        if type(self)._connect is not _Engine._connect:
            return self._open_with_legacy_connect()
        conn: PGConnection = blocking_connect(self._args, self._kwargs)
        return conn

    def _open_with_legacy_connect(self) -> PGConnection:
        # A subclass written for psycopg2 overrides _connect(key) and registers the
        # connection itself: let it, under a private key, then take it back.
        token = object()
        self._connect(token)
        with self._lock:
            conn = self._used.pop(token)
            self._rused.pop(id(conn), None)
        return conn

    def _open_idle(self) -> None:
        """Open one connection into a free slot and keep it idle."""
        if not self._reserve():
            return
        try:
            conn = self._open_connection()
        except BaseException:
            self._release_slot()
            raise
        if not self._adopt_idle(conn):
            close_quietly(conn)

    def _connect(self, key: Any = None) -> PGConnection:
        """psycopg2's hook: open a connection and lend it under ``key``.

        Kept for compatibility; the pool itself opens connections outside the lock.
        """
        conn = self._open_connection()
        with self._lock:
            self._lend(conn, key)
        return conn

    # -- the psycopg2 API ---------------------------------------------------

    def _getconn(self, key: Hashable | None = None) -> PGConnection:
        if key is not None and (conn := self._in_use(key)) is not None:
            return conn
        # Bounded: each pass takes one idle connection away or stops.
        while (conn := self._take_idle(key)) is not None:
            if is_usable(conn):
                return conn
            self._forget(conn)
            close_quietly(conn)
        if not self._reserve():
            raise PoolError(EXHAUSTED_MESSAGE)
        return self._open_lent(key)

    def _putconn(
        self, conn: PGConnection | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        detached = self._detach(conn, key)
        if detached is None:  # the pool is closed: close instead of raising
            if conn is not None:
                close_quietly(conn)
            return
        if close or not reset_for_reuse(detached):
            close_quietly(detached)
            self._release_slot()  # (a waiter opens a new one in it)
        elif not self._checkin(detached):
            close_quietly(detached)

    def _closeall(self) -> None:
        for conn in self._close_all_state():
            close_quietly(conn)

    def getconn(self, key: Hashable | None = None, *, timeout: float | None = None) -> PGConnection:
        """Lend a connection; the same one again for a key already in use.

        Without ``timeout``, psycopg2's behaviour: "connection pool exhausted" at
        once when ``maxconn`` are lent (or others are already waiting). With a
        ``timeout`` (seconds), the thread waits its turn, first come first
        served with other threads and with the tasks of an async face over this
        pool (``AsyncConnectionPool.over``), for any return.

        :raises PoolError: "connection pool exhausted" (no ``timeout``).
        :raises PoolTimeout: none became free within ``timeout``.
        :raises PoolClosed: the pool is closed (or closed while waiting).
        :raises PoolConfigError: a negative or non-numeric ``timeout``.
        """
        if timeout is None:
            return self._getconn(key)
        return self._getconn_waiting(key, check_timeout("timeout", timeout))

    def putconn(
        self, conn: PGConnection | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Return a connection: rolled back if needed and kept idle, or closed.

        :raises PoolError: the connection is not lent by this pool (another
            pool's, or already returned). On a closed pool the connection is
            closed and nothing is raised.
        """
        self._putconn(conn, key, close)

    def closeall(self) -> None:
        """Close every connection, idle and lent, and close the pool.

        :raises PoolClosed: the pool was already closed.
        """
        self._closeall()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.closeall()

    @contextlib.contextmanager
    def connection(self, key: Hashable | None = None) -> Iterator[PGConnection]:
        """Lend a connection for a ``with`` block: committed on success, rolled back on error."""
        conn = self.getconn(key)
        try:
            yield conn
        except BaseException:
            self.putconn(conn, key)
            raise
        try:
            conn.commit()
        except BaseException:
            self.putconn(conn, key)
            raise
        self.putconn(conn, key)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<{type(self).__name__} [{state}] | Connections: {len(self._pool)} idle, "
            f"{len(self._used)} in use, {self._pending} pending, min {self.minconn}, "
            f"max {self.maxconn}>"
        )


class ThreadedConnectionPool(_Engine, psycopg2.pool.ThreadedConnectionPool):
    """psycopg2's thread-safe pool, with the seed's promises kept (see the module doc).

    ``ThreadedConnectionPool(minconn, maxconn, *args, **kwargs)``: ``args`` and
    ``kwargs`` go to ``psycopg2.connect``. Opens ``minconn`` connections now.
    """


class SimpleConnectionPool(_Engine, psycopg2.pool.SimpleConnectionPool):
    """psycopg2's single-threaded pool, with the same improvements; no locking."""

    def _make_lock(self) -> Any:
        return _NoLock()
