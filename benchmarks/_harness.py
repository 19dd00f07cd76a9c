"""What the fault benchmarks share: request records, the result rows and their table,
the event-loop ticker, and the census of threads still busy in pgpool_async code.

:mod:`benchmarks.faults` (a server that fails) and :mod:`benchmarks.netfaults` (a
network that fails) both build on it; neither imports the other's scenarios.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

import pgpool_async

__all__ = [
    "LoopTicker",
    "Request",
    "ScenarioResult",
    "busy_threads",
    "error_counts",
    "render_table",
    "timed",
    "wait_no_busy_threads",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(pgpool_async.__file__))


# -- records and results ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One timed request: when it started and ended, and how it failed (class names)."""

    start: float
    end: float
    error: str | None = None
    cause: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """True if it succeeded."""
        return self.error is None

    @property
    def elapsed(self) -> float:
        """Seconds from start to end."""
        return self.end - self.start


@dataclass
class ScenarioResult:
    """One row of the table, plus the raw figures the tests assert on (``details``)."""

    scenario: str
    requests: int
    errors: int
    errors_after_recovery: int | None
    recovery_s: float | None
    connections_opened: int
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        """This result as a markdown table row."""
        after = "-" if self.errors_after_recovery is None else str(self.errors_after_recovery)
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        return (
            f"| {self.scenario} | {self.requests:,} | {self.errors:,} | {after} | {recovery} "
            f"| {self.connections_opened} | {self.notes} |"
        )


class LoopTicker:
    """Sleeps ``tick`` seconds in a loop and records the longest gap between
    wake-ups: how long the event loop was kept from running."""

    def __init__(self, tick: float = 0.001) -> None:
        self.tick = tick
        self.max_gap = 0.0

    async def run(self) -> None:
        """Tick until cancelled."""
        last = time.monotonic()
        while True:
            await anyio.sleep(self.tick)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now


async def timed(op: Callable[[], Awaitable[object]]) -> Request:
    """Run ``op()`` and record it; an ``Exception`` is recorded, not raised."""
    start = time.monotonic()
    try:
        await op()
    except Exception as exc:
        cause = exc.__cause__
        message = str(exc).strip().splitlines()
        return Request(
            start,
            time.monotonic(),
            type(exc).__name__,
            None if cause is None else type(cause).__name__,
            message[0] if message else "",
        )
    return Request(start, time.monotonic())


def error_counts(records: Sequence[Request]) -> dict[str, int]:
    """Failed requests by exception class name."""
    return dict(Counter(r.error for r in records if r.error is not None))


# -- threads still at work -----------------------------------------------------------


def busy_threads(prefixes: Sequence[str] = ()) -> list[str]:
    """Threads (other than this one) whose name starts with one of ``prefixes``,
    or that are running pgpool_async code right now (e.g. a connect or a query
    still blocked in a worker thread). Idle anyio workers are not listed."""
    frames = sys._current_frames()
    me = threading.get_ident()
    found = []
    for thread in threading.enumerate():
        if thread.ident == me or not thread.is_alive():
            continue
        if prefixes and thread.name.startswith(tuple(prefixes)):
            found.append(thread.name)
            continue
        frame = frames.get(thread.ident or 0)
        while frame is not None:
            if frame.f_code.co_filename.startswith(_PACKAGE_DIR) and not frame.f_code.co_filename.endswith(
                ("faultproxy.py", "throwaway.py")
            ):
                found.append(f"{thread.name} in {frame.f_code.co_name}()")
                break
            frame = frame.f_back
    return found


async def wait_no_busy_threads(prefixes: Sequence[str], timeout: float) -> tuple[list[str], float]:
    """Poll :func:`busy_threads` until none is left or ``timeout``; returns what is
    left and how long it took."""
    start = time.monotonic()
    while (left := busy_threads(prefixes)) and time.monotonic() - start < timeout:
        await anyio.sleep(0.05)
    return left, time.monotonic() - start


# -- the table -----------------------------------------------------------------------------

_HEADER = (
    "| scenario | requests | errors | errors after recovery | recovery time (s) "
    "| connections opened | notes |\n|---|---:|---:|---:|---:|---:|---|"
)


def render_table(results: Sequence[ScenarioResult], preamble: str = "") -> str:
    """The markdown table of ``results``, after an optional preamble."""
    lines = [preamble] if preamble else []
    lines += [_HEADER, *(r.row() for r in results)]
    return "\n".join(lines) + "\n"
