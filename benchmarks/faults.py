"""Fault scenarios: what pgpool_async's callers see when the server or the network fails.

``python -m benchmarks.faults`` starts a throwaway PostgreSQL server, runs the
scenarios below against it and prints one markdown table (``--output`` also
writes it to a file). ``tests/test_faults.py`` runs the same scenario functions
and asserts on the :class:`ScenarioResult` they return (its ``details``), so the
figures printed here are the ones the tests check.

1. :func:`terminate_idle`: ``pg_terminate_backend`` on every idle pool
   connection, then 1,000 requests; with ``check=True, check_idle=0``, and
   without a check (the pool peeks at each idle socket before lending it).
2. :func:`restart_under_load`: ``pg_ctl stop -m fast`` then ``start`` while 20
   tasks loop on ``pool.fetchval``; errors are located in time against the
   moment the server went down and the moment it accepted connections again.
3. :func:`outage_immediate`: ``pg_ctl stop -m immediate``, 5 s down, ``start``:
   waiters get :class:`~pgpool_async.PoolTimeout` on schedule, with the last
   connection error as ``__cause__``; the pool refills ``minconn`` by itself.
4. :func:`blackhole`: the pool talks to the server through a
   :class:`~pgpool_async.testing.faultproxy.FaultProxy` that starts swallowing every byte.
   The proxy runs in user space, so the kernel keeps ACKing for it: TCP keepalives
   and ``tcp_user_timeout`` (both set) cannot detect this kind of outage, and a
   running query blocks its worker thread until the connection is cut. The
   scenario records that, then cuts the connections (``sever``: what the kernel
   does when keepalives give up on a real dead network), keeps the network down
   while refills time out (``connect_timeout``), heals it and measures recovery.
6. :func:`churn`: 100,000 checkouts with random cancellation and random
   exceptions, then checks that nothing leaked and nothing came back mid-transaction.

(Scenario 5, leak reports, has no figures: it lives in the tests only.)

Every blocking call (server administration, side queries) runs in a worker
thread, so the 1 ms :class:`LoopTicker` measures the pool's own effect on the loop.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import os
import platform
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import psycopg2
import psycopg2.extensions

from pgpool_async import AsyncConnectionPool, PoolTimeout
from pgpool_async.testing.faultproxy import FaultProxy
from pgpool_async.testing.throwaway import ThrowawayPostgres, run_sql

from . import netfaults
from ._harness import (
    LoopTicker,
    Request,
    ScenarioResult,
    error_counts,
    render_table,
    timed,
    wait_no_busy_threads,
)

__all__ = [
    "KEEPALIVE_OPTIONS",
    "Boom",
    "blackhole",
    "churn",
    "main",
    "outage_immediate",
    "restart_under_load",
    "run_all",
    "terminate_idle",
]

#: libpq options of the blackhole scenario: keepalives after 1 s idle, every 1 s,
#: 1 probe; unacknowledged data gives up after 1 s; connects after 2 s.
KEEPALIVE_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 1,
    "tcp_user_timeout": 1000,
    "connect_timeout": 2,
}
_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_BUCKET = 0.1  # seconds: throughput is compared in 100 ms buckets


# -- records and results ---------------------------------------------------------


class Boom(Exception):
    """The exception :func:`churn` bodies raise on purpose."""


async def run_requests(op: Callable[[], Awaitable[object]], n: int, concurrency: int) -> list[Request]:
    """Run ``op`` ``n`` times from ``concurrency`` tasks; every request recorded."""
    records: list[Request] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:  # shared: each worker takes the next one
            records.append(await timed(op))

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return records


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"


# -- the server, seen from outside the pool (blocking: run in threads) -------------


# One statement on a fresh autocommit connection; blocking.
query_server = run_sql


async def server_sql(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """:func:`query_server` in a worker thread."""
    return await anyio.to_thread.run_sync(query_server, dsn, sql, params)


async def backend_states(dsn: str, app_name: str) -> dict[int, str]:
    """``{pid: state}`` of the server backends with this ``application_name``."""
    rows = await server_sql(
        dsn, "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s", (app_name,)
    )
    return {pid: state for pid, state in rows}


def wait_accepting(dsn: str, timeout: float = 60.0, interval: float = 0.005) -> float:
    """Block until the server accepts a connection; the monotonic instant it did
    (when the successful connect returned). Blocking: call it in a thread."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = psycopg2.connect(dsn, connect_timeout=2)
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)
            continue
        at = time.monotonic()
        conn.close()
        return at


