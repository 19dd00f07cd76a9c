"""The ledger: every pooled connection's state, and every decision about it.

One :class:`Slot` per open connection holds its whole life (state, key,
lifetime, when and where it was lent). The :class:`Ledger` owns all of them and
is the only code that changes their state. It runs on the event loop thread
only, does no I/O, takes no lock and never awaits: each method changes state at
once and returns a :class:`Plan` of the I/O the pool must do afterwards
(connections to close, connections to open), the way httpcore's
``_assign_requests_to_connections()`` decides and ``_close_connections()`` acts.

Who gets which connection is decided in one place, :meth:`Ledger.assign`:
idle connections go to waiters first come first served, broken or retired ones
are set aside for closing, and new connections are asked for to keep
``minconn`` and (one at a time, like psycopg_pool) to serve a queue.
"""

from __future__ import annotations

import enum
import itertools
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

from psycopg2.extensions import connection as PGConnection

__all__ = ["Ledger", "Plan", "Return", "Slot", "SlotState", "decide_return"]


class _Queue(Protocol):
    """What the ledger needs of the wait queue (:class:`~.waiting.WaitQueue`)."""

    def __len__(self) -> int: ...
    def first(self) -> Any: ...
    def hand(self, waiter: Any, slot: Slot) -> None: ...


class SlotState(enum.Enum):
    """Where a connection is in its life."""

    IDLE = "idle"  # in the pool, ready to lend
    LENT = "lent"  # with a borrower
    RETURNING = "returning"  # given back; the pool is resetting it
    CLOSED = "closed"  # off the books; its connection is closed or being closed


class _NoWaiters:
    """The wait queue of a ledger that serves none (:meth:`Ledger.serve_no_queue`)."""

    def __len__(self) -> int:
        return 0

    def first(self) -> Any:
        return None

    def hand(self, waiter: Any, slot: Slot) -> None:
        raise AssertionError("a ledger with no queue hands nothing")


_NO_WAITERS = _NoWaiters()


class Return(enum.Enum):
    """How a connection a borrower gave back comes back: the I/O the pool does
    (decided by :func:`decide_return`)."""

    KEEP = "keep"  # clean: idle or to the next waiter, on the loop, no I/O, no thread
    RESET = "reset"  # rolled back (and reset) in a worker thread, then kept
    CLOSE = "close"  # closed: asked, broken, or the pool closing, retired or shrunk
    ENGINE = "engine"  # clean: checked into the engine on the loop (its lock only, no I/O)
    ENGINE_RESET = "engine-reset"  # rolled back in a worker thread, then the engine's putconn
    ENGINE_CLOSE = "engine-close"  # the engine's putconn(close=True), in a worker thread


def decide_return(
    *,
    close: bool,
    settled: bool,
    clean: bool,
    closed: bool,
    shut_down: bool,
    must_close: bool,
    engine: bool = False,
    engine_on_loop: bool = False,
) -> Return:
    """How a returned connection comes back, from the facts (no I/O, no state).

    - ``close``: the borrower (or a check) asked for it to be closed;
    - ``settled``: nothing runs on it any more and the borrower's loan is known
      (False: a call still runs, or the borrower was lost: decide again once it
      has ended, with ``clean`` False);
    - ``clean``: nothing to undo: no transaction open (libpq's and psycopg2's
      view), no session state changed, no LISTEN, no ``reset`` hook to run;
    - ``closed`` / ``shut_down``: the connection is closed, or its socket was
      shut down by the pool: it cannot be reused;
    - ``must_close``: the pool keeps it no longer (closing, retired, shrunk);
    - ``engine``: it belongs to a ``ThreadedConnectionPool`` the pool is a face
      of (``AsyncConnectionPool.over``); ``engine_on_loop``: that engine is this
      package's, whose check-in of a clean connection does no I/O.

    The pool's own connections: :attr:`Return.KEEP` when clean and settled and
    kept; :attr:`Return.CLOSE` when broken, asked, or not kept; else
    :attr:`Return.RESET`. An engine's: the same three as ``ENGINE``,
    ``ENGINE_CLOSE`` and ``ENGINE_RESET`` (the engine decides whether it keeps
    it; ``must_close`` is not the face's to decide), and ``ENGINE`` only for an
    engine that checks in on the loop (psycopg2's may roll back or close under
    its lock: always a worker thread).
    """
    if close or closed or shut_down:
        return Return.ENGINE_CLOSE if engine else Return.CLOSE
    if engine:
        if settled and clean and engine_on_loop:
            return Return.ENGINE
        return Return.ENGINE_RESET
    if must_close:
        return Return.CLOSE
    if settled and clean:
        return Return.KEEP
    return Return.RESET


