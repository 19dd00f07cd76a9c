"""The ledger (:mod:`pgpool_async._loop.ledger`), with no server: the raw connections
it books are opaque to it, so plain objects stand in for them here."""

from __future__ import annotations

import math
import random
import time

import pytest

from pgpool_async._loop.ledger import Ledger, Plan, Slot, SlotState
from pgpool_async._loop.waiting import WaitQueue

pytestmark = pytest.mark.single_io("the ledger alone: no statements on a pool")


def always(_slot: Slot) -> bool:
    return True


def slot(ledger: Ledger, expires_at: float = float("inf")) -> Slot:
    return Slot(object(), ledger.generation, expires_at)  # type: ignore[arg-type]


def reserve(ledger: Ledger, n: int) -> None:
    """Reserve ``n`` slots to open, the way assign() does to reach ``minconn``."""
    minconn, ledger.minconn = ledger.minconn, ledger.size + n
    assert ledger.assign(always).open == n
    ledger.minconn = minconn


def counted(ledger: Ledger) -> int:
    """The ledger's size counted from its collections (what ``size`` keeps)."""
    return ledger.idle_count + ledger.lent_count + ledger.returning_count + ledger.opening_count


def opened(ledger: Ledger, n: int) -> list[Slot]:
    """Fill ``n`` reserved slots the way the opener does."""
    slots = [slot(ledger) for _ in range(n)]
    for s in slots:
        ledger.opened(s, always)
    return slots


# -- the ledger ---------------------------------------------------------------


def test_ledger_asks_for_minconn_then_one_at_a_time_for_waiters() -> None:
    queue = WaitQueue()
    ledger = Ledger(2, 4, queue)
    plan = ledger.assign(always)
    assert plan.open == 2 and ledger.size == 2
    assert ledger.assign(always).open == 0  # already opening
    opened(ledger, 2)
    taken = [ledger.take(None, always)[0] for _ in range(2)]
    assert all(s is not None and s.state is SlotState.LENT for s in taken)
    queue.push(None)
    queue.push(None)
    assert ledger.assign(always).open == 1  # one at a time while requests wait
    assert ledger.assign(always).open == 0
    assert ledger.size == 3


def test_ledger_never_exceeds_maxconn() -> None:
    queue = WaitQueue()
    ledger = Ledger(0, 2, queue)
    for _ in range(10):
        queue.push(None)
    total = ledger.assign(always).open
    while ledger.opening_count:
        total += ledger.opened(slot(ledger), always).open
        assert ledger.size <= 2
    assert total == 2 and ledger.lent_count == 2 and len(queue) == 8


def test_ledger_hands_idle_to_waiters_in_order_and_returns_come_back() -> None:
    queue = WaitQueue()
    ledger = Ledger(0, 1, queue)
    ledger.assign(always)
    assert ledger.size == 0
    first, second = queue.push("a"), queue.push("b")
    plan = ledger.assign(always)
    assert plan.open == 1
    (s,) = opened(ledger, 1)
    assert first.done and not second.done and s.key == "a"
    ledger.begin_return(s)
    assert ledger.returning_count == 1
    ledger.check_in(s, always)
    assert second.done and s.key == "b" and s.state is SlotState.LENT


def test_ledger_sets_aside_retired_and_broken_idle_connections() -> None:
    ledger = Ledger(0, 3, WaitQueue())
    reserve(ledger, 3)
    old, broken, good = slot(ledger), slot(ledger), slot(ledger)
    for s in (good, broken, old):
        ledger.opened(s, always)
    old.expires_at = time.monotonic() - 1  # went past its lifetime while idle
    taken, plan = ledger.take(None, lambda s: s is not broken)
    assert taken is good
    assert plan.close == [old, broken] and {s.state for s in plan.close} == {SlotState.CLOSED}
    assert ledger.size == 1


def test_ledger_close_marks_lent_connections_closed_by_pool() -> None:
    ledger = Ledger(0, 2, WaitQueue())
    reserve(ledger, 2)
    opened(ledger, 2)
    lent, _ = ledger.take(None, always)
    idle = ledger.start_closing()
    assert len(idle) == 1 and ledger.take(None, always)[0] is None
    emptied: list[bool] = []
    ledger.when_empty(lambda: emptied.append(True))
    assert not emptied
    closed = ledger.close_lent()
    assert closed == [lent] and lent is not None and lent.closed_by_pool
    assert emptied == [True] and ledger.size == 0
    # The borrower's late return changes nothing.
    assert lent.state is SlotState.CLOSED
    assert ledger.check_in(lent, always) == Plan() and ledger.size == 0