async def start_server(server: ThrowawayPostgres) -> tuple[float, float]:
    """``pg_ctl start -w`` in a thread while another thread probes the port.

    Returns ``(accepting, started)``: when a client first connected, and when
    ``pg_ctl`` returned. ``accepting`` is the earlier, more precise one.
    """
    dsn = server.dsn
    result: dict[str, float] = {}

    async def probe() -> None:
        result["accepting"] = await anyio.to_thread.run_sync(wait_accepting, dsn)

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        await anyio.to_thread.run_sync(server.start)
        result["started"] = time.monotonic()
    return result["accepting"], result["started"]


def _opened(pool: AsyncConnectionPool) -> int:
    """Connections successfully opened by the pool so far."""
    stats = pool.get_stats()
    return stats.get("connections_num", 0) - stats.get("connections_errors", 0)


def _host_port(dsn: str) -> tuple[str, int]:
    params = psycopg2.extensions.parse_dsn(dsn)
    return params.get("host", "127.0.0.1"), int(params.get("port", 5432))


# -- 1. pg_terminate_backend on idle connections ---------------------------------


async def terminate_idle(
    dsn: str,
    app_name: str,
    *,
    check: bool,
    size: int = 8,
    requests: int = 1000,
    concurrency: int = 8,
) -> ScenarioResult:
    """Terminate every idle connection of a warm pool server-side, wait until
    the backends are gone, then run ``requests`` ``SELECT 1`` requests.

    ``check=True`` sets ``check=True, check_idle=0`` (a ``SELECT 1`` before each
    loan); without it the pool only screens idle connections by peeking at
    their sockets. Details: ``terminated``, ``errors``, ``connections_lost``.
    """
    options: dict[str, Any] = {"check": True, "check_idle": 0} if check else {}
    async with AsyncConnectionPool(
        size, size, dsn, application_name=app_name, timeout=5, name=f"faults-terminate-{check}", **options
    ) as pool:
        before = await backend_states(dsn, app_name)
        rows = await server_sql(
            dsn,
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )
        with anyio.fail_after(10):  # the backends have exited: their goodbye is on the sockets
            while set(await backend_states(dsn, app_name)) & set(before):
                await anyio.sleep(0.01)
        opened_before = _opened(pool)
        started = time.monotonic()
        records = await run_requests(lambda: pool.fetchval("SELECT 1"), requests, concurrency)
        duration = time.monotonic() - started
        stats = pool.get_stats()
        after = await backend_states(dsn, app_name)
    errors = error_counts(records)
    lost = stats.get("connections_lost", 0)
    label = "check=True, check_idle=0" if check else "no check (socket peek)"
    return ScenarioResult(
        scenario=f"1. pg_terminate_backend all idle, {label}",
        requests=len(records),
        errors=sum(errors.values()),
        errors_after_recovery=None,
        recovery_s=None,
        connections_opened=_opened(pool) - opened_before,
        notes=(
            f"{sum(bool(r[0]) for r in rows)}/{len(before)} backends terminated; {lost} found dead "
            f"before lending (connections_lost), none reached a caller; {len(records) / duration:,.0f} req/s"
        ),
        details={
            "backends_before": len(before),
            "terminated": sum(bool(r[0]) for r in rows),
            "errors": errors,
            "connections_lost": lost,
            "old_pids_left": sorted(set(after) & set(before)),
            "records": records,
        },
    )


