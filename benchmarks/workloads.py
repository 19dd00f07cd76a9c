"""The workloads, each run on one contender and turned into a dict of figures.

1. ``select1``: ``SELECT 1`` from 50 tasks on a warmed pool of 10 (the OS-threads
   baseline runs 10 threads, one per connection);
2. ``checkout``: the same load, checkout and return alone, no query;
3. ``overload``: ``SELECT pg_sleep(0.005)`` from 200 tasks on a pool of 10;
   the ideal is ``10 / 0.005 = 2000`` ops/s;
4. ``spike``: HikariCP's spike test: behind a proxy that makes each connect take
   150 ms, 50 requests of ``SELECT pg_sleep(0.002)`` at once on a pool of
   min 5 / max 50 warmed with 5; connections opened during the spike (the
   proxy's accept counter) and the makespan;
5. ``waiters``: ``SELECT 1`` from 10 tasks, then from 2,000 tasks, on the same
   warmed pool of 10: ops/s of each and their ratio (what queueing costs per
   waiter; 1.0 = nothing);
6. realistic (:mod:`benchmarks.realistic`): ``row_by_key``, ``rows_100`` and
   ``write_tx`` from 50 tasks on a warmed pool of 10 (threads: 10), each on
   seeded tables, after a check that the contender returns the expected values.

Every workload reports the longest event-loop stall its 1 ms ticker saw.
Memory lives in :mod:`benchmarks.memory` (it needs fresh processes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from pgpool_async.testing.faultproxy import FaultProxy

from . import realistic
from .contenders import AsyncContender, PoolSpec, ThreadsContender
from .drivers import (
    AsyncOp,
    Burst,
    Samples,
    SyncOp,
    burst_async,
    burst_threads,
    drive_async,
    drive_threads,
    percentile,
)

if TYPE_CHECKING:  # (the OpenTelemetry SDK is imported for --traced runs only)
    from .traced import Tracing

__all__ = [
    "OVERLOAD_IDEAL",
    "Plan",
    "pool_round",
    "realistic_round",
    "spike_round",
]

POOL_SIZE = 10
SELECT1_SQL = "SELECT 1"
SELECT1_TASKS = 50
THREADS_PER_POOL = POOL_SIZE
OVERLOAD_SQL = "SELECT pg_sleep(0.005)"
OVERLOAD_SLEEP = 0.005
OVERLOAD_TASKS = 200
OVERLOAD_IDEAL = POOL_SIZE / OVERLOAD_SLEEP
SPIKE_SQL = "SELECT pg_sleep(0.002)"
SPIKE_REQUESTS = 50
SPIKE_MIN = 5
SPIKE_MAX = 50
SPIKE_CONNECT_DELAY = 0.15
CHECKOUT_SLEEP0_WORK = "checkout+sleep0"
WAITERS_FEW = POOL_SIZE
WAITERS_MANY = 2_000
# The first loop turn runs every new task's first step (65-100 ms for 2,000 on
# 2 busy cores): warm up past it, or it counts as a stall and as lost ops/s.
WAITERS_MANY_WARMUP = 0.3
OPEN_TIMEOUT = 60.0
MEASURE_SLACK = 60.0

Contender = AsyncContender | ThreadsContender


#: Each workload's measured window, as a fraction of ``--seconds``.
#: ``waiters`` measures twice (10 tasks, then 2,000), each for this fraction.
WINDOW_FRACTION = {
    "select1": 1.0,
    "overload": 0.5,
    "checkout": 0.25,
    CHECKOUT_SLEEP0_WORK: 0.25,
    "waiters": 0.25,
    **dict.fromkeys(realistic.WORKLOADS, 0.5),
}
REALISTIC_TASKS = SELECT1_TASKS
REALISTIC_THREADS = THREADS_PER_POOL


@dataclass(frozen=True)
class Plan:
    """How long to measure: ``seconds`` times the workload's :data:`WINDOW_FRACTION`,
    each after ``warmup`` seconds not counted."""

    seconds: float
    warmup: float

    def window(self, workload: str) -> float:
        """The measured window of ``workload``, in seconds."""
        return self.seconds * WINDOW_FRACTION[workload]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _errors(figures: dict[str, Any], errors: int, first_error: str | None) -> dict[str, Any]:
    if errors:
        figures["errors"] = errors
        figures["first_error"] = first_error
    return figures


def loop_figures(samples: Samples) -> dict[str, Any]:
    """ops/s, latency percentiles, stall, and connection waits when known."""
    p50 = percentile(samples.latencies, 50)
    p99 = percentile(samples.latencies, 99)
    figures: dict[str, Any] = {
        "ops_per_sec": round(samples.ops_per_sec, 1),
        "ops": samples.ops,
        "unfinished": samples.unfinished,
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "p99_over_p50": round(p99 / p50, 3) if p50 > 0 else None,
        "max_stall_ms": _ms(samples.max_gap),
    }
    if samples.waits:
        figures["wait_p50_ms"] = _ms(percentile(samples.waits, 50))
        figures["wait_p99_ms"] = _ms(percentile(samples.waits, 99))
    return _errors(figures, samples.errors, samples.first_error)


def burst_figures(burst: Burst, opened: int) -> dict[str, Any]:
    """Makespan, connections opened, latency percentiles, stall."""
    figures: dict[str, Any] = {
        "opened": opened,
        "makespan_ms": _ms(burst.makespan),
        "p50_ms": _ms(percentile(burst.latencies, 50)),
        "p99_ms": _ms(percentile(burst.latencies, 99)),
        "max_stall_ms": _ms(burst.max_gap),
    }
    return _errors(figures, burst.errors, burst.first_error)


@dataclass(frozen=True)
class Load:
    """One closed-loop load: the query (None: checkout alone), asyncio tasks, OS threads."""

    sql: str | None
    tasks: int
    threads: int
    yield_after: bool = False


SELECT1 = Load(SELECT1_SQL, SELECT1_TASKS, THREADS_PER_POOL)
CHECKOUT = Load(None, SELECT1_TASKS, THREADS_PER_POOL)
OVERLOAD = Load(OVERLOAD_SQL, OVERLOAD_TASKS, OVERLOAD_TASKS)
CHECKOUT_SLEEP0 = Load(None, SELECT1_TASKS, THREADS_PER_POOL, yield_after=True)
_LOADS = {
    "select1": SELECT1,
    "checkout": CHECKOUT,
    CHECKOUT_SLEEP0_WORK: CHECKOUT_SLEEP0,
    "overload": OVERLOAD,
}
WAITERS_LOADS = (Load(SELECT1_SQL, WAITERS_FEW, WAITERS_FEW), Load(SELECT1_SQL, WAITERS_MANY, WAITERS_MANY))


async def closed_loop(contender: Contender, load: Load, warmup: float, duration: float) -> Samples:
    """Run the query operation (or the checkout one) in a closed loop.

    Checkout operations return None: no wait for a connection is recorded then.
    """
    if isinstance(contender, ThreadsContender):
        sync_op = contender.checkout_sync if load.sql is None else partial(contender.query_sync, load.sql)
        run = drive_threads(sync_op, load.threads, warmup, duration)
    else:
        async_op = (
            _checkout_op(contender, load.yield_after)
            if load.sql is None
            else partial(contender.query, load.sql)
        )
        run = drive_async(async_op, load.tasks, warmup, duration)
    return await asyncio.wait_for(run, warmup + duration + MEASURE_SLACK)


def _checkout_op(contender: AsyncContender, yield_after: bool) -> AsyncOp:
    """The checkout operation; with ``yield_after``, followed by ``asyncio.sleep(0)``
    so that a checkout that never suspends still lets the other tasks run."""

    async def checkout() -> None:
        await contender.checkout()

    async def checkout_then_yield() -> None:
        await contender.checkout()
        await asyncio.sleep(0)

    return checkout_then_yield if yield_after else checkout


async def pool_round(
    cls: type[Contender], dsn: str, plan: Plan, enabled: frozenset[str]
) -> dict[str, dict[str, Any]]:
    """One round of the pool-of-10 workloads on a fresh pool of ``cls``, those in
    ``enabled``: ``select1`` for all, ``checkout`` for representatives, ``overload``
    and ``waiters`` for those marked so."""
    wanted = [
        work
        for work, applies in (
            ("select1", True),
            ("checkout", cls.representative),
            (CHECKOUT_SLEEP0_WORK, cls.checkout_sleep0),
            ("overload", cls.overload),
            ("waiters", cls.waiters and not issubclass(cls, ThreadsContender)),
        )
        if applies and work.split("+")[0] in enabled
    ]
    if not wanted:
        return {}
    contender = cls()
    results: dict[str, dict[str, Any]] = {}
    try:
        await asyncio.wait_for(contender.open(PoolSpec(dsn, POOL_SIZE, POOL_SIZE)), OPEN_TIMEOUT)
    except Exception as exc:
        return {work: {"error": f"open failed: {type(exc).__name__}: {exc}"} for work in wanted}
    try:
        for work in wanted:
            if work == "waiters":
                results[work] = await _measure_waiters(contender, plan.warmup, plan.window(work))
            else:
                results[work] = await _measure(contender, _LOADS[work], plan.warmup, plan.window(work))
        if "ops_per_sec" in results.get("overload", {}):
            results["overload"]["ops_vs_ideal"] = round(
                results["overload"]["ops_per_sec"] / OVERLOAD_IDEAL, 4
            )
    finally:
        await asyncio.wait_for(contender.close(), OPEN_TIMEOUT)
    return results


async def _measure(contender: Contender, load: Load, warmup: float, duration: float) -> dict[str, Any]:
    try:
        samples = await closed_loop(contender, load, warmup, duration)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return loop_figures(samples)


async def _measure_waiters(contender: Contender, warmup: float, duration: float) -> dict[str, Any]:
    """Closed-loop ``SELECT 1`` from :data:`WAITERS_FEW` tasks, then :data:`WAITERS_MANY`
    on the same pool: both ops/s and ``many_over_few``; latency of the many; the
    longer stall of the two."""
    few_load, many_load = WAITERS_LOADS
    try:
        few = await closed_loop(contender, few_load, warmup, duration)
        many = await closed_loop(contender, many_load, max(warmup, WAITERS_MANY_WARMUP), duration)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    p50 = percentile(many.latencies, 50)
    p99 = percentile(many.latencies, 99)
    figures: dict[str, Any] = {
        "tasks_few": few_load.tasks,
        "tasks_many": many_load.tasks,
        "ops_per_sec_few": round(few.ops_per_sec, 1),
        "ops_per_sec_many": round(many.ops_per_sec, 1),
        "many_over_few": round(many.ops_per_sec / few.ops_per_sec, 4) if few.ops_per_sec > 0 else None,
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "max_stall_ms": _ms(max(few.max_gap, many.max_gap)),
    }
    first_error = few.first_error or many.first_error
    return _errors(figures, few.errors + many.errors, first_error)


async def spike_round(cls: type[Contender], proxy: FaultProxy, dsn: str) -> dict[str, Any]:
    """One spike on a fresh pool (min 5, max 50) opened through ``proxy`` without delay;
    the 150 ms connect delay is switched on just before the 50 requests start."""
    await asyncio.to_thread(proxy.passthrough)
    contender = cls()
    try:
        await asyncio.wait_for(contender.open(PoolSpec(proxy.dsn(dsn), SPIKE_MIN, SPIKE_MAX)), OPEN_TIMEOUT)
    except Exception as exc:
        return {"error": f"open failed: {type(exc).__name__}: {exc}"}
    try:
        await asyncio.sleep(0.05)  # let pools that open in the background settle
        await asyncio.to_thread(proxy.delay, SPIKE_CONNECT_DELAY)
        before = proxy.connections_accepted
        if isinstance(contender, ThreadsContender):
            run = burst_threads(partial(contender.query_sync, SPIKE_SQL), SPIKE_REQUESTS)
        else:
            run = burst_async(partial(contender.query, SPIKE_SQL), SPIKE_REQUESTS)
        burst = await asyncio.wait_for(run, MEASURE_SLACK)
        opened = proxy.connections_accepted - before
        return burst_figures(burst, opened)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        await asyncio.to_thread(proxy.passthrough)
        await asyncio.wait_for(contender.close(), OPEN_TIMEOUT)


# -- realistic: seeded tables, 8 mixed columns --------------------------------------------------


def _realistic_async(contender: AsyncContender, work: str) -> AsyncOp:
    """The operation of ``work``, a fresh random key (or new row) each time."""

    async def row_by_key() -> None:
        await contender.row_by_key(realistic.random_key())

    async def rows_100() -> None:
        first = realistic.random_first()
        await contender.rows_range(first, first + realistic.RANGE_ROWS - 1)

    async def write_tx() -> None:
        await contender.write_tx(realistic.new_row())

    ops: dict[str, AsyncOp] = {"row_by_key": row_by_key, "rows_100": rows_100, "write_tx": write_tx}
    return ops[work]


def _realistic_sync(contender: ThreadsContender, work: str) -> SyncOp:
    """The same for OS threads."""

    def row_by_key() -> None:
        contender.row_by_key_sync(realistic.random_key())

    def rows_100() -> None:
        first = realistic.random_first()
        contender.rows_range_sync(first, first + realistic.RANGE_ROWS - 1)

    def write_tx() -> None:
        contender.write_tx_sync(realistic.new_row())

    ops: dict[str, SyncOp] = {
        "row_by_key": row_by_key,
        "rows_100": rows_100,
        "write_tx": write_tx,
    }
    return ops[work]


async def realistic_sample(contender: Contender, wanted: list[str]) -> dict[str, Any]:
    """One result of each workload in ``wanted``, on fixed keys, normalised for
    :func:`realistic.compare_samples`: rows as ``((type, value), ...)``; ``write_tx``
    as the type name of the id it returned."""
    first, last = realistic.SAMPLE_KEY, realistic.SAMPLE_KEY + realistic.RANGE_ROWS - 1
    sample: dict[str, Any] = {}
    if isinstance(contender, ThreadsContender):
        if "row_by_key" in wanted:
            sample["row_by_key"] = await asyncio.to_thread(contender.row_by_key_sync, first)
        if "rows_100" in wanted:
            sample["rows_100"] = await asyncio.to_thread(contender.rows_range_sync, first, last)
        if "write_tx" in wanted:
            sample["write_tx"] = await asyncio.to_thread(contender.write_tx_sync, realistic.new_row())
    else:
        if "row_by_key" in wanted:
            sample["row_by_key"] = await contender.row_by_key(first)
        if "rows_100" in wanted:
            sample["rows_100"] = await contender.rows_range(first, last)
        if "write_tx" in wanted:
            sample["write_tx"] = await contender.write_tx(realistic.new_row())
    if "row_by_key" in sample:
        sample["row_by_key"] = realistic.normalise_row(sample["row_by_key"])
    if "rows_100" in sample:
        sample["rows_100"] = [realistic.normalise_row(row) for row in sample["rows_100"]]
    if "write_tx" in sample:
        sample["write_tx"] = type(sample["write_tx"]).__name__
    return sample


async def realistic_round(
    cls: type[Contender],
    dsn: str,
    plan: Plan,
    enabled: frozenset[str],
    check: bool,
    tracing: Tracing | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """One round of the realistic workloads in ``enabled`` that ``cls`` runs, on a
    fresh pool of 10 (asyncpg with its jsonb codec); with ``check``, first one
    result of each on fixed keys (see :func:`realistic_sample`), returned next to
    the figures (None when the pool did not open).

    With ``tracing`` (``--traced``): ``cls``'s instrumentation is on from before its
    pool opens until after it closes, each operation runs in a request span, and
    each workload's figures get ``db_spans``, the database spans it made (warmup
    included).

    :raises realistic.Mismatch: with ``check``, a result not of the expected types.
    """
    wanted = [work for work in realistic.WORKLOADS if work in enabled and work in cls.realistic]
    if not wanted:
        return {}, None
    if tracing is None:
        return await _realistic_round(cls, dsn, plan, wanted, check, None)
    with tracing.instrumented(cls):
        return await _realistic_round(cls, dsn, plan, wanted, check, tracing)


async def _realistic_round(
    cls: type[Contender], dsn: str, plan: Plan, wanted: list[str], check: bool, tracing: Tracing | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    contender = cls()
    try:
        spec = PoolSpec(dsn, POOL_SIZE, POOL_SIZE, jsonb_codec=True)
        await asyncio.wait_for(contender.open(spec), OPEN_TIMEOUT)
    except Exception as exc:
        return {work: {"error": f"open failed: {type(exc).__name__}: {exc}"} for work in wanted}, None
    results: dict[str, dict[str, Any]] = {}
    sample: dict[str, Any] | None = None
    try:
        if check:
            sample = await asyncio.wait_for(realistic_sample(contender, wanted), MEASURE_SLACK)
            realistic.check_sample(cls.key, sample)
        for work in wanted:
            before = tracing.db_spans() if tracing is not None else 0
            results[work] = await _measure_realistic(contender, work, plan.warmup, plan.window(work), tracing)
            if tracing is not None:
                results[work]["db_spans"] = tracing.db_spans() - before
    finally:
        await asyncio.wait_for(contender.close(), OPEN_TIMEOUT)
    return results, sample


async def _measure_realistic(
    contender: Contender, work: str, warmup: float, duration: float, tracing: Tracing | None = None
) -> dict[str, Any]:
    if isinstance(contender, ThreadsContender):
        sync_op = _realistic_sync(contender, work)
        if tracing is not None:
            sync_op = tracing.wrap_sync(sync_op)
        run = drive_threads(sync_op, REALISTIC_THREADS, warmup, duration)
    else:
        async_op = _realistic_async(contender, work)
        if tracing is not None:
            async_op = tracing.wrap_async(async_op)
        run = drive_async(async_op, REALISTIC_TASKS, warmup, duration)
    try:
        samples = await asyncio.wait_for(run, warmup + duration + MEASURE_SLACK)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return loop_figures(samples)