class Slot:
    """One open connection and everything the pool knows of it."""

    __slots__ = (
        "closed_by_pool",
        "created_at",
        "expires_at",
        "generation",
        "holder",
        "idle_since",
        "key",
        "leak_reported",
        "lent_at",
        "on_drop",
        "raw",
        "runner",
        "state",
        "taken_at",
        "trusted",
    )

    def __init__(self, raw: PGConnection, generation: int, expires_at: float) -> None:
        self.raw = raw
        self.state = SlotState.IDLE
        self.key: Hashable | None = None
        self.generation = generation
        self.created_at = time.monotonic()
        self.expires_at = expires_at
        self.idle_since = self.created_at
        self.lent_at = 0.0
        self.taken_at: traceback.StackSummary | None = None  # with leak_threshold
        self.leak_reported = False
        # Closed by close()/closeall() while lent: the borrower's work was lost.
        self.closed_by_pool = False
        # Just returned in use: may be handed on without the liveness peek.
        self.trusted = False
        # A weak reference to the borrower's AsyncConnection while lent: its
        # callback reports a borrower dropped without returning the connection.
        self.holder: Any = None
        self.on_drop: Any = None  # the weak reference's callback, made once (pool.py)
        # The loop-native runner (_loop/native.py) of this connection, if the pool
        # runs statements on the loop: it stays entered while the connection is
        # idle, and is let go before any thread touches the connection.
        self.runner: Any = None

    def __repr__(self) -> str:
        return f"<Slot {self.state.value} key={self.key!r}>"


class Plan:
    """The I/O the pool must do after a ledger decision: ``close``, slots off the
    books whose connections to close; ``open``, slots reserved for new
    connections to open in the background. (A plain class: one is made per
    checkout and return.)"""

    __slots__ = ("close", "open")

    def __init__(self, close: list[Slot] | None = None, open: int = 0) -> None:
        self.close: list[Slot] = [] if close is None else close
        self.open = open

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and (self.close, self.open) == (other.close, other.open)

    def __repr__(self) -> str:
        return f"Plan(close={self.close!r}, open={self.open})"

    def __iadd__(self, other: Plan) -> Plan:
        self.close += other.close
        self.open += other.open
        return self


