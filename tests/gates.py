"""Test tools: pause a pool's worker thread at a chosen hop, and check a pool is whole.

Cancellation tests need the caller cancelled while a worker thread is inside one
blocking call (a connect, a commit, a close, a hook). The pool's internals are
being rebuilt, so nothing here touches them: the pauses are planted only in what
a user can hand the pool through its public options --

- a psycopg2 ``connection_factory`` (:attr:`Gate.connection_factory`): a
  connection whose connect (once it succeeded), ``close``, bound ``commit`` and
  ``rollback``, and cursors' ``execute`` pass through the gate;
- a psycopg2 wait callback (:meth:`Gate.watching_io`) that pauses at the next
  libpq round trip of an established gated connection, however the call was
  made (psycopg2 calls it after sending the request, while the answer is due);
- ``configure``, ``reset`` and ``check`` hooks (:meth:`Gate.hook`).

A hop pauses only when armed (``gate.arm("close")``), once per arm. The test then
waits for the pause (``await gate.wait_paused("close")``), cancels its caller,
and calls :meth:`Gate.release`. A pause never outlives its deadline, so a broken
test cannot hang a thread forever: the thread then goes on and the miss is
recorded in :attr:`Gate.errors` (the tests assert it is empty).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import psycopg2.extensions
import psycopg2.extras

from pgpool_async import AsyncConnection, AsyncConnectionPool

from .conftest import _on_event_loop, backends

__all__ = [
    "HOPS",
    "SETTLE",
    "Escape",
    "Gate",
    "assert_pool_sound",
    "in_use",
    "pool_kwargs",
    "pool_threads",
    "poll",
    "unique",
    "wait_backends",
    "wait_closed_down",
]

# Where a gate can pause a worker thread.
HOPS = ("connect", "close", "commit", "rollback", "execute", "io", "configure", "reset", "check")


class Gate:
    """Pause points for one pool's worker threads (see the module docstring)."""

    def __init__(self, hold_timeout: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._armed: Counter[str] = Counter()
        self._release = threading.Event()
        self._hold_timeout = hold_timeout
        # Hops where a thread waits right now. Read on the loop without the lock:
        # a list's truthiness and ``in`` are atomic under the GIL.
        self.paused: list[str] = []
        self.hits: Counter[str] = Counter()
        self.errors: list[str] = []
        self.connection_factory = _gated_connection_class(self)

    # -- the test's side (event loop) ----------------------------------------

    def arm(self, hop: str, times: int = 1) -> None:
        """Pause the next ``times`` threads that reach ``hop``."""
        assert hop in HOPS, hop
        with self._lock:
            self._armed[hop] += times

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def is_paused(self, hop: str) -> bool:
        return hop in self.paused

    async def wait_paused(self, hop: str, timeout: float = 10.0, unless: Callable[[], bool] = bool) -> None:
        """Wait until a thread is paused at ``hop`` (or ``unless()`` is true)."""
        await poll(lambda: self.is_paused(hop) or unless(), timeout, f"a worker paused at {hop!r}")

    def release(self) -> None:
        """Let every paused thread go on (threads pausing later wait for the next call)."""
        with self._lock:
            release, self._release = self._release, threading.Event()
        release.set()

    def close(self) -> None:
        """Disarm and release everything (end of a test)."""
        self.disarm()
        self.release()

    def hook(self, hop: str) -> Callable[[Any], None]:
        """A ``configure``/``reset``/``check`` hook that passes through ``hop``."""
        assert hop in ("configure", "reset", "check"), hop

        def hook(raw: Any) -> None:
            self.pass_through(hop)

        return hook

    @contextlib.contextmanager
    def watching_io(self) -> Iterator[None]:
        """Make the ``io`` hop work: wrap the session's psycopg2 wait callback
        (the loop guard of conftest stays in force behind it)."""
        previous = psycopg2.extensions.get_wait_callback()
        inner = previous if previous is not None else psycopg2.extras.wait_select
        factory = self.connection_factory

        def wait(conn: Any) -> None:
            # Never pause the loop thread: the guard behind raises there instead.
            if isinstance(conn, factory) and getattr(conn, "gate_ready", False) and not _on_event_loop():
                self.pass_through("io")
            inner(conn)

        psycopg2.extensions.set_wait_callback(wait)
        try:
            yield
        finally:
            psycopg2.extensions.set_wait_callback(previous)

    # -- the worker thread's side -----------------------------------------------

    def pass_through(self, hop: str) -> None:
        """Called in a worker thread at ``hop``: pause there if armed."""
        with self._lock:
            self.hits[hop] += 1
            if self._armed[hop] <= 0:
                return
            self._armed[hop] -= 1
            release = self._release
            self.paused.append(hop)
        try:
            if not release.wait(self._hold_timeout):
                self.errors.append(f"a thread paused at {hop!r} was not released in {self._hold_timeout} s")
        finally:
            with self._lock:
                self.paused.remove(hop)


def _gated_connection_class(gate: Gate) -> type[psycopg2.extensions.connection]:
    class GatedCursor(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> None:
            gate.pass_through("execute")
            super().execute(query, vars)

    class GatedConnection(psycopg2.extensions.connection):
        """A real psycopg2 connection whose blocking calls pass through a gate."""

        def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
            super().__init__(dsn, *args, **kwargs)
            # psycopg2.connect() sets a cursor_factory given to it after this.
            self.cursor_factory = GatedCursor
            gate.pass_through("connect")
            self.gate_ready = True

        def close(self) -> None:
            gate.pass_through("close")
            super().close()

        def commit(self) -> None:
            gate.pass_through("commit")
            super().commit()

        def rollback(self) -> None:
            gate.pass_through("rollback")
            super().rollback()

    return GatedConnection


# -- small shared pieces ----------------------------------------------------------------

#: How long a pool that is sound takes to settle after a cancellation or a failure
#: (milliseconds once right; waiting longer only slows down a strict xfail).
SETTLE = 1.0


class Escape(BaseException):
    """Not an Exception: what a KeyboardInterrupt-like failure in a hook looks like."""


def unique(prefix: str) -> str:
    """``prefix`` and 10 random hex digits: a pool, table or thread name of the test's own."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def pool_kwargs(app_name: str, **options: Any) -> dict[str, Any]:
    """A pool's keyword arguments: a unique name, the test's application_name, a 5 s timeout."""
    return {"name": unique("t-"), "application_name": app_name, "timeout": 5, **options}


# -- polling with a deadline (never a sleep as synchronisation) ------------------


async def poll(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str | Callable[[], str] = "a condition"
) -> None:
    """Wait until ``predicate()`` is true; AssertionError after ``timeout`` s
    (``what``, or what it returns then, says what was awaited)."""
    deadline = anyio.current_time() + timeout
    while not predicate():
        if anyio.current_time() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not reached within {timeout} s")
        await anyio.sleep(0.002)


def in_use(pool: AsyncConnectionPool) -> int:
    """Connections the pool counts as not idle (lent, opening or returning)."""
    stats = pool.get_stats()
    return stats["pool_size"] - stats["pool_available"]


def pool_threads(name: str) -> list[str]:
    """Live threads named after the pool (see ``pgpool_async`` offload/background)."""
    return [t.name for t in threading.enumerate() if name in t.name]


async def _backends(dsn: str, app_name: str) -> list[tuple[str, str]]:
    # Off the loop: the helper opens a connection of its own.
    return await anyio.to_thread.run_sync(backends, dsn, app_name)


async def wait_backends(
    dsn: str, app_name: str, count: Callable[[], int] | int, timeout: float = 10.0
) -> list[str]:
    """Poll until the server has ``count`` backends for ``app_name`` (a closed
    connection's backend leaves pg_stat_activity a moment later); their states."""
    want = count if callable(count) else (lambda: count)
    deadline = anyio.current_time() + timeout
    while True:
        rows = await _backends(dsn, app_name)
        if len(rows) == want():
            return [state for state, _ in rows]
        if anyio.current_time() >= deadline:
            raise AssertionError(f"{len(rows)} backends for {app_name}, want {want()}: {rows}")
        await anyio.sleep(0.005)


async def wait_closed_down(pool: AsyncConnectionPool, dsn: str, app_name: str, timeout: float = 10.0) -> None:
    """A closed pool leaves nothing behind: no backend, no thread of its own."""
    await wait_backends(dsn, app_name, 0, timeout)
    await poll(lambda: not pool_threads(pool.name), timeout, f"threads of {pool.name!r} gone")


async def assert_pool_sound(
    pool: AsyncConnectionPool,
    dsn: str,
    app_name: str,
    held: Iterable[AsyncConnection] = (),
    timeout: float = 10.0,
) -> None:
    """After a cancellation: the pool is either closed down completely, by itself,
    or whole -- its books match what the test holds, all ``maxconn`` connections
    can be lent at once, the server has exactly ``pool_size`` backends and none is
    idle in a transaction. Then closes it and checks nothing is left behind.
    Returns (or closes) the connections in ``held`` on the way. ``timeout``
    bounds each wait (cases known to fail today use a short one)."""
    still = [c for c in held if not c.released]
    if pool.closed:
        for conn in still:  # a closed pool closes what comes back
            await pool.putconn(conn)
        await wait_closed_down(pool, dsn, app_name, timeout)
        return
    await poll(
        lambda: pool.get_stats()["requests_waiting"] == 0 and in_use(pool) == len(still),
        timeout,
        lambda: f"books match what the test holds ({len(still)}): {pool.get_stats()}",
    )
    states = await wait_backends(dsn, app_name, lambda: pool.get_stats()["pool_size"], timeout)
    assert "idle in transaction" not in states, states
    for conn in still:
        await pool.putconn(conn)
    await poll(lambda: in_use(pool) == 0, timeout, lambda: f"all returned: {pool.get_stats()}")
    conns = [await pool.getconn(timeout=5) for _ in range(pool.maxconn)]
    pids = {conn.raw.get_backend_pid() for conn in conns}  # no I/O: libpq keeps it
    assert len(pids) == pool.maxconn
    assert pool.get_stats()["pool_size"] == pool.maxconn
    states = await wait_backends(dsn, app_name, pool.maxconn, timeout)
    assert set(states) == {"idle"}, states
    for conn in conns:
        await pool.putconn(conn)
    await pool.close()
    await wait_closed_down(pool, dsn, app_name, timeout)
