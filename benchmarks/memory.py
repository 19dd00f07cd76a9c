"""Memory: resident-set growth, each figure measured in a fresh Python process.

Two measures per contender:

- ``waiting``: the pool has one connection and it is held; ``count`` tasks
  (10,000 by default) then ask for a connection and wait. The growth of VmRSS,
  scaled to 10,000 waiters. The OS-threads baseline uses 1,000 blocked threads,
  scaled x10; ``tasks`` is the floor: bare asyncio tasks awaiting an Event.
- ``idle``: with a warm pool of one connection already open (libraries loaded),
  open a second pool of ``count`` connections (50 by default); the growth of
  VmRSS divided by ``count``.

Parent side: :func:`measure` runs ``python -m benchmarks.memory KEY WHAT DSN
COUNT`` and reads the JSON line it prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .contenders import AsyncContender, PoolSpec, ThreadsContender, by_key

__all__ = ["BASELINE_KEY", "PER_WAITERS", "THREAD_WAITERS", "measure", "rss_kib"]

BASELINE_KEY = "tasks"
PER_WAITERS = 10_000
THREAD_WAITERS = 1_000
SETTLE = 0.3
SUBPROCESS_TIMEOUT = 120.0
_ROOT = Path(__file__).resolve().parent.parent


def rss_kib() -> int:
    """This process's resident set size (VmRSS), in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _settled_rss() -> int:
    """RSS after a garbage collection and a short pause for threads to settle."""
    await asyncio.sleep(SETTLE)
    gc.collect()
    return rss_kib()


def _result(before: int, after: int, count: int, scale_to: int) -> dict[str, Any]:
    growth = (after - before) * 1024
    return {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "count": count,
        "bytes_per_item": round(growth / count, 1),
        "scaled_to": scale_to,
        "scaled_mib": round(growth / count * scale_to / 2**20, 2),
    }


async def _baseline_waiting(count: int) -> dict[str, Any]:
    event = asyncio.Event()
    await _spawn_and_wait(lambda: asyncio.create_task(event.wait()), 100)
    before = await _settled_rss()
    tasks = [asyncio.create_task(event.wait()) for _ in range(count)]
    after = await _settled_rss()
    event.set()
    await asyncio.gather(*tasks)
    return _result(before, after, count, PER_WAITERS)


async def _spawn_and_wait(make: Any, count: int) -> None:
    """Warm the task machinery: create and finish ``count`` tasks."""
    tasks = [make() for _ in range(count)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _async_waiting(contender: AsyncContender, dsn: str, count: int) -> dict[str, Any]:
    await contender.open(PoolSpec(dsn, 1, 1))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(contender.acquire())
        await _spawn_and_wait(lambda: asyncio.create_task(contender.checkout()), 100)
        before = await _settled_rss()
        tasks = [asyncio.create_task(contender.checkout()) for _ in range(count)]
        after = await _settled_rss()
        done = sum(task.done() for task in tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await contender.close()
    result = _result(before, after, count, PER_WAITERS)
    if done:
        result["warning"] = f"{done} waiters had finished before the measure"
    return result


def _threads_waiting(contender: ThreadsContender, dsn: str) -> dict[str, Any]:
    contender.open_sync(PoolSpec(dsn, 1, 1))
    release = threading.Event()
    threads = [threading.Thread(target=contender.checkout_sync, daemon=True) for _ in range(THREAD_WAITERS)]
    with contender.acquire_sync():
        release.wait(SETTLE)
        gc.collect()
        before = rss_kib()
        for thread in threads:
            thread.start()
        release.wait(SETTLE)
        gc.collect()
        after = rss_kib()
    for thread in threads:
        thread.join()
    contender.close_sync()
    return _result(before, after, THREAD_WAITERS, PER_WAITERS)


async def _async_idle(cls: type[AsyncContender], dsn: str, count: int) -> dict[str, Any]:
    warm = cls()
    await warm.open(PoolSpec(dsn, 1, 1))
    await warm.query("SELECT 1")
    before = await _settled_rss()
    big = cls()
    await big.open(PoolSpec(dsn, count, count))
    after = await _settled_rss()
    threads = threading.active_count()
    await big.close()
    await warm.close()
    return {**_result(before, after, count, 1), "threads_after": threads}


def _threads_idle(cls: type[ThreadsContender], dsn: str, count: int) -> dict[str, Any]:
    warm = cls()
    warm.open_sync(PoolSpec(dsn, 1, 1))
    warm.query_sync("SELECT 1")
    gc.collect()
    before = rss_kib()
    big = cls()
    big.open_sync(PoolSpec(dsn, count, count))
    gc.collect()
    after = rss_kib()
    threads = threading.active_count()
    big.close_sync()
    warm.close_sync()
    return {**_result(before, after, count, 1), "threads_after": threads}


def run_child(key: str, what: str, dsn: str, count: int) -> dict[str, Any]:
    """In the child process: one measure of one contender."""
    if key == BASELINE_KEY:
        return asyncio.run(_baseline_waiting(count))
    cls = by_key(key)
    if issubclass(cls, ThreadsContender):
        return _threads_waiting(cls(), dsn) if what == "waiting" else _threads_idle(cls, dsn, count)
    if what == "waiting":
        return asyncio.run(_async_waiting(cls(), dsn, count))
    return asyncio.run(_async_idle(cls, dsn, count))


def measure(key: str, what: str, dsn: str, count: int) -> dict[str, Any]:
    """Run one measure in a fresh ``python -m benchmarks.memory`` process."""
    argv = [sys.executable, "-m", "benchmarks.memory", key, what, dsn, str(count)]
    try:
        proc = subprocess.run(
            argv, cwd=_ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {SUBPROCESS_TIMEOUT:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    """``python -m benchmarks.memory KEY WHAT DSN COUNT``: print one JSON line."""
    key, what, dsn, count = argv[0], argv[1], argv[2], int(argv[3])
    if what not in ("waiting", "idle"):
        raise SystemExit(f"WHAT must be 'waiting' or 'idle', not {what!r}")
    print(json.dumps(run_child(key, what, dsn, count)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