# -- 2. pg_ctl restart -m fast under load ------------------------------------------


def throughput_buckets(records: Sequence[Request], start: float, n: int) -> list[int]:
    """Successful requests by end time, in ``n`` 100 ms buckets from ``start``."""
    counts = [0] * n
    for r in records:
        if r.ok and start <= r.end < start + n * _BUCKET:
            counts[min(int((r.end - start) / _BUCKET), n - 1)] += 1
    return counts


def analyse_outage(
    records: Sequence[Request], down_from: float, accepting: float, grace: float
) -> dict[str, Any]:
    """Locate errors in time against an outage from ``down_from`` (the stop was
    requested) to ``accepting`` (the server accepted a connection again).

    Returns errors of requests that ended before the outage began, of requests
    started after ``accepting + grace``, successes in the second before the
    outage and in the second after ``accepting``, 100 ms buckets on both sides,
    and the recovery time: from ``accepting`` to the end of the first bucket
    with at least half the median throughput of the buckets before.
    """
    errors = [r for r in records if not r.ok]
    before = throughput_buckets(records, down_from - 1.0, 10)
    after = throughput_buckets(records, accepting, 30)
    baseline = statistics.median(before) if before else 0
    recovery = next(
        ((i + 1) * _BUCKET for i, count in enumerate(after) if count >= 0.5 * baseline and count > 0),
        math.inf,
    )
    first_ok = min((r.end for r in records if r.ok and r.end >= accepting), default=math.inf)
    return {
        "errors_before_outage": [r for r in errors if r.end < down_from],
        "errors_after_recovery": [r for r in errors if r.start >= accepting + grace],
        "errors_started_in_grace": [r for r in errors if accepting <= r.start < accepting + grace],
        "ok_second_before": sum(before),
        "ok_second_after": sum(after[:10]),
        "buckets_before": before,
        "buckets_after": after,
        "recovery_s": recovery,
        "first_ok_after_s": first_ok - accepting,
        "last_error_end_after_s": max((r.end for r in errors), default=accepting) - accepting,
    }


async def restart_under_load(
    server: ThrowawayPostgres,
    app_name: str,
    *,
    tasks: int = 20,
    minconn: int = 4,
    maxconn: int = 10,
    timeout: float = 1.0,
    grace: float = 0.2,
    before: float = 1.5,
    after: float = 3.0,
) -> ScenarioResult:
    """``pg_ctl stop -m fast`` then ``start`` (a restart, split to time it) while
    ``tasks`` tasks loop on ``pool.fetchval("SELECT 1", timeout=timeout)``.

    Details: ``marks`` (monotonic instants: ``stop_called``, ``down``,
    ``accepting``, ``started``), the :func:`analyse_outage` figures, ``errors``
    by class, ``max_gap`` of the loop ticker.
    """
    dsn = server.dsn
    records: list[Request] = []
    marks: dict[str, float] = {}
    done = anyio.Event()
    ticker = LoopTicker()
    async with AsyncConnectionPool(
        minconn, maxconn, dsn, application_name=app_name, timeout=timeout, name="faults-restart"
    ) as pool:

        async def worker() -> None:
            while not done.is_set():
                record = await timed(lambda: pool.fetchval("SELECT 1", timeout=timeout))
                records.append(record)
                if not record.ok and record.elapsed < 0.01:
                    await anyio.sleep(0.01)  # an instant failure: do not spin on it

        async with anyio.create_task_group() as outer:
            outer.start_soon(ticker.run)
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(worker)
                await anyio.sleep(before)
                marks["stop_called"] = time.monotonic()
                await anyio.to_thread.run_sync(server.stop, "fast")
                marks["down"] = time.monotonic()
                marks["accepting"], marks["started"] = await start_server(server)
                await anyio.sleep(after)
                done.set()
            outer.cancel_scope.cancel()
        opened = _opened(pool)
    figures = analyse_outage(records, marks["stop_called"], marks["accepting"], grace)
    errors = error_counts(records)
    ratio = figures["ok_second_after"] / max(1, figures["ok_second_before"])
    down = marks["accepting"] - marks["stop_called"]
    return ScenarioResult(
        scenario="2. restart -m fast under load (20 tasks)",
        requests=len(records),
        errors=sum(errors.values()),
        errors_after_recovery=len(figures["errors_after_recovery"]),
        recovery_s=figures["recovery_s"],
        connections_opened=opened,
        notes=(
            f"accepting again {down:.2f} s after the stop began (pg_ctl stop took "
            f"{marks['down'] - marks['stop_called']:.2f} s); errors: {_fmt_counts(errors)}; grace {grace} s; "
            f"1st success {figures['first_ok_after_s']:.2f} s after accept; "
            f"ok in 1 s after/before: {figures['ok_second_after']}/{figures['ok_second_before']} "
            f"({ratio:.0%}); request timeout {timeout} s; loop max gap {ticker.max_gap * 1000:.0f} ms"
        ),
        details={**figures, "marks": marks, "errors": errors, "max_gap": ticker.max_gap, "records": records},
    )