def test_ledger_returns_after_drain_or_shrink_close() -> None:
    ledger = Ledger(0, 2, WaitQueue())
    reserve(ledger, 2)
    opened(ledger, 2)
    lent, _ = ledger.take(None, always)
    assert lent is not None
    assert len(ledger.drain()) == 1  # the idle one
    ledger.begin_return(lent)
    plan = ledger.check_in(lent, always)
    assert plan.close == [lent] and ledger.size == 0


def test_ledger_give_back_and_discard_keep_counts_exact() -> None:
    queue = WaitQueue()
    ledger = Ledger(1, 2, queue)
    ledger.assign(always)
    (s,) = opened(ledger, 1)
    taken, _ = ledger.take(None, always)
    assert taken is s and ledger.idle_count == 0
    ledger.give_back(s, always)
    assert ledger.idle_count == 1 and ledger.lent_count == 0
    taken, _ = ledger.take(None, always)
    assert taken is not None
    plan = ledger.discard(taken, always)
    assert plan.close == [taken] and plan.open == 1  # minconn refilled
    assert ledger.size == 1 and ledger.opening_count == 1


def test_ledger_size_stays_the_count_of_its_slots_through_every_move() -> None:
    """``size`` is kept as slots come and go: after any sequence of the ledger's
    moves (the pool closing mid-way, slots it closed coming back, retiring and
    shrinking included) it equals the slots counted in each state."""
    rng = random.Random(11)
    for _ in range(40):
        queue = WaitQueue()
        ledger = Ledger(rng.randint(0, 3), rng.randint(3, 6), queue)
        opening = ledger.assign(always).open
        lent: list[Slot] = []
        returning: list[Slot] = []
        closed: list[Slot] = []  # closed by the pool while lent or returning
        for _ in range(200):
            move = rng.randrange(15)
            plan: Plan | None = None
            if move == 0 and opening:
                opening -= 1
                plan = ledger.opened(slot(ledger, rng.choice([math.inf, 0.0])), always)
            elif move == 1 and opening:
                opening -= 1
                ledger.open_failed()
            elif move == 2:
                taken, plan = ledger.take(None, lambda s: rng.random() > 0.1)
                if taken is not None:
                    lent.append(taken)
            elif move == 3 and lent:
                s = lent.pop(rng.randrange(len(lent)))
                plan = ledger.return_clean(s, always)
                if plan is None:  # to be closed: the long way, as the pool does
                    ledger.begin_return(s)
                    returning.append(s)
            elif move == 4 and lent:
                s = lent.pop(rng.randrange(len(lent)))
                ledger.begin_return(s)
                returning.append(s)
            elif move == 5 and returning:
                plan = ledger.check_in(returning.pop(), always)
            elif move == 6 and (lent or returning):
                pool = lent if lent and (not returning or rng.random() < 0.5) else returning
                plan = ledger.discard(pool.pop(), always)
            elif move == 7:
                queue.push(None)
            elif move == 8:
                ledger.drain()
            elif move == 9:
                ledger.resize(ledger.minconn, max(ledger.minconn, 1, ledger.maxconn + rng.choice([-1, 1])))
            elif move == 10 and lent:
                plan = ledger.give_back(lent.pop(), always)
            elif move == 11 and rng.random() < 0.2:
                closed += ledger.close_lent()
            elif move == 12 and closed:
                s = closed.pop()
                plan = ledger.check_in(s, always) if rng.random() < 0.5 else ledger.discard(s, always)
            elif move == 13 and rng.random() < 0.05:
                ledger.start_closing()
            elif move == 14:
                ledger.retire(lambda s: rng.random() < 0.3)
            if plan is not None:
                opening += plan.open
            opening += ledger.assign(always).open
            lent = [s for s in lent if s.state is SlotState.LENT]  # (handed on by a return)
            returning = [s for s in returning if s.state is SlotState.RETURNING]  # (closed: in closed)
            assert ledger.size == counted(ledger)
            assert ledger.opening_count == opening
        for s in ledger.close_lent():
            assert s.state is SlotState.CLOSED
        assert ledger.size == counted(ledger) == ledger.opening_count
