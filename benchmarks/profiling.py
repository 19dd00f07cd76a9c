"""Profile pgpool_async's ``connection()`` + ``SELECT 1`` loop and count its thread hops.

``python -m benchmarks.profiling [--dsn DSN] [--seconds S] [--py-spy]`` writes
``benchmarks/results/profile.txt``:

1. thread hops per operation: calls through the pool's ``Offloader``, by
   function, and event-loop wake-ups from other threads (``call_soon_threadsafe``), for
   ``connection()`` + ``fetchval`` (default and autocommit), ``pool.fetchval``
   and checkout alone;
2. a pyinstrument profile of the event-loop thread during the 50-task
   ``connection()`` + ``SELECT 1`` loop: the hottest functions by self time,
   pgpool_async's functions by inclusive time, and the call tree;
3. with ``--py-spy``: py-spy samples of *every* thread (loop and workers) of
   the same loop in a child process, the sleeping ones left out, summed by
   thread kind and function.

``--loop-only`` just runs the loop for ``--seconds`` (what py-spy samples).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from time import perf_counter
from typing import Any

from pgpool_async import AsyncConnectionPool

__all__ = ["count_hops", "main", "run_loop"]

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = 50
POOL = 10
HOP_OPS = 3_000
TOP = 25


# -- the loop under study ------------------------------------------------------------------------


async def run_loop(
    pool: AsyncConnectionPool, op: Callable[[], Awaitable[Any]], ops: int | None, seconds: float | None
) -> int:
    """Run ``op`` from 50 tasks until ``ops`` operations or ``seconds`` passed; returns the count."""
    done = 0
    deadline = perf_counter() + seconds if seconds is not None else float("inf")

    async def worker() -> None:
        nonlocal done
        while (ops is None or done < ops) and perf_counter() < deadline:
            await op()
            done += 1

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return done


def operations(pool: AsyncConnectionPool) -> dict[str, Callable[[], Awaitable[Any]]]:
    """The operations whose hops are counted, by label."""

    async def connection_fetchval() -> None:
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def pool_fetchval() -> None:
        await pool.fetchval("SELECT 1")

    async def checkout() -> None:
        async with pool.connection():
            pass
        await asyncio.sleep(0)  # an extra yield, as the benchmark does

    return {
        "connection()+fetchval": connection_fetchval,
        "pool.fetchval": pool_fetchval,
        "checkout": checkout,
    }


# -- hop counting --------------------------------------------------------------------------------------


def _hop_name(func: Callable[..., Any], args: tuple[Any, ...]) -> str:
    name = getattr(func, "__qualname__", repr(func))
    if name == "run_and_commit" and len(args) > 1:  # run_and_commit(raw, func, ...)
        name = f"run_and_commit({getattr(args[1], '__qualname__', '?')})"
    return name


@contextlib.contextmanager
def counting_hops(loop: asyncio.AbstractEventLoop) -> Iterator[collections.Counter[str]]:
    """Count the pool's thread hops by function: every call through
    ``pgpool_async._thread.offload.Offloader``'s ``run*`` methods (whatever runs them
    underneath), and ``call_soon_threadsafe`` calls, the loop's wake-ups from
    other threads, as ``"<loop wake-ups>"``."""
    from pgpool_async._thread.offload import Offloader

    counts: collections.Counter[str] = collections.Counter()
    originals = {
        name: member
        for name, member in vars(Offloader).items()
        if name.startswith("run") and asyncio.iscoroutinefunction(member)
    }
    original_threadsafe = loop.call_soon_threadsafe

    def counted(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(self: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            counts[_hop_name(func, args)] += 1
            return await method(self, func, *args, **kwargs)

        return wrapper

    def call_soon_threadsafe(callback: Any, *args: Any, **kwargs: Any) -> Any:
        counts["<loop wake-ups>"] += 1
        return original_threadsafe(callback, *args, **kwargs)

    for name, method in originals.items():
        setattr(Offloader, name, counted(method))
    loop.call_soon_threadsafe = call_soon_threadsafe  # type: ignore[method-assign,assignment]
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(Offloader, name, method)
        del loop.call_soon_threadsafe  # back to the class's method


async def count_hops(dsn: str) -> list[str]:
    """Hops and wake-ups per operation, for each operation and mode."""
    lines = ["== thread hops per operation (50 tasks, pool 10, SELECT 1) =="]
    loop = asyncio.get_running_loop()
    for autocommit in (False, True):
        async with AsyncConnectionPool(POOL, POOL, dsn, autocommit=autocommit) as pool:
            for label, op in operations(pool).items():
                await run_loop(pool, op, 200, None)  # warm the worker threads
                with counting_hops(loop) as counts:
                    done = await run_loop(pool, op, HOP_OPS, None)
                per_op = ", ".join(f"{name} {n / done:.2f}" for name, n in sorted(counts.items()))
                hops = sum(n for name, n in counts.items() if not name.startswith("<")) / done
                mode = "autocommit" if autocommit else "tx"
                lines.append(f"{label:22} {mode:10} hops/op {hops:.2f}   [{per_op or 'none'}]")
    return lines


# -- pyinstrument --------------------------------------------------------------------------------------


def _walk(
    frame: Any, stack: tuple[str, ...], inclusive: dict[str, float], self_time: dict[str, float]
) -> None:
    key = f"{frame.function} ({frame.file_path_short}:{frame.line_no})" if frame.file_path else frame.function
    if frame.is_synthetic:
        return
    self_time[key] = self_time.get(key, 0.0) + frame.total_self_time
    if key not in stack:
        inclusive[key] = inclusive.get(key, 0.0) + frame.time
    for child in frame.children:
        _walk(child, (*stack, key), inclusive, self_time)


def _top(times: dict[str, float], total: float, keep: Callable[[str], bool]) -> list[str]:
    rows = sorted(((t, k) for k, t in times.items() if keep(k)), reverse=True)[:TOP]
    return [f"{100 * t / total:6.1f}%  {t:7.3f}s  {k}" for t, k in rows]


async def profile_loop(dsn: str, seconds: float) -> list[str]:
    """pyinstrument on the loop thread during the connection() + SELECT 1 loop."""
    from pyinstrument import Profiler

    async with AsyncConnectionPool(POOL, POOL, dsn) as pool:
        op = operations(pool)["connection()+fetchval"]
        await run_loop(pool, op, 500, None)
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        started = perf_counter()
        done = await run_loop(pool, op, None, seconds)
        elapsed = perf_counter() - started
        profiler.stop()
    root = profiler.last_session.root_frame() if profiler.last_session else None
    if root is None:
        return ["(pyinstrument recorded nothing)"]
    inclusive: dict[str, float] = {}
    self_time: dict[str, float] = {}
    _walk(root, (), inclusive, self_time)
    total = root.time
    return [
        f"== pyinstrument, event-loop thread: {done} ops in {elapsed:.2f} s = {done / elapsed:,.0f} ops/s "
        f"({1e6 * elapsed / done:.0f} us of loop time per op) ==",
        "-- self time, all code --",
        *_top(self_time, total, lambda k: True),
        "-- inclusive time, pgpool_async's functions --",
        *_top(inclusive, total, lambda k: "pgpool_async" in k),
        "-- call tree --",
        profiler.output_text(unicode=True, color=False, show_all=False),
    ]


# -- py-spy ----------------------------------------------------------------------------------------------


def py_spy(dsn: str, seconds: float) -> list[str]:
    """py-spy over every thread (loop and workers) of the same loop in a child process."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(exe):
        return ["(py-spy not installed: pip install py-spy)"]
    raw = Path(tempfile.mkdtemp(prefix="pgpool-pyspy-")) / "profile.raw"
    child = [
        sys.executable,
        "-m",
        "benchmarks.profiling",
        "--loop-only",
        "--dsn",
        dsn,
        "--seconds",
        str(seconds),
    ]
    argv = [exe, "record", "--threads", "-r", "1000", "-f", "raw", "-o", str(raw), "--", *child]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0 or not raw.exists():
        shutil.rmtree(raw.parent, ignore_errors=True)
        return [f"(py-spy failed: {proc.stderr.strip().splitlines()[-1:]})"]
    text = raw.read_text(encoding="utf-8")
    shutil.rmtree(raw.parent, ignore_errors=True)
    return _summarise_collapsed(text)


