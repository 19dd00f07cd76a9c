"""Real network faults: the kernel's own TCP through a router namespace that drops packets.

Each scenario runs against a :class:`~pgpool_async.testing.netns.NetLab` (a
throwaway server behind a router namespace; root only) with pgpool_async or,
for comparison, psycopg_pool (``kind="psycopg_pool"``), both with their default
settings unless the scenario says otherwise. ``tests/test_network_faults.py``
runs them and asserts on their ``details``; ``python -m benchmarks.faults
--network`` prints their rows. A 10 ms ticker measures the event loop's longest
stall in every scenario (``details["max_gap"]``).

1. :func:`blackhole_mid_query`: a query in flight when the network goes silent.
2. :func:`blackhole_at_connect`: requests while SYNs are dropped, then healing.
3. :func:`wait_for_in_blackhole`: ``asyncio.wait_for(query, 3)`` in a blackhole.
4. :func:`close_in_blackhole`: ``close(timeout=2)`` while a query is blackholed.
5. :func:`packet_loss`: queries for a while under random packet loss.
6. :func:`latency`: queries through 50 ms of added latency each way (``tc netem``).
7. :func:`kill_postmaster`: ``kill -9`` of the postmaster under load, then a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
import psycopg2

from pgpool_async import AsyncConnectionPool
from pgpool_async.testing.netns import NetLab, NetLabUnavailable

from ._harness import (
    LoopTicker,
    Request,
    ScenarioResult,
    busy_threads,
    error_counts,
    render_table,
    timed,
    wait_no_busy_threads,
)

__all__ = [
    "KINDS",
    "Pool",
    "blackhole_at_connect",
    "blackhole_mid_query",
    "close_in_blackhole",
    "kill_postmaster",
    "latency",
    "main",
    "open_pool",
    "packet_loss",
    "wait_for_in_blackhole",
]

KINDS = ("pgpool_async", "psycopg_pool")
TICK = 0.01


class Pool(Protocol):
    """What the scenarios need of either pool."""

    name: str

    async def fetchval(self, sql: str) -> Any: ...

    async def close(self, timeout: float) -> None: ...

    def stats(self) -> dict[str, int]: ...


class _Ours:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self.name = pool.name

    async def fetchval(self, sql: str) -> Any:
        return await self._pool.fetchval(sql)

    async def close(self, timeout: float) -> None:
        await self._pool.close(timeout=timeout)

    def stats(self) -> dict[str, int]:
        return self._pool.get_stats()


class _Psycopg:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.name = pool.name

    async def fetchval(self, sql: str) -> Any:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql)
            row = await cur.fetchone()
            return None if row is None else row[0]

    async def close(self, timeout: float) -> None:
        await self._pool.close(timeout=timeout)

    def stats(self) -> dict[str, int]:
        return dict(self._pool.get_stats())


@contextlib.asynccontextmanager
async def open_pool(kind: str, dsn: str, minconn: int, maxconn: int, **options: Any) -> AsyncIterator[Pool]:
    """An opened pool of ``kind`` (closed at the end, with a 2 s bound)."""
    name = f"net-{uuid.uuid4().hex[:8]}"
    timeout = options.pop("timeout", 30.0)
    pool: Pool
    if kind == "pgpool_async":
        ours = AsyncConnectionPool(minconn, maxconn, dsn, name=name, timeout=timeout, **options)
        await ours.open()
        pool = _Ours(ours)
    elif kind == "psycopg_pool":
        import psycopg_pool

        theirs = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=minconn, max_size=maxconn, name=name, timeout=timeout, open=False, kwargs=options
        )
        await theirs.open(wait=minconn > 0, timeout=timeout)
        pool = _Psycopg(theirs)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    try:
        yield pool
    finally:
        _last_stats[id(pool)] = pool.stats()
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await pool.close(2.0)


_last_stats: dict[int, dict[str, int]] = {}


def _opened(pool: Pool) -> int:
    """Connections the pool opened (attempts minus failures), as it closed."""
    stats = _last_stats.pop(id(pool), None) or pool.stats()
    return stats.get("connections_num", 0) - stats.get("connections_errors", 0)


@contextlib.asynccontextmanager
async def _ticking() -> AsyncIterator[LoopTicker]:
    ticker = LoopTicker(TICK)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        try:
            yield ticker
        finally:
            tg.cancel_scope.cancel()


async def _lab(func: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(func, *args)


async def _until_ok(pool: Pool, limit: float, sql: str = "SELECT 1") -> tuple[float | None, list[Request]]:
    """Retry a query (1 s bound each, 50 ms apart) until one succeeds; seconds taken."""
    start = time.monotonic()
    tries: list[Request] = []
    while time.monotonic() - start < limit:
        with anyio.move_on_after(1.0):
            record = await timed(lambda: pool.fetchval(sql))
            tries.append(record)
            if record.ok:
                return time.monotonic() - start, tries
        await anyio.sleep(0.05)
    return None, tries


def _result(
    pool: Pool,
    name: str,
    kind: str,
    records: list[Request],
    recovery: float | None,
    notes: str,
    **details: Any,
) -> ScenarioResult:
    errors = [r for r in records if not r.ok]
    return ScenarioResult(
        scenario=f"{name} ({kind})",
        requests=len(records),
        errors=len(errors),
        errors_after_recovery=details.pop("errors_after_recovery", None),
        recovery_s=recovery,
        connections_opened=_opened(pool),
        notes=notes,
        details={"records": records, "errors_by_type": error_counts(records), **details},
    )


def _fmt(value: float | None, limit: float) -> str:
    return f"> {limit:.0f} s" if value is None else f"{value:.1f} s"


# -- 1. a query in flight when the network goes silent ------------------------------------


async def blackhole_mid_query(lab: NetLab, kind: str = "pgpool_async", limit: float = 40.0) -> ScenarioResult:
    """``pg_sleep(2)`` running, then every packet dropped; default pool settings.

    Records when the query ended (seconds after the blackhole; None past
    ``limit``), then heals and records how long until a query succeeds again.
    """
    async with _ticking() as ticker, open_pool(kind, lab.dsn, 1, 2) as pool:
        ended: list[Request] = []

        async def query() -> None:
            ended.append(await timed(lambda: pool.fetchval("SELECT pg_sleep(2)")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(query)
            await anyio.sleep(0.5)
            await _lab(lab.blackhole, limit + 20)
            cut = time.monotonic()
            with anyio.move_on_after(limit):
                while not ended:
                    await anyio.sleep(0.05)
            query_end = ended[0].end - cut if ended else None
            await _lab(lab.heal)
            recovery, tries = await _until_ok(pool, 30.0)  # measured from the healing
            tg.cancel_scope.cancel()
    return _result(
        pool,
        "blackhole mid-query",
        kind,
        ended + tries,
        recovery,
        f"query ended {_fmt(query_end, limit)} after the blackhole "
        f"({ended[0].error if ended else 'still running'}); loop max stall {ticker.max_gap * 1000:.0f} ms",
        query_end_s=query_end,
        query_error=ended[0].error if ended else None,
        max_gap=ticker.max_gap,
    )


# -- 2. requests while SYNs are dropped -------------------------------------------------------


async def blackhole_at_connect(lab: NetLab, kind: str = "pgpool_async") -> ScenarioResult:
    """An empty pool (0, 2, ``timeout=2``); 4 requests while SYNs are dropped (each
    must get its timeout on schedule); healing after 5 s: how long until one succeeds."""
    async with _ticking() as ticker, open_pool(kind, lab.dsn, 0, 2, timeout=2.0) as pool:
        await _lab(lab.blackhole, 60.0)
        records: list[Request] = []

        async def one() -> None:
            records.append(await timed(lambda: pool.fetchval("SELECT 1")))

        cut = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        # Down 5 s in all: the pool's connects are mid-flight when the network heals.
        await anyio.sleep(max(0.0, cut + 5.0 - time.monotonic()))
        await _lab(lab.heal)
        recovery, tries = await _until_ok(pool, 30.0)
    waits = [r.elapsed for r in records]
    return _result(
        pool,
        "blackhole at connect",
        kind,
        records + tries,
        recovery,
        f"4 waiters: {', '.join(sorted({str(r.error) for r in records}))} after "
        f"{min(waits):.2f}-{max(waits):.2f} s (timeout 2); back {_fmt(recovery, 30)} after healing; "
        f"loop max stall {ticker.max_gap * 1000:.0f} ms",
        waiter_records=records,
        max_gap=ticker.max_gap,
    )


# -- 3. asyncio.wait_for around a blackholed query ------------------------------------------


async def wait_for_in_blackhole(lab: NetLab, kind: str = "pgpool_async") -> ScenarioResult:
    """Pool (1, 1); blackhole; ``asyncio.wait_for(fetchval("SELECT pg_sleep(0.5)"), 3)``
    (asyncio only). Records when ``wait_for`` returned, then heals."""
    async with _ticking() as ticker, open_pool(kind, lab.dsn, 1, 1) as pool:
        await _lab(lab.blackhole, 90.0)
        start = time.monotonic()
        outcome = "returned"
        try:
            await asyncio.wait_for(pool.fetchval("SELECT pg_sleep(0.5)"), 3)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            outcome = "TimeoutError"
        except Exception as exc:
            outcome = type(exc).__name__
        returned = time.monotonic() - start
        gap_during = ticker.max_gap
        await _lab(lab.heal)
        recovery, tries = await _until_ok(pool, 30.0)
        name = pool.name
    # Closed: none of the pool's threads may be left (2 s to wind down).
    threads = (await wait_no_busy_threads([name], 2.0))[0] if kind == "pgpool_async" else []
    return _result(
        pool,
        "wait_for(query, 3) in a blackhole",
        kind,
        tries,
        recovery,
        f"wait_for returned after {returned:.1f} s ({outcome}); loop max stall "
        f"{gap_during * 1000:.0f} ms; back {_fmt(recovery, 30)} after healing",
        returned_s=returned,
        outcome=outcome,
        max_gap=ticker.max_gap,
        threads_busy=threads,
    )


# -- 4. close(timeout=2) while a query is blackholed --------------------------------------------


async def close_in_blackhole(lab: NetLab, kind: str = "pgpool_async") -> ScenarioResult:
    """Pool (1, 1), a query running, blackhole, then ``close(timeout=2)``: how long
    it takes, and the pool's threads still busy 1 s later."""
    async with _ticking() as ticker:
        cm = open_pool(kind, lab.dsn, 1, 1)
        pool = await cm.__aenter__()
        holder: list[Request] = []

        async def hold() -> None:
            holder.append(await timed(lambda: pool.fetchval("SELECT pg_sleep(1)")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await anyio.sleep(0.2)
            await _lab(lab.blackhole, 90.0)
            start = time.monotonic()
            with anyio.move_on_after(60):
                await pool.close(2.0)
            closed = time.monotonic() - start
            await anyio.sleep(1.0)
            threads = busy_threads([pool.name]) if kind == "pgpool_async" else []
            with anyio.move_on_after(1.0):
                while not holder:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        await _lab(lab.heal)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await cm.__aexit__(None, None, None)
    return _result(
        pool,
        "close(timeout=2) in a blackhole",
        kind,
        holder,
        None,
        f"close returned after {closed:.1f} s; holder got {holder[0].error if holder else 'nothing yet'}; "
        f"threads busy 1 s later: {len(threads)}; loop max stall {ticker.max_gap * 1000:.0f} ms",
        close_s=closed,
        threads_busy=threads,
        max_gap=ticker.max_gap,
    )


# -- 5. packet loss ---------------------------------------------------------------------------------


async def packet_loss(
    lab: NetLab,
    kind: str = "pgpool_async",
    probability: float = 0.3,
    seconds: float = 25.0,
    both_ways: bool = False,
) -> ScenarioResult:
    """4 tasks run ``SELECT 1`` in a loop for ``seconds`` while each packet towards
    the server (and back, with ``both_ways``) is dropped with ``probability``;
    pool (4, 4), default settings."""
    async with _ticking() as ticker, open_pool(kind, lab.dsn, 4, 4) as pool:
        records: list[Request] = []
        await _lab(lab.loss, probability, seconds + 30, both_ways)
        deadline = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < deadline:
                records.append(await timed(lambda: pool.fetchval("SELECT 1")))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(loop)
        await _lab(lab.heal)
        slowest = max((r.elapsed for r in records), default=0.0)
    return _result(
        pool,
        f"{probability:.0%} packet loss {'both ways' if both_ways else 'to the server'} for {seconds:.0f} s",
        kind,
        records,
        None,
        f"slowest request {slowest:.1f} s; loop max stall {ticker.max_gap * 1000:.0f} ms",
        slowest_s=slowest,
        max_gap=ticker.max_gap,
    )


# -- 6. latency -----------------------------------------------------------------------------------


async def latency(lab: NetLab, kind: str = "pgpool_async", delay_ms: float = 50.0) -> ScenarioResult:
    """``tc netem`` delay each way; 4 tasks, 5 s of ``SELECT 1``.

    :raises NetLabUnavailable: the kernel has no ``sch_netem``.
    """
    await _lab(lab.latency, delay_ms, 60.0)
    try:
        async with _ticking() as ticker, open_pool(kind, lab.dsn, 4, 4) as pool:
            records: list[Request] = []
            deadline = time.monotonic() + 5.0

            async def loop() -> None:
                while time.monotonic() < deadline:
                    records.append(await timed(lambda: pool.fetchval("SELECT 1")))

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(loop)
    finally:
        await _lab(lab.heal)
    fastest = min((r.elapsed for r in records if r.ok), default=0.0)
    return _result(
        pool,
        f"{delay_ms:.0f} ms latency each way",
        kind,
        records,
        None,
        f"fastest request {fastest * 1000:.0f} ms; loop max stall {ticker.max_gap * 1000:.0f} ms",
        fastest_s=fastest,
        max_gap=ticker.max_gap,
    )


# -- 7. kill -9 of the postmaster ------------------------------------------------------------------


async def kill_postmaster(lab: NetLab, kind: str = "pgpool_async") -> ScenarioResult:
    """4 tasks loop on ``pg_sleep(0.05)``; ``kill -9`` of the postmaster after 1 s,
    restart; they go on 3 s after the server accepts again. Errors started after
    it accepted (+0.5 s) count as 'after recovery'."""
    async with _ticking() as ticker, open_pool(kind, lab.dsn, 2, 4, timeout=5.0) as pool:
        records: list[Request] = []
        stop = False

        async def loop() -> None:
            while not stop:
                record = await timed(lambda: pool.fetchval("SELECT pg_sleep(0.05)"))
                records.append(record)
                if not record.ok:
                    await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(loop)
            await anyio.sleep(1.0)
            killed = time.monotonic()
            await _lab(lab.kill_postmaster)
            await _lab(lab.start_server)
            accepting = time.monotonic()
            await anyio.sleep(3.0)
            stop = True
        after = [r for r in records if r.start > accepting + 0.5 and not r.ok]
        ok_after = [r.end for r in records if r.ok and r.start >= accepting]
        recovery = (min(ok_after) - accepting) if ok_after else None
        lost = [r for r in records if not r.ok]
    return _result(
        pool,
        "kill -9 of the postmaster",
        kind,
        records,
        recovery,
        f"down {accepting - killed:.1f} s (restart); {len(lost)} failed requests, "
        f"{len(after)} after recovery; loop max stall {ticker.max_gap * 1000:.0f} ms",
        errors_after_recovery=len(after),
        max_gap=ticker.max_gap,
        down_s=accepting - killed,
    )


SCENARIOS: list[Callable[[NetLab, str], Awaitable[ScenarioResult]]] = [
    blackhole_mid_query,
    blackhole_at_connect,
    wait_for_in_blackhole,
    close_in_blackhole,
    lambda lab, kind: packet_loss(lab, kind, 0.05, 10.0),
    lambda lab, kind: packet_loss(lab, kind, 0.3, 25.0),
    lambda lab, kind: packet_loss(lab, kind, 0.3, 25.0, both_ways=True),
    latency,
    kill_postmaster,
]


async def run_network(kinds: tuple[str, ...] = KINDS) -> list[ScenarioResult]:
    """Build a lab, run every scenario for each kind, tear the lab down."""
    lab = NetLab(max_fault=120.0)
    await _lab(lab.start)
    results: list[ScenarioResult] = []
    try:
        for scenario in SCENARIOS:
            for kind in kinds:
                try:
                    results.append(await scenario(lab, kind))
                except NetLabUnavailable as exc:
                    results.append(
                        ScenarioResult(f"{scenario.__name__} (skipped)", 0, 0, None, None, 0, str(exc))
                    )
                    break
    finally:
        await _lab(lab.destroy)
    return results


def main(output: Path | None, started: float) -> None:
    """``python -m benchmarks.faults --network``: run the scenarios, print their table
    (and write it to ``output``)."""
    results = anyio.run(run_network)
    preamble = (
        "# Real network faults: pgpool_async and psycopg_pool\n\n"
        f"`python -m benchmarks.faults --network` ({time.monotonic() - started:.0f} s): a throwaway "
        "PostgreSQL in a network namespace behind a router namespace whose raw PREROUTING chain "
        "drops packets (ingress, so neither end sees a local error); Python "
        f"{platform.python_version()}, psycopg2 {getattr(psycopg2, '__version__', '?').split()[0]}, "
        f"psycopg {importlib.metadata.version('psycopg')}, psycopg_pool "
        f"{importlib.metadata.version('psycopg-pool')}, {os.cpu_count()} CPUs. Default settings of "
        "each pool. Recovery time: from the network healing (or the restart) to the first "
        "successful request. Loop stall: longest gap of a 10 ms ticker.\n"
    )
    table = render_table(results, preamble)
    print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table, encoding="utf-8")
