"""Upkeep: lifetimes, idle limits, ``minconn``, leaks and dropped connections.

One background task (:meth:`Upkeep.run`) wakes every :attr:`Upkeep.interval`
seconds and, through the ledger: retires idle connections past
``max_lifetime`` or idle past ``max_idle`` (above ``minconn``), asks for
connections to refill ``minconn``, warns about loans past ``leak_threshold``,
and recovers the slots of lent connections garbage-collected without being
returned. It holds the pool only weakly, so a pool dropped without ``close()``
can still be collected (and warn).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from .health import Health
from .leaks import describe
from .ledger import Ledger, Plan, Slot, SlotState
from .stats import PoolStats

__all__ = ["Upkeep"]

logger = logging.getLogger("pgpool_async")


class Upkeep:
    """The pool's periodic maintenance; see the module docstring.

    ``apply(plan)`` carries out a ledger decision and returns False once the
    pool is gone (it is held weakly); ``recover(slot)`` takes back a slot whose
    borrower was garbage-collected.
    """

    def __init__(
        self,
        *,
        name: str,
        ledger: Ledger,
        health: Health,
        stats: PoolStats,
        leak_threshold: float | None,
        apply: Callable[[Plan], bool],
        recover: Callable[[Slot], bool],
        usable: Callable[[Slot], bool],
    ) -> None:
        self._name = name
        self._ledger = ledger
        self._health = health
        self._stats = stats
        self.leak_threshold = leak_threshold
        self._apply = apply
        self._recover = recover
        self._usable = usable

    @property
    def interval(self) -> float:
        periods = [1.0]
        for value in (self._health.max_idle, self._health.max_lifetime, self.leak_threshold):
            if value is not None:
                periods.append(value / 4)
        return max(0.02, min(periods))

    async def run(self) -> None:
        """Forever, until the pool is gone or closing (a background task)."""
        while not self._ledger.closing:
            await anyio.sleep(self.interval)
            if not self.run_once():
                return

    def run_once(self) -> bool:
        """One round of upkeep; False once the pool is gone."""
        ledger = self._ledger
        if ledger.closing:
            return False
        alive = self._recover_orphans()
        self._report_leaks()
        now = time.monotonic()
        plan = Plan(close=ledger.evict_idle(lambda slot: ledger.retired(slot, now), keep=0))
        if self._health.max_idle is not None:
            plan.close += ledger.evict_idle(
                lambda slot: self._health.idle_too_long(slot.idle_since, now), keep=ledger.minconn
            )
        plan += ledger.assign(self._usable)
        return self._apply(plan) and alive

    def _recover_orphans(self) -> bool:
        ledger = self._ledger
        while ledger.orphans:
            slot = ledger.orphans.pop()
            if slot.state is not SlotState.LENT:
                continue
            self._stats.connections_leaked += 1
            logger.warning(
                "pool %r: a connection was garbage-collected without being returned; "
                "its slot is recovered. It was taken at %s",
                self._name,
                describe(slot.taken_at),
            )
            if not self._recover(slot):
                return False
        return True

    def _report_leaks(self) -> None:
        if self.leak_threshold is None:
            return
        now = time.monotonic()
        for slot in self._ledger.lent():
            if slot.leak_reported or now - slot.lent_at < self.leak_threshold:
                continue
            slot.leak_reported = True
            self._stats.connections_leaked += 1
            logger.warning(
                "pool %r: a connection has been lent for %.1f s (leak_threshold=%s) and not "
                "returned. It was taken at %s",
                self._name,
                now - slot.lent_at,
                self.leak_threshold,
                describe(slot.taken_at),
            )