# Leaf frames where a thread sleeps in C (py-spy's idle detection misses these here):
# lock and queue waits, the idle workers of concurrent.futures and anyio.
_IDLE_LEAVES = (
    "Condition.wait",
    "EpollSelector.select",
    "Event.wait",
    "Thread._wait_for_tstate_lock",
    "_worker (concurrent/futures/thread.py)",
    "WorkerThread.run (anyio/",
)


def _sleeping(frames: list[str]) -> bool:
    """A sample of a thread waiting: a known waiting leaf, or no Python frame at
    all (the event loop inside ``epoll_wait``)."""
    return len(frames) == 1 or frames[-1].startswith(_IDLE_LEAVES)


def _summarise_collapsed(text: str) -> list[str]:
    """Busy samples by thread kind, by leaf function and by pgpool_async function,
    from py-spy's collapsed stacks (line numbers dropped, sleeping leaves left out)."""
    kinds: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = busy = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        count = int(count_text)
        total += count
        if _sleeping(frames):
            continue
        busy += count
        kinds[frames[0].partition(": ")[2] or frames[0]] += count
        leaves[frames[-1]] += count
        for frame in set(frames[1:]):
            if "pgpool_async" in frame:
                inclusive[frame] += count
    lines = [f"== py-spy, all threads: {total} samples, {busy} busy (not in a wait) =="]
    lines += [f"{100 * n / busy:6.1f}%  {kind}" for kind, n in kinds.most_common(8)]
    lines.append("-- busy samples by leaf function --")
    lines += [f"{100 * n / busy:6.1f}%  {name}" for name, n in leaves.most_common(TOP)]
    lines.append("-- busy samples under pgpool_async's functions --")
    lines += [f"{100 * n / busy:6.1f}%  {name}" for name, n in inclusive.most_common(TOP)]
    return lines