class Ledger:
    """All the pool's slots and their states; see the module docstring.

    ``size`` counts every slot that holds or will hold a connection (idle, lent,
    returning, or being opened): never above ``maxconn``, except after a shrink
    (``resize``) until the lent slots come back, to be closed.
    """

    def __init__(self, minconn: int, maxconn: int, waiting: _Queue) -> None:
        self.minconn = minconn
        self.maxconn = maxconn
        self.generation = 0  # drain() retires slots of older generations
        self.closing = False  # no more lending; returns close their connection
        self._waiting = waiting
        self._idle: list[Slot] = []  # most recently checked in last (LIFO, like psycopg2)
        self._lent: set[Slot] = set()
        self._keyed: dict[Hashable, Slot] = {}
        self._returning: set[Slot] = set()
        self._opening = 0
        # Every slot on the books plus those being opened, kept as slots come and
        # go (a slot moving between idle, lent and returning leaves it as is).
        self._size = 0
        self._auto_keys = itertools.count(1)
        # Appended from any thread (a weakref callback): recovered by upkeep.
        self.orphans: list[Slot] = []
        self._on_empty: list[Callable[[], object]] = []

    # -- gauges -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Idle, lent, returning and being-opened slots (above ``maxconn`` only
        after a shrink, until lent slots come back and are closed)."""
        return self._size

    def _off_books(self, slot: Slot) -> None:
        """``slot`` leaves the books (its connection is to be closed)."""
        slot.state = SlotState.CLOSED
        self._size -= 1

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def lent_count(self) -> int:
        return len(self._lent)

    @property
    def opening_count(self) -> int:
        return self._opening

    @property
    def returning_count(self) -> int:
        return len(self._returning)

    def lent(self) -> Iterator[Slot]:
        """The lent slots (a snapshot)."""
        return iter(list(self._lent))

    def open_slots(self) -> Iterator[Slot]:
        """The idle and lent slots (a snapshot)."""
        return iter([*self._idle, *self._lent])

    def retired(self, slot: Slot, now: float | None = None) -> bool:
        """Past its lifetime, or from before a drain()."""
        now = time.monotonic() if now is None else now
        return slot.generation != self.generation or now >= slot.expires_at

    # -- lending --------------------------------------------------------------

    def lent_under(self, key: Hashable) -> Slot | None:
        """The slot lent under a psycopg2 key, if any."""
        return self._keyed.get(key)

    def take(self, key: Hashable | None, usable: Callable[[Slot], bool]) -> tuple[Slot | None, Plan]:
        """Lend an idle connection under ``key``; idle ones found retired or not
        ``usable`` go off the books into the plan, to close."""
        plan = Plan()
        if self.closing:
            return None, plan
        now = time.monotonic()
        while self._idle:
            slot = self._idle.pop()
            if self.retired(slot, now) or not usable(slot):
                self._off_books(slot)
                plan.close.append(slot)
                continue
            self._lend(slot, key, now)
            return slot, plan
        return None, plan

    def _lend(self, slot: Slot, key: Hashable | None, now: float | None = None) -> None:
        slot.state = SlotState.LENT
        slot.key = key if key is not None else next(self._auto_keys)
        slot.lent_at = time.monotonic() if now is None else now
        slot.leak_reported = False
        slot.trusted = False
        self._lent.add(slot)
        if key is not None:
            self._keyed[key] = slot

    def assign(self, usable: Callable[[Slot], bool]) -> Plan:
        """Hand idle connections to waiters, first come first served, then decide
        what to open: enough for ``minconn``, and one more while requests wait
        and nothing is being opened."""
        plan = Plan()
        while self._idle and (waiter := self._waiting.first()) is not None:
            slot, found = self.take(waiter.key, usable)
            plan += found
            if slot is None:
                break
            self._waiting.hand(waiter, slot)
        size = self._size
        if self.closing or size >= self.maxconn:  # (the busy pool's case: nothing to open)
            return plan
        want = max(0, self.minconn - size)
        if not want and not self._opening and len(self._waiting):
            want = 1
        want = min(want, self.maxconn - size)
        if want > 0:
            self._opening += want
            self._size += want
            plan.open += want
        return plan

    def may_assign(self) -> bool:
        """False when :meth:`assign` would do nothing for sure: nothing idle to
        hand out, and no room to open another connection."""
        return bool(self._idle) or self._size < self.maxconn

    def give_back(self, slot: Slot, usable: Callable[[Slot], bool]) -> Plan:
        """A connection handed to a waiter that gave up meanwhile: it is clean,
        so it goes back idle with no I/O."""
        self._unlend(slot)
        return self._put_idle(slot, usable)

    # -- returning ------------------------------------------------------------

    def begin_return(self, slot: Slot) -> None:
        """A borrower gave ``slot`` back: it stays counted until
        :meth:`check_in` or :meth:`discard`.

        :raises ValueError: the slot is not lent (a bug of the caller).
        """
        if slot.state is not SlotState.LENT:
            raise ValueError(f"{slot!r} is not lent")
        self._unlend(slot)
        slot.state = SlotState.RETURNING
        self._returning.add(slot)

    def _unlend(self, slot: Slot) -> None:
        slot.holder = None
        self._lent.discard(slot)
        if self._keyed.get(slot.key) is slot:
            del self._keyed[slot.key]

    def check_in(self, slot: Slot, usable: Callable[[Slot], bool]) -> Plan:
        """A returned connection, reset and clean, goes idle (or to the next
        waiter), unless the pool is closing, it is retired, or the pool shrank.
        A slot the pool closed meanwhile (``close()`` past its timeout) stays closed."""
        if slot.state is SlotState.CLOSED:
            return Plan()
        assert slot.state is SlotState.RETURNING
        self._returning.discard(slot)
        return self._put_idle(slot, usable)

    def return_clean(self, slot: Slot, usable: Callable[[Slot], bool]) -> Plan | None:
        """:meth:`begin_return` then :meth:`check_in` in one step, for a lent
        connection that comes back clean (no I/O to do). None, with nothing
        changed: the connection is to be closed instead (the pool is closing, it
        is retired, or the pool shrank): the caller returns it the long way
        (:meth:`begin_return`), closing it and waiting for that.

        :raises ValueError: the slot is not lent (a bug of the caller).
        """
        if slot.state is not SlotState.LENT:
            raise ValueError(f"{slot!r} is not lent")
        now = time.monotonic()
        if self.must_close(slot, now):
            return None
        return self.keep(slot, usable, now)

    def keep(self, slot: Slot, usable: Callable[[Slot], bool], now: float) -> Plan:
        """A lent connection comes back clean and is kept (:attr:`Return.KEEP`,
        ``must_close`` found false at ``now``): idle, or to the first waiter."""
        self._unlend(slot)
        return self._to_idle(slot, usable, now)

    def must_close(self, slot: Slot, now: float | None = None) -> bool:
        """A connection coming back is closed, not kept: the pool is closing, it
        is retired, or the pool shrank (``slot`` still counts in ``size``)."""
        now = time.monotonic() if now is None else now
        return self.closing or self.retired(slot, now) or self._size > self.maxconn

    def _put_idle(self, slot: Slot, usable: Callable[[Slot], bool]) -> Plan:
        now = time.monotonic()
        if self.must_close(slot, now):
            self._off_books(slot)
            plan = Plan(close=[slot])
            plan += self.assign(usable)
            self._notify_if_empty()
            return plan
        return self._to_idle(slot, usable, now)

    def _to_idle(self, slot: Slot, usable: Callable[[Slot], bool], now: float) -> Plan:
        """A clean connection off the books of lent and returning slots goes to
        the first waiter, or idle."""
        slot.idle_since = now
        if not self._idle and (waiter := self._waiting.first()) is not None:
            # Nothing else idle: it goes straight to the first waiter, as assign
            # would decide (a busy pool's every return), without the detour.
            self._lend(slot, waiter.key, now)
            self._waiting.hand(waiter, slot)
            return self.assign(usable) if self.may_assign() else Plan()
        slot.state = SlotState.IDLE
        slot.trusted = True
        self._idle.append(slot)
        try:
            plan = self.assign(usable)
        finally:
            slot.trusted = False
        self._notify_if_empty()
        return plan

    def discard(self, slot: Slot, usable: Callable[[Slot], bool]) -> Plan:
        """Take ``slot`` off the books, whatever its state; the plan closes it
        (unless already closed) and asks for replacements."""
        plan = Plan()
        if slot.state is SlotState.LENT:
            self._unlend(slot)
        elif slot.state is SlotState.RETURNING:
            self._returning.discard(slot)
        elif slot.state is SlotState.IDLE:
            self._idle.remove(slot)
        if slot.state is not SlotState.CLOSED:
            self._off_books(slot)
            plan.close.append(slot)
        plan += self.assign(usable)
        self._notify_if_empty()
        return plan

    # -- an engine's connections (AsyncConnectionPool.over) ----------------------

    def serve_no_queue(self) -> None:
        """Hand nothing to waiters and open nothing for them: the pool is a face
        over an engine, which serves its waiters itself (``_engine.py``)."""
        self._waiting = _NO_WAITERS

    def adopt(self, raw: PGConnection, key: Hashable | None, reuse: Slot | None = None) -> Slot:
        """A connection just taken from an engine, on the books and lent under
        ``key`` at once (it never lies idle here: it goes back to its engine).
        ``reuse``: the slot it had here before, if off the books, else a new one."""
        if reuse is not None and reuse.raw is raw and reuse.state is SlotState.CLOSED:
            slot = reuse
            slot.closed_by_pool = False
            slot.generation = self.generation
        else:
            slot = Slot(raw, self.generation, float("inf"))
        self._size += 1
        self._lend(slot, key)
        return slot

    def release(self, slot: Slot) -> None:
        """A lent or returning slot leaves the books with no closing planned: its
        connection went back to its engine. No-op for a slot already off them."""
        if slot.state is SlotState.LENT:
            self._unlend(slot)
        elif slot.state is SlotState.RETURNING:
            self._returning.discard(slot)
        else:
            return
        self._off_books(slot)
        self._notify_if_empty()

    # -- opening --------------------------------------------------------------

    def opened(self, slot: Slot, usable: Callable[[Slot], bool]) -> Plan:
        """A new connection in a slot reserved by a plan: idle, then to waiters
        (without the liveness peek: it was just opened)."""
        self._opening -= 1  # (the slot it reserved is on the books now: same size)
        return self._put_idle(slot, usable)

    def open_failed(self) -> None:
        """A reserved slot whose connection could not be opened is free again."""
        self._opening -= 1
        self._size -= 1

    # -- upkeep ---------------------------------------------------------------

    def evict_idle(self, evict: Callable[[Slot], bool], keep: int) -> list[Slot]:
        """Take idle slots off the books, oldest first, for which ``evict`` is true,
        while more than ``keep`` slots remain; the caller closes them."""
        evicted: list[Slot] = []
        for slot in list(self._idle):
            if self._size <= keep:
                break
            if evict(slot):
                self._idle.remove(slot)
                self._off_books(slot)
                evicted.append(slot)
        return evicted

    def resize(self, minconn: int, maxconn: int) -> list[Slot]:
        """New sizes; idle slots above the new ``maxconn`` come back, to close."""
        self.minconn, self.maxconn = minconn, maxconn
        return self.evict_idle(lambda _: True, keep=maxconn)

    def retire(self, which: Callable[[Slot], bool]) -> list[Slot]:
        """Retire the slots ``which`` picks: idle ones come back now, to close;
        lent ones are closed when they come back."""
        for slot in self._lent:
            if which(slot):
                slot.expires_at = 0.0
        return self.evict_idle(which, keep=0)

    def drain(self) -> list[Slot]:
        """Retire every slot: idle ones come back now, to close; lent ones are
        closed when they come back."""
        self.generation += 1
        return self.evict_idle(lambda _: True, keep=0)

    # -- closing --------------------------------------------------------------

    def start_closing(self) -> list[Slot]:
        """No more lending; idle slots come back, to close."""
        self.closing = True
        return self.evict_idle(lambda _: True, keep=0)

    def close_lent(self) -> list[Slot]:
        """Close-time deadline passed: take every lent (or still returning) slot
        off the books, marked as closed by the pool (a borrower's open
        transaction is lost; its ``connection()`` block raises)."""
        slots = [*self._lent, *self._returning]
        for slot in slots:
            self._unlend(slot)
            self._off_books(slot)
            slot.closed_by_pool = True
        self._returning.clear()
        self._notify_if_empty()
        return slots

    @property
    def empty(self) -> bool:
        """Nothing lent or being returned."""
        return not self._lent and not self._returning

    def when_empty(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once nothing is lent or being returned."""
        if self.empty:
            callback()
        else:
            self._on_empty.append(callback)

    def _notify_if_empty(self) -> None:
        if self._on_empty and self.empty:
            callbacks, self._on_empty = self._on_empty, []
            for callback in callbacks:
                callback()

    def snapshot(self) -> dict[str, Any]:
        """Gauges, for stats and ``repr``."""
        return {
            "pool_min": self.minconn,
            "pool_max": self.maxconn,
            "pool_size": self.size,
            "pool_available": len(self._idle),
        }
