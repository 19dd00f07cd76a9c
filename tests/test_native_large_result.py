"""A large result through the pool on io="loop": the loop keeps running and memory
stays bounded.

The loop-native path converts rows on the event loop thread (psycopg2's own
typecasters, ~0.7 µs a cell): 200k rows x 3 columns is ~0.4 s of work, which
must be cut into slices that each leave the loop within 50 ms (issue 11).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest

from pgpool_async import AsyncConnectionPool
from pgpool_async._loop.native import unavailable_reason

from .test_native import ticking, traced

pytestmark = [pytest.mark.anyio, pytest.mark.single_io("every pool here passes io='loop' itself")]

if unavailable_reason() is not None:  # pragma: no cover - Linux with psycopg2 finds it
    pytestmark.append(pytest.mark.skipif(not os.environ.get("CI"), reason=str(unavailable_reason())))

ROWS = 200_000
SQL = f"SELECT g, g::text || 'abc', g * 1.5 FROM generate_series(1, {ROWS}) g"
#: The issue's bound on one stall of the loop.
MAX_STALL = 0.050


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _check(rows: list[Any]) -> None:
    assert len(rows) == ROWS
    assert rows[0] == (1, "1abc", 1.5)
    assert rows[-1] == (ROWS, f"{ROWS}abc", ROWS * 1.5)


async def test_a_large_fetchall_never_stalls_the_loop(dsn: str, record_property: Any) -> None:
    async with AsyncConnectionPool(1, 1, dsn, io="loop") as pool:
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1  # connected, on the loop
            assert conn.loan.on_loop
            async with ticking() as ticker:
                rows = await conn.fetchall(SQL)
            assert conn.loan.on_loop  # the rows came through the loop-native path
            _check(rows)
    record_property("max_stall_wall_ms", round(ticker.max_wall * 1000, 1))
    record_property("max_stall_cpu_ms", round(ticker.max_cpu * 1000, 1))
    print(f"longest stall: {ticker.max_wall * 1000:.1f} ms wall, {ticker.max_cpu * 1000:.1f} ms CPU less GC")
    # The loop thread's own work between two ticks (CPU time, less the garbage
    # collector's, which stalls the loop on either io path): the code under test.
    assert ticker.max_cpu < MAX_STALL, f"the loop ran {ticker.max_cpu * 1000:.1f} ms without yielding"
    # Wall time also counts other processes on a shared machine: a generous bound.
    assert ticker.max_wall < 0.5, f"the loop stalled {ticker.max_wall * 1000:.1f} ms"


async def test_a_large_fetchall_holds_no_extra_copies(dsn: str, record_property: Any) -> None:
    async with AsyncConnectionPool(1, 1, dsn, io="loop") as pool:
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            # The process's memory first (tracemalloc's own bookkeeping would count there)...
            gc.collect()
            rss_before = _rss_kib("VmRSS")
            peak_known = _reset_peak_rss()
            rows = await conn.fetchall(SQL)
            rss_peak = _rss_kib("VmHWM") if peak_known else _rss_kib("VmRSS")
            _check(rows)
            del rows
            gc.collect()
            # ... then Python's allocations, the rows' size among them.
            rows, retained, peak = await traced(conn.fetchall(SQL))
            assert conn.loan.on_loop
            _check(rows)
    growth = (rss_peak - rss_before) * 1024
    record_property("result_bytes", retained)
    record_property("python_peak_bytes", peak)
    record_property("rss_growth_bytes", growth)
    print(
        f"result {retained / 2**20:.1f} MiB (Python objects), Python peak {peak / 2**20:.1f} MiB, "
        f"peak RSS growth {growth / 2**20:.1f} MiB"
    )
    # While converting, Python holds the rows being built and little else.
    assert peak < retained * 1.5, (peak, retained)
    # libpq's copy of the whole result (outside Python's allocator) plus the rows:
    # a small multiple of the result, never one copy per slice or per row.
    assert growth < retained * 3, (growth, retained)