# -- 3. stop -m immediate, 5 s down, start -------------------------------------------


async def outage_immediate(
    server: ThrowawayPostgres,
    app_name: str,
    *,
    minconn: int = 2,
    maxconn: int = 4,
    timeout: float = 1.0,
    down_for: float = 5.0,
    wave_every: float = 0.5,
    wave_size: int = 6,
    requests_after: int = 200,
) -> ScenarioResult:
    """``pg_ctl stop -m immediate``, ``down_for`` seconds down, ``start``.

    While down, waves of ``wave_size`` requests (``timeout`` s each) are sent,
    the last one early enough to time out before the server starts. After the
    start nothing is asked of the pool until its background refill has
    ``minconn`` connections idle again; then ``requests_after`` requests.

    Details: ``down_records`` (the requests made while down), ``refill_s`` (from
    ``accepting`` to ``minconn`` idle; ``inf`` if it never happened within 20 s),
    ``after_records``, ``stats_after``, ``marks``.
    """
    dsn = server.dsn
    marks: dict[str, float] = {}
    down_records: list[Request] = []
    async with AsyncConnectionPool(
        minconn, maxconn, dsn, application_name=app_name, timeout=timeout, name="faults-immediate"
    ) as pool:
        await pool.fetchval("SELECT 1")
        marks["stop_called"] = time.monotonic()
        await anyio.to_thread.run_sync(server.stop, "immediate")
        marks["down"] = time.monotonic()

        async def one() -> None:
            down_records.append(await timed(lambda: pool.fetchval("SELECT 1", timeout=timeout)))

        last_wave = marks["down"] + down_for - timeout - 1.0
        async with anyio.create_task_group() as tg:
            while time.monotonic() <= last_wave:
                for _ in range(wave_size):
                    tg.start_soon(one)
                await anyio.sleep(wave_every)
        await anyio.sleep(max(0.0, marks["down"] + down_for - time.monotonic()))
        marks["accepting"], marks["started"] = await start_server(server)
        refill_s = math.inf
        with anyio.move_on_after(20):
            while pool.get_stats()["pool_available"] < minconn:
                await anyio.sleep(0.005)
            refill_s = time.monotonic() - marks["accepting"]
        stats_refilled = pool.get_stats()
        after_records = await run_requests(lambda: pool.fetchval("SELECT 1"), requests_after, 8)
        stats_after = pool.get_stats()
        opened = _opened(pool)
    down_errors = error_counts(down_records)
    errors_after = sum(not r.ok for r in after_records)
    late = [r for r in down_records if r.error == "PoolTimeout"]
    elapsed = [r.elapsed for r in late]
    causes = Counter(r.cause for r in late)
    return ScenarioResult(
        scenario=f"3. stop -m immediate, {down_for:g} s down, start",
        requests=len(down_records) + len(after_records),
        errors=sum(down_errors.values()) + errors_after,
        errors_after_recovery=errors_after,
        recovery_s=refill_s,
        connections_opened=opened,
        notes=(
            f"while down: {_fmt_counts(down_errors)} (timeout {timeout} s, raised after "
            f"{min(elapsed, default=0):.3f}-{max(elapsed, default=0):.3f} s, cause "
            f"{_fmt_counts({str(k): v for k, v in causes.items()})}); recovery = start accepting → "
            f"{minconn} idle by the background refill, no request needed"
        ),
        details={
            "marks": marks,
            "down_records": down_records,
            "after_records": after_records,
            "refill_s": refill_s,
            "stats_refilled": stats_refilled,
            "stats_after": stats_after,
        },
    )


