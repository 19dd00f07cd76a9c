"""``python -m benchmarks.run``: pgpool_async and its peers, speed and memory, one run.

Every contender runs against the same server with the same pool size. Rounds
interleave the contenders (the order rotates each round) and the tables show
medians over rounds. Without ``--dsn`` (nor ``$PGPOOL_DSN``) a throwaway
PostgreSQL server is started for the run and destroyed at the end.

Prints one table per workload and the project's target ratios, and writes
them to ``--json`` (figures, per-round values, machine info) and the same path
with ``.txt`` (the printed tables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pgpool_async.testing.faultproxy import FaultProxy

from . import memory as memory_mod
from . import realistic
from .contenders import ContenderClass, select
from .machine import machine_info, server_info
from .report import aggregate, memory_figures, render, targets
from .workloads import Plan, pool_round, realistic_round, spike_round

__all__ = ["Settings", "main", "parse_args"]

WORKLOADS = ("select1", "checkout", "overload", "waiters", "spike", "memory", *realistic.WORKLOADS)
#: ``--workloads`` names that stand for several workloads
WORKLOAD_GROUPS = {"realistic": realistic.WORKLOADS}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_ROUNDS = 5
DEFAULT_SECONDS = 2.0
QUICK_SECONDS = 0.3
DEFAULT_WAITERS = memory_mod.PER_WAITERS
QUICK_WAITERS = 2_000
DEFAULT_IDLE = 100
QUICK_IDLE = 10
SPARE_CONNECTIONS = 30

Rounds = dict[str, dict[str, list[dict[str, Any]]]]


@dataclass(frozen=True)
class Settings:
    """What to run and for how long."""

    rounds: int
    seconds: float
    warmup: float
    quick: bool
    only: tuple[str, ...]
    workloads: tuple[str, ...]
    waiters: int
    idle: int
    json_path: Path
    #: --traced: the realistic workloads with the OpenTelemetry SDK (see :mod:`benchmarks.traced`)
    traced: bool = False

    @property
    def text_path(self) -> Path:
        """The printed tables go next to the JSON."""
        return self.json_path.with_suffix(".txt")


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line options into :class:`Settings` (``--dsn`` is read separately)."""
    parser = _parser()
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else DEFAULT_ROUNDS)
    seconds = args.seconds if args.seconds is not None else (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    if rounds < 1 or seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    workloads = [
        w for name in _split(args.workloads) for w in WORKLOAD_GROUPS.get(name, (name,))
    ] or WORKLOADS
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        groups = "; ".join(f"{name} = {','.join(members)}" for name, members in WORKLOAD_GROUPS.items())
        parser.error(
            f"unknown workload(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(WORKLOADS)}; groups: {groups}"
        )
    try:
        select(_split(args.only))
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    if args.traced and not set(workloads) <= realistic.ALL:
        parser.error("--traced runs the realistic workloads only: add --workloads realistic")
    default_json = RESULTS_DIR / (
        "quick.json" if args.quick else ("latest_traced.json" if args.traced else "latest.json")
    )
    return Settings(
        rounds=rounds,
        seconds=seconds,
        warmup=min(0.1, seconds / 5),
        quick=args.quick,
        only=_split(args.only),
        workloads=tuple(w for w in WORKLOADS if w in workloads),
        waiters=QUICK_WAITERS if args.quick else DEFAULT_WAITERS,
        idle=QUICK_IDLE if args.quick else DEFAULT_IDLE,
        json_path=Path(args.json) if args.json else default_json,
        traced=args.traced,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGPOOL_DSN"),
        help="server to use (default $PGPOOL_DSN, else a throwaway server)",
    )
    parser.add_argument("--rounds", type=int, help=f"rounds per workload (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--seconds",
        type=float,
        help="seconds per SELECT 1 window; overload and each realistic workload half, checkout and "
        f"each of the two waiters windows a quarter (default {DEFAULT_SECONDS})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke mode: 1 round of {QUICK_SECONDS} s, small memory counts, no 7 s spikes, "
        "JSON to results/quick.json",
    )
    parser.add_argument("--json", help="where to write the JSON (default benchmarks/results/latest.json)")
    parser.add_argument(
        "--only",
        help="comma-separated contender keys: pgpool, pgpool-ac, pgpool-fetchval, pgpool-fetchval-ac, "
        'the same with -thread (io="thread"), asyncpg, psycopg_pool, psycopg_pool-ac, aiopg, naive, '
        "native-runner, native-runner-tx, threads",
    )
    parser.add_argument(
        "--traced",
        action="store_true",
        help="the realistic workloads traced: an OpenTelemetry SDK tracer provider with a batch span "
        "processor (spans dropped, not sent), each operation in a request span, each contender with its "
        "own instrumentation (pgpool_async: its own spans; asyncpg, psycopg, aiopg, psycopg2: "
        "opentelemetry-instrumentation-*), switched on for its rounds only",
    )
    parser.add_argument(
        "--workloads",
        help=f"comma-separated subset of {','.join(WORKLOADS)}; "
        f"'realistic' stands for {','.join(realistic.WORKLOADS)}",
    )
    return parser


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _dsn_from_argv(argv: Sequence[str] | None) -> str | None:
    args, _ = _parser().parse_known_args(argv)
    return args.dsn  # type: ignore[no-any-return]


# -- progress ---------------------------------------------------------------------------------

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, with the time since start."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


_BRIEF_FIELDS = frozenset(
    ("ops_per_sec", "ops_per_sec_few", "ops_per_sec_many", "many_over_few", "p99_ms", "opened", "makespan_ms")
)


def _brief(figures: dict[str, Any]) -> str:
    if "error" in figures:
        return f"ERROR {figures['error']}"
    parts = [f"{k}={v}" for k, v in figures.items() if k in _BRIEF_FIELDS]
    return " ".join(parts) + (f" errors={figures['errors']}" if figures.get("errors") else "")


# -- server -------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[tuple[str, str]]:
    """``(dsn, source)``: the given server, or a throwaway one destroyed afterwards."""
    if dsn:
        yield dsn, "given DSN"
        return
    from pgpool_async.testing.throwaway import ThrowawayPostgres

    progress("starting a throwaway PostgreSQL server")
    pg = ThrowawayPostgres(settings={"max_connections": "300"})
    try:
        pg.start()
        yield pg.dsn, "throwaway server (pgpool_async.testing.throwaway)"
    finally:
        pg.destroy()
        progress("throwaway server destroyed")


# -- running ------------------------------------------------------------------------------------


def _rotated(items: Sequence[ContenderClass], shift: int) -> list[ContenderClass]:
    """``items`` rotated left by ``shift``: each round starts with another contender."""
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


async def run_pool_workloads(
    classes: Sequence[ContenderClass], dsn: str, settings: Settings, rounds: Rounds
) -> None:
    """select1, checkout, overload and waiters: every round, every contender (rotated order)."""
    enabled = frozenset(settings.workloads) & {"select1", "checkout", "overload", "waiters"}
    if not enabled:
        return
    plan = Plan(seconds=settings.seconds, warmup=settings.warmup)
    for number in range(settings.rounds):
        for cls in _rotated(classes, number):
            figures = await pool_round(cls, dsn, plan, enabled)
            for work, figs in figures.items():
                rounds.setdefault(work, {}).setdefault(cls.key, []).append(figs)
                progress(f"round {number + 1}/{settings.rounds} {work:8} {cls.name}: {_brief(figs)}")


async def run_realistic(
    classes: Sequence[ContenderClass], dsn: str, settings: Settings, rounds: Rounds
) -> None:
    """row_by_key, rows_100, write_tx: tables seeded once (dropped at the end), then every
    round, every contender that runs them (rotated order). In the first round each
    contender's first results (fixed keys) are checked against the first contender's.

    :raises SystemExit: a contender returned other values (see :mod:`benchmarks.realistic`).
    """
    enabled = frozenset(settings.workloads) & realistic.ALL
    runners = [cls for cls in classes if enabled & cls.realistic]
    if not runners:
        return
    progress(f"seeding {realistic.ITEMS} ({realistic.ROWS:,} rows) and {realistic.WRITES}")
    await asyncio.to_thread(realistic.seed, dsn)
    plan = Plan(seconds=settings.seconds, warmup=settings.warmup)
    with contextlib.ExitStack() as stack:
        tracing = None
        if settings.traced:
            from .traced import Tracing, sdk

            tracing = Tracing(*stack.enter_context(sdk(True, metrics=False)))
            for cls in runners:
                progress(f"traced   {cls.name}: {tracing.how(cls)}")
        await _realistic_rounds(runners, dsn, settings, plan, rounds, tracing)


async def _realistic_rounds(
    runners: Sequence[ContenderClass],
    dsn: str,
    settings: Settings,
    plan: Plan,
    rounds: Rounds,
    tracing: Any,
) -> None:
    enabled = frozenset(settings.workloads) & realistic.ALL
    reference: tuple[str, dict[str, Any]] | None = None
    try:
        for number in range(settings.rounds):
            for cls in _rotated(runners, number):
                try:
                    figures, sample = await realistic_round(
                        cls, dsn, plan, enabled, check=number == 0, tracing=tracing
                    )
                    if sample is not None and reference is None:
                        reference = (cls.key, sample)
                    elif sample is not None and reference is not None:
                        realistic.compare_samples(*reference, cls.key, sample)
                except realistic.Mismatch as exc:
                    raise SystemExit(
                        f"realistic workloads: the contenders return different values: {exc}"
                    ) from exc
                if sample is not None and reference is not None:
                    same = "the reference" if reference[0] == cls.key else f"the same as {reference[0]}'s"
                    progress(f"check    {cls.name}: values of the expected types, {same}")
                for work, figs in figures.items():
                    rounds.setdefault(work, {}).setdefault(cls.key, []).append(figs)
                    progress(f"round {number + 1}/{settings.rounds} {work:10} {cls.name}: {_brief(figs)}")
    finally:
        await asyncio.to_thread(realistic.drop, dsn)


async def run_spikes(classes: Sequence[ContenderClass], dsn: str, settings: Settings, rounds: Rounds) -> None:
    """The spike: representatives only, every round, through one delaying proxy."""
    spikers = [cls for cls in classes if cls.representative]
    if "spike" not in settings.workloads or not spikers:
        return
    host, port = _host_port(dsn)
    with FaultProxy(host, port) as proxy:
        for number in range(settings.rounds):
            for cls in _rotated(spikers, number):
                if cls.spike_rounds is not None and (settings.quick or number >= cls.spike_rounds):
                    continue  # psycopg2's pool: ~7 s, the same every round; not in --quick
                figs = await spike_round(cls, proxy, dsn)
                rounds.setdefault("spike", {}).setdefault(cls.key, []).append(figs)
                progress(f"round {number + 1}/{settings.rounds} spike    {cls.name}: {_brief(figs)}")


def _host_port(dsn: str) -> tuple[str, int]:
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    host = params.get("host") or "127.0.0.1"
    if host.startswith("/"):
        raise SystemExit("the spike needs a TCP server address (host=127.0.0.1), not a Unix socket")
    return ("127.0.0.1" if host == "localhost" else host), int(params.get("port", 5432))


def run_memory(
    classes: Sequence[ContenderClass], dsn: str, settings: Settings, max_connections: int
) -> dict[str, dict[str, Any]]:
    """Each representative's memory measures, each in a fresh process, plus the floor."""
    if "memory" not in settings.workloads:
        return {}
    idle = max(1, min(settings.idle, max_connections - SPARE_CONNECTIONS))
    out: dict[str, dict[str, Any]] = {
        memory_mod.BASELINE_KEY: {
            "waiting": memory_mod.measure(memory_mod.BASELINE_KEY, "waiting", dsn, settings.waiters)
        }
    }
    for cls in (c for c in classes if c.representative):
        out[cls.key] = {
            "waiting": memory_mod.measure(cls.key, "waiting", dsn, settings.waiters),
            "idle": memory_mod.measure(cls.key, "idle", dsn, idle),
        }
        progress(f"memory   {cls.name}: {out[cls.key]}")
    return out


def stall_figures(rounds: Rounds) -> dict[str, dict[str, Any]]:
    """``key -> workload -> median over rounds of the longest gap`` (ms), and
    ``worst``: the longest gap of any round of any workload."""
    out: dict[str, dict[str, Any]] = {}
    for work, per_key in rounds.items():
        for key, runs in per_key.items():
            stalls = [r["max_stall_ms"] for r in runs if "max_stall_ms" in r]
            if stalls:
                figs = out.setdefault(key, {})
                figs[work] = statistics.median(stalls)
                figs["worst"] = max(figs.get("worst", 0.0), *stalls)
    return out


# -- output ----------------------------------------------------------------------------------------


def header(settings: Settings, machine: dict[str, Any], srv: dict[str, Any], source: str) -> str:
    """The lines above the tables: what ran where."""
    return "\n".join(
        [
            "pgpool_async benchmarks: python -m benchmarks.run "
            f"(rounds={settings.rounds}, seconds={settings.seconds:g} "
            f"[overload and realistic {settings.seconds / 2:g}, "
            f"checkout and waiters {settings.seconds / 4:g}], "
            f"warmup={settings.warmup:g}{', quick' if settings.quick else ''}"
            f"{', traced' if settings.traced else ''})",
            f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, {machine['memory_total']}; "
            f"Python {machine['python']}; {machine['event_loop']}; "
            f"load average at start {machine['loadavg_at_start'][0]:.2f} (other processes share the cores)",
            f"server: PostgreSQL {srv['server_version']} ({source}), "
            f"max_connections={srv['max_connections']}, loopback TCP",
            "packages: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v),
            f"source: commit {machine['source']['commit']}, pgpool_async files changed since: "
            f"{', '.join(machine['source']['pgpool_async_uncommitted']) or 'none'}",
            f"pgpool_async io: default {machine['pgpool_io']['default']!r} "
            f"(loop-native path: {machine['pgpool_io']['loop_native']}); "
            'io="thread" rows: the same call on the thread path',
            "medians over rounds; /pg = this row / pgpool_async connection() (default settings); "
            "stall = longest gap of a 1 ms ticker",
            *_traced_lines(settings),
        ]
    )


def _traced_lines(settings: Settings) -> list[str]:
    """With ``--traced``: how each contender was traced."""
    if not settings.traced:
        return []
    from .traced import Tracing

    runners = [cls for cls in select(settings.only) if cls.realistic & frozenset(settings.workloads)]
    return [
        "traced: OpenTelemetry SDK TracerProvider + BatchSpanProcessor (an exporter that drops the spans), "
        "no meter provider; each operation in a request span; each contender's instrumentation on for its "
        "own rounds only:",
        *(f"  {cls.key}: {Tracing.how(cls)}" for cls in runners),
    ]


def _command(argv: Sequence[str] | None) -> str:
    """The command line, the DSN left out (it may hold a password)."""
    args = list(argv if argv is not None else sys.argv[1:])
    shown = []
    for i, arg in enumerate(args):
        hidden = i > 0 and args[i - 1] == "--dsn"
        shown.append("<dsn>" if hidden else ("--dsn=<dsn>" if arg.startswith("--dsn=") else arg))
    return " ".join(["python -m benchmarks.run", *shown])


def write_outputs(settings: Settings, text: str, document: dict[str, Any]) -> None:
    """The JSON and the text next to it."""
    settings.json_path.parent.mkdir(parents=True, exist_ok=True)
    settings.json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    settings.text_path.write_text(text, encoding="utf-8")
    progress(f"wrote {settings.json_path} and {settings.text_path}")


async def run_all(dsn: str, settings: Settings) -> tuple[Rounds, dict[str, dict[str, Any]]]:
    """Every enabled async workload; returns the per-round figures (memory runs later)."""
    classes = select(settings.only)
    rounds: Rounds = {}
    await run_pool_workloads(classes, dsn, settings, rounds)
    await run_realistic(classes, dsn, settings, rounds)
    await run_spikes(classes, dsn, settings, rounds)
    return rounds, stall_figures(rounds)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; print the tables; write the JSON and text."""
    settings = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    with server(_dsn_from_argv(argv)) as (dsn, source):
        srv = server_info(dsn)
        progress(
            f"server {srv['server_version']} ({source}); contenders: "
            f"{', '.join(c.key for c in select(settings.only))}"
        )
        rounds, stalls = asyncio.run(run_all(dsn, settings))
        memory = run_memory(select(settings.only), dsn, settings, srv["max_connections"])
    results = aggregate(rounds)
    mem = memory_figures(memory)
    text = render(results, stalls, mem, header(settings, machine, srv, source))
    print(text, end="")
    document = {
        "command": _command(argv),
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - _T0, 1),
        "settings": {**asdict(settings), "json_path": str(settings.json_path)},
        "machine": {**machine, "loadavg_at_end": list(os.getloadavg())},
        "server": {**srv, "source": source},
        "contenders": [
            {"key": c.key, "name": c.name, "library": c.library, "mode": c.mode, "note": c.note}
            for c in select(settings.only)
        ],
        "targets": targets(results),
        "results": results,
        "stalls_ms": stalls,
        "memory": memory,
        "memory_summary": mem,
        "rounds": rounds,
    }
    write_outputs(settings, text, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