# -- entry point ------------------------------------------------------------------------------------------


async def _loop_only(dsn: str, seconds: float) -> None:
    async with AsyncConnectionPool(POOL, POOL, dsn) as pool:
        op = operations(pool)["connection()+fetchval"]
        done = await run_loop(pool, op, None, seconds)
    print(f"{done} ops in {seconds} s", file=sys.stderr)


async def _profile(dsn: str, seconds: float) -> list[str]:
    from .machine import source_state

    state = source_state()
    changed = ", ".join(state["pgpool_async_uncommitted"]) or "none"
    header = f"source: commit {state['commit']}, pgpool_async files changed since: {changed}"
    return [header, "", *await count_hops(dsn), "", *await profile_loop(dsn, seconds)]


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from pgpool_async.testing.throwaway import ThrowawayPostgres

    with ThrowawayPostgres() as pg:
        yield pg.dsn


def main(argv: list[str] | None = None) -> int:
    """Profile, print, and write ``benchmarks/results/profile.txt``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profiling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dsn", default=os.environ.get("PGPOOL_DSN"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--py-spy", action="store_true", help="also sample every thread with py-spy")
    parser.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with _server(args.dsn) as dsn:
        if args.loop_only:
            asyncio.run(_loop_only(dsn, args.seconds))
            return 0
        lines = asyncio.run(_profile(dsn, args.seconds))
        if args.py_spy:
            lines += ["", *py_spy(dsn, args.seconds)]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile.txt").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