# -- 4. the network blackholed ---------------------------------------------------------


async def blackhole(
    dsn: str,
    app_name: str,
    *,
    size: int = 3,
    waiters: int = 6,
    timeout: float = 1.0,
    keepalive_wait: float = 3.0,
    down_after_sever: float = 2.5,
    requests_after: int = 200,
) -> ScenarioResult:
    """The pool connects through a FaultProxy (with :data:`KEEPALIVE_OPTIONS`);
    the proxy starts swallowing every byte.

    ``size`` requests run a query on the ``size`` connections (the holders);
    ``waiters`` more wait ``timeout`` s for a connection. ``keepalive_wait`` s
    after the blackhole began, the holders still blocked are counted (the
    proxy's kernel answers keepalives: they cannot end them), then the proxy
    cuts every connection (``sever``); the network stays black for
    ``down_after_sever`` s (refills time out after ``connect_timeout``), then heals.

    Details: ``holders``, ``holders_blocked_at_keepalive_wait``, ``holder_end_after_sever``,
    ``waiter_records``, ``recovery_s`` (from heal to the first success),
    ``after_records``, ``max_gap``, ``threads_left`` (see :func:`busy_threads`,
    after the pool and the proxy are closed), ``threads_left_s`` and
    ``threads_new`` (threads started meanwhile and still alive, anyio's
    reusable worker threads excepted).
    """
    host, port = _host_port(dsn)
    ticker = LoopTicker()
    marks: dict[str, float] = {}
    holders: list[Request] = []
    waiter_records: list[Request] = []
    name = "faults-blackhole"
    baseline = {thread.ident for thread in threading.enumerate()}
    with FaultProxy(host, port) as proxy:
        pool = AsyncConnectionPool(
            size,
            size,
            psycopg2.extensions.make_dsn(proxy.dsn(dsn), **KEEPALIVE_OPTIONS),
            application_name=app_name,
            timeout=timeout,
            name=name,
        )
        async with anyio.create_task_group() as outer:
            outer.start_soon(ticker.run)
            async with pool:
                warm = await run_requests(lambda: pool.fetchval("SELECT 1"), 50, size)
                await anyio.to_thread.run_sync(proxy.blackhole)
                marks["blackhole"] = time.monotonic()

                async def hold() -> None:
                    holders.append(await timed(lambda: pool.fetchval("SELECT 1")))

                async def wait() -> None:
                    waiter_records.append(await timed(lambda: pool.fetchval("SELECT 1", timeout=timeout)))

                async with anyio.create_task_group() as tg:
                    for _ in range(size):
                        tg.start_soon(hold)
                    with anyio.fail_after(5):
                        while pool.get_stats()["pool_available"] or pool._ledger.lent_count < size:
                            await anyio.sleep(0.005)
                    async with anyio.create_task_group() as waiting:
                        for _ in range(waiters):
                            waiting.start_soon(wait)
                    await anyio.sleep(max(0.0, marks["blackhole"] + keepalive_wait - time.monotonic()))
                    blocked = size - len(holders)
                    await anyio.to_thread.run_sync(proxy.sever)
                    marks["sever"] = time.monotonic()
                    with anyio.move_on_after(10):  # a holder that never ends: the tests see it
                        while len(holders) < size:
                            await anyio.sleep(0.001)
                    marks["holders_done"] = time.monotonic()
                    await anyio.sleep(max(0.0, marks["sever"] + down_after_sever - time.monotonic()))
                    await anyio.to_thread.run_sync(proxy.passthrough)
                    marks["heal"] = time.monotonic()
                    # Ends holders still blocked, if any, once their threads return.
                    tg.cancel_scope.cancel()
                recovery = math.inf
                with anyio.move_on_after(20):
                    while not (probe := await timed(lambda: pool.fetchval("SELECT 1", timeout=timeout))).ok:
                        if probe.elapsed < 0.01:
                            await anyio.sleep(0.01)  # an instant failure: do not spin on it
                    recovery = time.monotonic() - marks["heal"]
                after_records = await run_requests(lambda: pool.fetchval("SELECT 1"), requests_after, size)
                stats = pool.get_stats()
                opened = _opened(pool)
            outer.cancel_scope.cancel()
    threads_left, threads_s = await wait_no_busy_threads((name, "FaultProxy"), timeout=5)
    # New threads still alive, but anyio's worker threads (idle ones linger 10 s for reuse).
    threads_new = [
        t.name
        for t in threading.enumerate()
        if t.ident not in baseline and t.is_alive() and t.name != "AnyIO worker thread"
    ]
    anyio_workers = sum(t.name == "AnyIO worker thread" for t in threading.enumerate())
    thread_counts = {"before": len(baseline), "after": threading.active_count(), "anyio_idle": anyio_workers}
    holder_errors = error_counts(holders)
    waiter_errors = error_counts(waiter_records)
    errors_after = sum(not r.ok for r in after_records)
    holder_end = [r.end - marks["sever"] for r in holders]
    return ScenarioResult(
        scenario="4. network blackholed (FaultProxy), then cut, then healed",
        requests=len(warm) + len(holders) + len(waiter_records) + len(after_records),
        errors=sum(holder_errors.values()) + sum(waiter_errors.values()) + errors_after,
        errors_after_recovery=errors_after,
        recovery_s=recovery,
        connections_opened=opened,
        notes=(
            f"waiters: {_fmt_counts(waiter_errors)} after "
            f"{min((r.elapsed for r in waiter_records), default=0):.2f}-"
            f"{max((r.elapsed for r in waiter_records), default=0):.2f} s; running queries: "
            f"{blocked}/{size} still blocked {keepalive_wait:g} s in despite keepalives 1/1/1 and "
            f"tcp_user_timeout=1000 (the proxy's kernel ACKs), ended by the cut: "
            f"{_fmt_counts(holder_errors)} within {max(holder_end, default=0):.3f} s; "
            f"recovery = heal → 1st success; loop max gap {ticker.max_gap * 1000:.0f} ms; "
            f"threads after close: {thread_counts['after']} (before {thread_counts['before']}, "
            f"incl. {thread_counts['anyio_idle']} idle anyio workers), pool/proxy threads or threads "
            f"in pool code left: {len(threads_left)}"
        ),
        details={
            "marks": marks,
            "holders": holders,
            "holders_blocked_at_keepalive_wait": blocked,
            "holder_end_after_sever": holder_end,
            "waiter_records": waiter_records,
            "recovery_s": recovery,
            "after_records": after_records,
            "stats": stats,
            "max_gap": ticker.max_gap,
            "threads_left": threads_left,
            "threads_left_s": threads_s,
            "threads_new": threads_new,
            "thread_counts": thread_counts,
        },
    )


# -- 6. checkout churn with random cancellation and exceptions ----------------------------

# Random deadlines: cancelled while queued, while a worker runs the query, while
# committing or returning; or never (three times out of ten).
_CHURN_DEADLINES = (0.0, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.02, math.inf, math.inf, math.inf)


async def check_whole(pool: AsyncConnectionPool, dsn: str, app_name: str) -> dict[str, Any]:
    """What a leak or a dirty return would leave behind, after the load is over:
    slots still pending, requests still waiting, server backends idle in a
    transaction, and how many distinct connections can be lent at once
    (``maxconn`` unless one leaked)."""
    ledger = pool._ledger
    with anyio.move_on_after(10):  # connects and returns cut short by cancellations may still land
        while ledger.opening_count or ledger.returning_count:
            await anyio.sleep(0.01)
    states = await backend_states(dsn, app_name)
    lent = []
    try:
        for _ in range(pool.maxconn):
            lent.append(await pool.getconn(timeout=2))
    except PoolTimeout:
        pass
    dirty = sum(conn.raw.get_transaction_status() != _IDLE or bool(conn.raw.closed) for conn in lent)
    lendable = len({id(conn.raw) for conn in lent})
    for conn in lent:
        await pool.putconn(conn)
    return {
        "pending": ledger.opening_count + ledger.returning_count,
        "used": ledger.lent_count,
        "requests_waiting": pool.get_stats()["requests_waiting"],
        "idle_in_transaction": sum(state.startswith("idle in transaction") for state in states.values()),
        "server_states": dict(Counter(states.values())),
        "lendable_at_once": lendable,
        "lent_dirty": dirty,
    }


async def churn(
    dsn: str,
    app_name: str,
    *,
    checkouts: int = 100_000,
    minconn: int = 2,
    maxconn: int = 8,
    batch: int = 500,
    query_share: float = 0.2,
    boom_share: float = 0.2,
    seed: int = 1234,
) -> ScenarioResult:
    """``checkouts`` ``async with pool.connection()`` blocks, in batches of
    ``batch`` concurrent tasks, each under a random ``anyio.move_on_after``
    deadline (0 to 20 ms, or none) and a random pool timeout (10 ms or 5 s);
    bodies run ``SELECT 1`` (opening a transaction) with probability
    ``query_share``, raise :class:`Boom` with ``boom_share``, and yield once.

    Details: ``outcomes`` (ok, boom, cancelled, timeout), ``rate`` (checkouts/s),
    ``max_gap``, ``stats``, and :func:`check_whole`'s figures under ``whole``.
    """
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    ticker = LoopTicker()

    async def one(pool: AsyncConnectionPool) -> None:
        outcome = "ok"
        with anyio.move_on_after(rng.choice(_CHURN_DEADLINES)) as scope:
            try:
                async with pool.connection(timeout=rng.choice((0.01, 5.0))) as conn:
                    if rng.random() < query_share:
                        await conn.execute("SELECT 1")
                    if rng.random() < boom_share:
                        raise Boom
                    await anyio.lowlevel.checkpoint()
            except Boom:
                outcome = "boom"
            except PoolTimeout:
                outcome = "timeout"
            except Exception as exc:  # anything else is a failure of the pool
                outcome = "error"
                unexpected[type(exc).__name__] += 1
        outcomes["cancelled" if scope.cancelled_caught and outcome == "ok" else outcome] += 1

    async with AsyncConnectionPool(
        minconn, maxconn, dsn, application_name=app_name, timeout=5, name="faults-churn"
    ) as pool:
        started = time.monotonic()
        async with anyio.create_task_group() as outer:
            outer.start_soon(ticker.run)
            done = 0
            while done < checkouts:
                n = min(batch, checkouts - done)
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(one, pool)
                done += n
            outer.cancel_scope.cancel()
        duration = time.monotonic() - started
        whole = await check_whole(pool, dsn, app_name)
        stats = pool.get_stats()
        opened = _opened(pool)
    total = sum(outcomes.values())
    leaked = maxconn - whole["lendable_at_once"] + stats.get("connections_leaked", 0)
    return ScenarioResult(
        scenario=f"6. {checkouts:,} checkouts, random cancel/raise",
        requests=total,
        errors=outcomes["error"],
        errors_after_recovery=None,
        recovery_s=None,
        connections_opened=opened,
        notes=(
            f"{outcomes['ok']:,} ok, {outcomes['boom']:,} raised on purpose, {outcomes['cancelled']:,} "
            f"cancelled, {outcomes['timeout']:,} PoolTimeout (10 ms pool timeouts, expected); "
            f"unexpected errors: {_fmt_counts(dict(unexpected))}; leaked {leaked}, returned in a "
            f"transaction {whole['idle_in_transaction'] + whole['lent_dirty']}; "
            f"{total / duration:,.0f} checkouts/s ({duration:.1f} s); loop max gap "
            f"{ticker.max_gap * 1000:.0f} ms"
        ),
        details={
            "outcomes": dict(outcomes),
            "unexpected": dict(unexpected),
            "leaked": leaked,
            "rate": total / duration,
            "duration": duration,
            "max_gap": ticker.max_gap,
            "stats": stats,
            "whole": whole,
        },
    )


def _new_app_name() -> str:
    return f"pgpool-faults-{uuid.uuid4().hex[:12]}"


async def run_all(checkouts: int = 100_000) -> tuple[list[ScenarioResult], str]:
    """Start a throwaway server, run every scenario on it, destroy it.

    Returns the results and a one-line description of the environment.
    """
    server = ThrowawayPostgres(settings={"max_connections": "300"})
    await anyio.to_thread.run_sync(server.start)
    try:
        version = (await server_sql(server.dsn, "SHOW server_version"))[0][0]
        env = (
            f"PostgreSQL {version} (throwaway, loopback TCP), Python {platform.python_version()}, "
            f"anyio {importlib.metadata.version('anyio')} on asyncio, "
            f"psycopg2 {getattr(psycopg2, '__version__', '?').split()[0]}, {os.cpu_count()} CPUs"
        )
        results = [
            await terminate_idle(server.dsn, _new_app_name(), check=True),
            await terminate_idle(server.dsn, _new_app_name(), check=False),
            await restart_under_load(server, _new_app_name()),
            await outage_immediate(server, _new_app_name()),
            await blackhole(server.dsn, _new_app_name()),
            await churn(server.dsn, _new_app_name(), checkouts=checkouts),
        ]
    finally:
        await anyio.to_thread.run_sync(server.destroy)
    return results, env


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.faults [--checkouts N] [--output FILE] [--verbose]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n")[0])
    parser.add_argument("--checkouts", type=int, default=100_000, help="checkouts in scenario 6")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    parser.add_argument("--verbose", action="store_true", help="show the pool's log (connect failures...)")
    parser.add_argument(
        "--network",
        action="store_true",
        help="run the real-network scenarios instead (root: network namespaces; see benchmarks.netfaults)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    started = time.monotonic()
    if args.network:
        netfaults.main(args.output, started)
        return
    results, env = anyio.run(run_all, args.checkouts)
    preamble = (
        "# pgpool_async under faults\n\n"
        f"`python -m benchmarks.faults` ({time.monotonic() - started:.0f} s). {env}. "
        "Recovery time: scenario 2, from the server accepting again to the end of the first "
        "100 ms bucket with ≥ 50% of the throughput before the fault; 3, from accepting to "
        "`minconn` idle connections by the background refill; 4, from the network healing to "
        "the first successful request. 'errors after recovery' counts failed requests "
        "started after that point (2: after accept + 0.2 s grace).\n"
    )
    table = render_table(results, preamble)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
