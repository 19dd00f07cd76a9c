"""Medians over rounds, ratios to pgpool_async, the printed tables and the JSON.

Figures per round come in as ``rounds[workload][contender_key] -> [figures, ...]``;
each table shows the median over the rounds without an error. ``/pg`` columns
divide a row's figure by pgpool_async ``connection()``'s (default mode) figure;
``/asyncpg`` columns (realistic tables) by asyncpg's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .contenders import CONTENDERS, by_key
from .memory import BASELINE_KEY
from .realistic import RANGE_ROWS, ROWS
from .realistic import WORKLOADS as REALISTIC_WORKLOADS

__all__ = ["REFERENCE", "Column", "aggregate", "render", "targets"]

REFERENCE = "pgpool"
Figures = dict[str, Any]
Results = dict[str, dict[str, Figures]]


def _median_figures(rounds: Sequence[Figures]) -> Figures:
    """Median of every numeric figure over the rounds that did not fail."""
    good = [r for r in rounds if "error" not in r]
    out: Figures = {"rounds_ok": len(good), "rounds": len(rounds)}
    if not good:
        out["error"] = rounds[-1].get("error", "no rounds") if rounds else "no rounds"
        return out
    for name in good[0]:
        values = [
            r[name] for r in good if isinstance(r.get(name), (int, float)) and not isinstance(r[name], bool)
        ]
        values = [v for v in values if not math.isnan(v)]
        if values:
            out[name] = statistics.median(values)
    errors = sum(int(r.get("errors", 0)) for r in good)
    if errors:
        out["errors"] = errors
        out["first_error"] = next(r["first_error"] for r in good if r.get("first_error"))
    if "max_stall_ms" in out:
        out["worst_stall_ms"] = max(r.get("max_stall_ms", 0.0) for r in good)
    return out


def aggregate(rounds: dict[str, dict[str, list[Figures]]]) -> Results:
    """``workload -> key -> median figures``."""
    return {
        work: {key: _median_figures(runs) for key, runs in by_key_.items()}
        for work, by_key_ in rounds.items()
    }


# -- formatting ------------------------------------------------------------------------


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)) and abs(value) >= 1000:
        return f"{value:,.0f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _ratio(value: Any, reference: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)) or not reference:
        return None
    return value / reference


@dataclass(frozen=True)
class Column:
    """One table column: header, figure name, whether to add a ``/pg`` ratio column,
    and the other rows (keys) to add a ratio column against (``/asyncpg``)."""

    header: str
    field: str
    ratio: bool = False
    digits: int = 2
    versus: tuple[str, ...] = ()


SLEEP0 = "+sleep0"


def _label(key: str, workload: str) -> str:
    if key == BASELINE_KEY:
        return "asyncio tasks on an Event (floor)"
    if key.endswith(SLEEP0):
        return _label(key.removesuffix(SLEEP0), workload) + "; sleep(0)"
    cls = by_key(key)
    return cls.checkout_name if workload == "checkout" and cls.checkout_name else cls.name


def _mode(key: str) -> str:
    return "-" if key == BASELINE_KEY else by_key(key.removesuffix(SLEEP0)).mode


def checkout_rows(results: Results) -> dict[str, Figures]:
    """The checkout table: each library's checkout, and pgpool's again with a
    ``sleep(0)`` after each (its checkout alone never lets other tasks run)."""
    rows = dict(results.get("checkout", {}))
    for key, figures in results.get("checkout" + SLEEP0, {}).items():
        rows[key + SLEEP0] = figures
    return rows


def _table_rows(workload: str, figures: dict[str, Figures], columns: Sequence[Column]) -> list[list[str]]:
    reference = figures.get(REFERENCE, {})
    rows = []
    for key, fig in figures.items():
        row = [_label(key, workload), _mode(key)]
        if "error" in fig and len(fig) <= 3:
            cells = sum(1 + int(col.ratio) + len(col.versus) for col in columns)
            rows.append([*row, *(["-"] * cells), f"error: {fig['error']}"[:120]])
            continue
        for col in columns:
            row.append(_num(fig.get(col.field), col.digits))
            if col.ratio:
                ratio = _ratio(fig.get(col.field), reference.get(col.field))
                row.append("-" if ratio is None else f"{ratio:.2f}")
            for other in col.versus:
                ratio = _ratio(fig.get(col.field), figures.get(other, {}).get(col.field))
                row.append("-" if ratio is None else f"{ratio:.2f}")
        if fig.get("errors"):
            row.append(f"({fig['errors']} errors: {str(fig.get('first_error'))[:60]})")
        rows.append(row)
    return rows


def _align(column: int, text: str, width: int) -> str:
    """Names left, figures right."""
    return text.ljust(width) if column < 2 else text.rjust(width)


def _format_table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[: len(headers)]):
            widths[i] = max(widths[i], len(cell))
    lines = [
        title,
        "  ".join(_align(i, h, w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))),
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [_align(i, c, widths[i]) for i, c in enumerate(row[: len(headers)])]
        lines.append("  ".join(cells + row[len(headers) :]))
    return "\n".join(lines)


def table(title: str, workload: str, figures: dict[str, Figures], columns: Sequence[Column]) -> str:
    """One workload's table: contender, mode, then the columns (with ratio columns)."""
    headers = ["contender", "mode"]
    for col in columns:
        headers.append(col.header)
        if col.ratio:
            headers.append("/pg")
        headers.extend(f"/{other}" for other in col.versus)
    return _format_table(title, headers, _table_rows(workload, figures, columns))


# -- the tables ----------------------------------------------------------------------------

SELECT1_COLUMNS = (
    Column("ops/s", "ops_per_sec", ratio=True),
    Column("p50 ms", "p50_ms", digits=3),
    Column("p99 ms", "p99_ms", digits=3),
    Column("stall ms", "max_stall_ms"),
)
OVERLOAD_COLUMNS = (
    Column("ops/s", "ops_per_sec", ratio=True),
    Column("/ideal", "ops_vs_ideal", digits=3),
    Column("wait p50", "wait_p50_ms", digits=1),
    Column("wait p99", "wait_p99_ms", digits=1),
    Column("op p50", "p50_ms", digits=1),
    Column("op p99", "p99_ms", digits=1),
    Column("p99/p50", "p99_over_p50"),
    Column("stall ms", "max_stall_ms"),
)
WAITERS_COLUMNS = (
    Column("ops/s 10 tasks", "ops_per_sec_few", ratio=True),
    Column("ops/s 2,000 tasks", "ops_per_sec_many", ratio=True),
    Column("2,000/10", "many_over_few", digits=3),
    Column("p50 ms 2,000", "p50_ms", digits=1),
    Column("p99 ms 2,000", "p99_ms", digits=1),
    Column("stall ms", "max_stall_ms"),
)
SPIKE_COLUMNS = (
    Column("opened", "opened", ratio=True, digits=1),
    Column("makespan ms", "makespan_ms", ratio=True, digits=1),
    Column("p50 ms", "p50_ms", digits=1),
    Column("p99 ms", "p99_ms", digits=1),
    Column("stall ms", "max_stall_ms"),
)
REALISTIC_COLUMNS = (
    Column("ops/s", "ops_per_sec", ratio=True, versus=("asyncpg",)),
    Column("p50 ms", "p50_ms", digits=3),
    Column("p99 ms", "p99_ms", digits=3),
    Column("stall ms", "max_stall_ms"),
)
STALL_COLUMNS = (
    Column("select1", "select1"),
    Column("checkout", "checkout"),
    Column("overload", "overload"),
    Column("waiters", "waiters"),
    Column("spike", "spike"),
    Column("row_by_key", "row_by_key"),
    Column("rows_100", "rows_100"),
    Column("write_tx", "write_tx"),
    Column("worst", "worst", ratio=True),
)
MEMORY_COLUMNS = (
    Column("MiB/10k waiters", "waiting_mib", ratio=True),
    Column("KiB/idle conn", "idle_kib", ratio=True, digits=1),
    Column("threads", "idle_threads", digits=0),
)


def memory_figures(memory: dict[str, dict[str, Figures]]) -> dict[str, Figures]:
    """``key -> {waiting_mib, idle_kib, idle_threads}`` from the raw memory measures."""
    out: dict[str, Figures] = {}
    for key, measures in memory.items():
        waiting = measures.get("waiting", {})
        idle = measures.get("idle", {})
        fig: Figures = {
            "waiting_mib": waiting.get("scaled_mib"),
            "idle_kib": None if "bytes_per_item" not in idle else idle["bytes_per_item"] / 1024,
            "idle_threads": idle.get("threads_after"),
        }
        errors = [m["error"] for m in (waiting, idle) if "error" in m]
        if errors:
            fig["errors"] = len(errors)
            fig["first_error"] = errors[0]
        out[key] = fig
    return out


def _get(results: Results, workload: str, key: str, field: str) -> Any:
    value = results.get(workload, {}).get(key, {}).get(field)
    return value if isinstance(value, (int, float)) else None


def _quotient(results: Results, workload: str, key: str, other: str, field: str) -> float | None:
    ratio = _ratio(_get(results, workload, key, field), _get(results, workload, other, field))
    return None if ratio is None else round(ratio, 3)


THREAD_SUFFIX = "-thread"
WAITERS_TARGET_PEERS = ("asyncpg", "aiopg", "psycopg_pool")


def _runs_queries(workload: str) -> bool:
    """The workloads whose operations include a query, bar the waiters one and the
    realistic ones (their own lines): the checkout ones are left out."""
    return (
        not workload.startswith("checkout") and workload != "waiters" and workload not in REALISTIC_WORKLOADS
    )


def _is_default_pgpool(key: str) -> bool:
    """pgpool_async rows with the default ``io``."""
    return key.startswith("pgpool") and not key.endswith(THREAD_SUFFIX)


def _is_thread_pgpool(key: str) -> bool:
    """pgpool_async rows with ``io="thread"``."""
    return key.startswith("pgpool") and key.endswith(THREAD_SUFFIX)


def _pgpool_stalls(
    results: Results,
    include: Callable[[str], bool],
    field: str,
    rows: Callable[[str], bool] = _is_default_pgpool,
) -> list[float]:
    """``field`` (``max_stall_ms``: median round; ``worst_stall_ms``) of the
    pgpool_async rows ``rows`` keeps, in the workloads ``include`` keeps."""
    return [
        fig[field]
        for work, per_key in results.items()
        if include(work)
        for key, fig in per_key.items()
        if rows(key) and isinstance(fig.get(field), (int, float))
    ]


def _ratio_across(results: Results, top: tuple[str, str], bottom: tuple[str, str]) -> float | None:
    """``results[top] / results[bottom]`` in ops/s, each a ``(workload, key)``."""
    ratio = _ratio(_get(results, *top, "ops_per_sec"), _get(results, *bottom, "ops_per_sec"))
    return None if ratio is None else round(ratio, 3)


def _peers(results: Results, workload: str, field: str, keys: Sequence[str]) -> str:
    """``"asyncpg 0.85 · aiopg 0.75"``: the same figure for peers, for context."""
    shown = [
        f"{key} {_num(value, 2)}"
        for key in keys
        if (value := _get(results, workload, key, field)) is not None
    ]
    return "; " + " · ".join(shown) if shown else ""


Target = tuple[str, Any, str, str]


def _thread_twin(value: Any) -> Target:
    """The row under a target: the same figure on the thread path (no goal)."""
    return ('  the same, io="thread"', value, "", "the thread path, for comparison")


def _vs_aiopg(results: Results, name: str, key: str, goal: str, detail: str) -> list[Target]:
    """A default row against aiopg, then its ``io="thread"`` twin (no goal)."""
    q = _quotient
    return [
        (name, q(results, "select1", key, "aiopg", "ops_per_sec"), goal, detail),
        _thread_twin(q(results, "select1", key + THREAD_SUFFIX, "aiopg", "ops_per_sec")),
    ]


def targets(results: Results) -> list[Figures]:
    """The ratios the project tracks, pgpool_async's figure first (its default
    ``io``; the ``io="thread"`` figure on the line below where it differs)."""
    q = _quotient

    def stall(include: Callable[[str], bool], field: str, rows: Callable[[str], bool]) -> float | None:
        return max(_pgpool_stalls(results, include, field, rows), default=None)

    rows: list[Target] = [
        *_vs_aiopg(
            results,
            "connection() autocommit+SELECT 1 vs aiopg",
            "pgpool-ac",
            ">= 1.5",
            "ops/s ratio, both autocommit (issue 11)",
        ),
        *_vs_aiopg(
            results,
            "connection() tx+SELECT 1 vs aiopg",
            "pgpool",
            ">= 1.0",
            "ops/s ratio, pgpool tx (default: BEGIN/SELECT/COMMIT) vs aiopg autocommit (its only mode)",
        ),
        *_vs_aiopg(
            results,
            "pool.fetchval vs aiopg",
            "pgpool-fetchval",
            ">= 1.5",
            "ops/s ratio, pgpool tx (default settings) vs aiopg autocommit",
        ),
        *_vs_aiopg(
            results,
            "pool.fetchval autocommit vs aiopg",
            "pgpool-fetchval-ac",
            "",
            "ops/s ratio, both autocommit",
        ),
        (
            "connection()+SELECT 1 vs naive wrapper",
            q(results, "select1", "pgpool", "naive", "ops_per_sec"),
            "",
            "ops/s ratio, both tx",
        ),
        (
            "checkout+return vs psycopg_pool",
            q(results, "checkout", "pgpool", "psycopg_pool", "ops_per_sec"),
            "",
            "ops/s ratio; getconn checkpoints once per checkout",
        ),
        (
            "checkout+return; sleep(0) vs psycopg_pool",
            _ratio_across(results, ("checkout" + SLEEP0, "pgpool"), ("checkout", "psycopg_pool")),
            "",
            "ops/s ratio, pgpool yielding once per checkout",
        ),
        (
            "overload throughput / ideal",
            _get(results, "overload", "pgpool", "ops_vs_ideal"),
            "",
            "ideal = 10 conns / 5 ms = 2000 ops/s",
        ),
        (
            "overload p99/p50",
            _get(results, "overload", "pgpool", "p99_over_p50"),
            "<= 1.1",
            "whole operation",
        ),
        _thread_twin(_get(results, "overload", "pgpool-thread", "p99_over_p50")),
        (
            "2,000 waiters / 10 tasks",
            _get(results, "waiters", "pgpool", "many_over_few"),
            ">= 0.90",
            "ops/s ratio, SELECT 1 on a pool of 10, pgpool tx"
            + _peers(results, "waiters", "many_over_few", WAITERS_TARGET_PEERS),
        ),
        _thread_twin(_get(results, "waiters", "pgpool-thread", "many_over_few")),
        (
            "spike connections opened",
            _get(results, "spike", "pgpool", "opened"),
            "",
            "50 requests, 150 ms connects",
        ),
        ("spike makespan ms", _get(results, "spike", "pgpool", "makespan_ms"), "", ""),
        (
            "max event-loop stall ms",
            stall(_runs_queries, "max_stall_ms", _is_default_pgpool),
            "not worse",
            "median round, worst pgpool row (default io) running queries, waiters aside (1-2 ms = none)",
        ),
        _thread_twin(stall(_runs_queries, "max_stall_ms", _is_thread_pgpool)),
        (
            "max event-loop stall, worst round ms",
            stall(_runs_queries, "worst_stall_ms", _is_default_pgpool),
            "",
            "the same, worst single round (other processes share the 2 cores)",
        ),
        (
            "event-loop stall with 2,000 waiters ms",
            stall(lambda work: work == "waiters", "max_stall_ms", _is_default_pgpool),
            "",
            "median round, longer of the 10-task and 2,000-task windows",
        ),
        (
            "event-loop stall in the checkout loop ms",
            stall(lambda work: work == "checkout", "max_stall_ms", _is_default_pgpool),
            "",
            "longest gap in the checkout-alone loop",
        ),
    ]
    rows.extend(_realistic_targets(results))
    return [
        {"target": name, "value": value, "goal": goal, "detail": detail} for name, value, goal, detail in rows
    ]


REALISTIC_TARGETS = (
    ("row_by_key", "pgpool", "row_by_key: connection()+fetchone vs asyncpg", "tx vs asyncpg autocommit"),
    ("row_by_key", "pgpool-fetchval", "row_by_key: pool.fetchone vs asyncpg", "one round trip each"),
    ("rows_100", "pgpool", "rows_100: connection()+fetchall vs asyncpg", "tx vs asyncpg autocommit"),
    ("rows_100", "pgpool-fetchval", "rows_100: pool.fetchall vs asyncpg", "one round trip each"),
    ("write_tx", "pgpool", "write_tx: transaction block vs asyncpg", "INSERT RETURNING, UPDATE, COMMIT"),
)


def _realistic_targets(results: Results) -> list[Target]:
    """pgpool_async against asyncpg in the realistic workloads (no goals yet); the
    ``io="thread"`` figure under the ``connection()`` ones; their longest stall."""
    rows: list[Target] = []
    for work, key, name, detail in REALISTIC_TARGETS:
        rows.append(
            (name, _quotient(results, work, key, "asyncpg", "ops_per_sec"), "", f"ops/s ratio, {detail}")
        )
        if key == REFERENCE:
            rows.append(_thread_twin(_quotient(results, work, key + THREAD_SUFFIX, "asyncpg", "ops_per_sec")))

    def stall(rows_kept: Callable[[str], bool]) -> float | None:
        values = _pgpool_stalls(results, lambda work: work in REALISTIC_WORKLOADS, "max_stall_ms", rows_kept)
        return max(values, default=None)

    rows.append(
        (
            "event-loop stall, realistic workloads ms",
            stall(_is_default_pgpool),
            "",
            "median round, worst pgpool row (default io); rows_100 decodes 100 rows on the loop"
            + _peers(results, "rows_100", "max_stall_ms", ("asyncpg", "psycopg_pool", "aiopg")),
        )
    )
    rows.append(_thread_twin(stall(_is_thread_pgpool)))
    return rows


def _targets_table(rows: list[Figures]) -> str:
    lines = ["== Targets (pgpool_async's figures; goals from issue 11) =="]
    width = max(len(r["target"]) for r in rows)
    goal_width = max(len(r["goal"]) for r in rows)
    for row in rows:
        lines.append(
            f"{row['target'].ljust(width)}  {_num(row['value'], 3):>8}  "
            f"{row['goal'].ljust(goal_width)}  {row['detail']}".rstrip()
        )
    return "\n".join(lines)


def render(results: Results, stalls: dict[str, Figures], memory: dict[str, Figures], header: str) -> str:
    """Every table, as printed."""
    parts = [header]
    sections: list[tuple[str, str, Sequence[Column], Callable[[], dict[str, Figures]]]] = [
        (
            "== 1. SELECT 1: 50 tasks, pool 10 (threads: 10) ==",
            "select1",
            SELECT1_COLUMNS,
            lambda: results.get("select1", {}),
        ),
        (
            "== 1b. checkout + return alone: 50 tasks, pool 10 ==",
            "checkout",
            SELECT1_COLUMNS,
            lambda: checkout_rows(results),
        ),
        (
            "== 2. overload: SELECT pg_sleep(0.005), 200 tasks, pool 10 (ideal 2000 ops/s; ms) ==",
            "overload",
            OVERLOAD_COLUMNS,
            lambda: results.get("overload", {}),
        ),
        (
            "== 2b. waiters: SELECT 1, 10 tasks then 2,000 tasks on the same pool of 10 "
            "(2,000/10 = what waiting costs; 1.00 = nothing) ==",
            "waiters",
            WAITERS_COLUMNS,
            lambda: results.get("waiters", {}),
        ),
        (
            "== 3. spike: 50 requests at once, min 5 / max 50, connect +150 ms "
            "(psycopg2-pool rows: 1 round, ~7 s each) ==",
            "spike",
            SPIKE_COLUMNS,
            lambda: results.get("spike", {}),
        ),
        (
            "== 4. event-loop stall: longest ticker gap, median round (worst: any round), ms "
            "(1 ms tick: 1-2 = none) ==",
            "stall",
            STALL_COLUMNS,
            lambda: stalls,
        ),
        ("== 5. memory: RSS growth (fresh process each) ==", "memory", MEMORY_COLUMNS, lambda: memory),
        (
            f"== 6a. realistic row_by_key: one row of 8 mixed columns by primary key ({ROWS:,} rows, "
            "random key), 50 tasks, pool 10 (threads: 10) ==",
            "row_by_key",
            REALISTIC_COLUMNS,
            lambda: results.get("row_by_key", {}),
        ),
        (
            f"== 6b. realistic rows_100: {RANGE_ROWS} such rows, a random key range, 50 tasks, pool 10 ==",
            "rows_100",
            REALISTIC_COLUMNS,
            lambda: results.get("rows_100", {}),
        ),
        (
            "== 6c. realistic write_tx: INSERT ... RETURNING id, UPDATE ... WHERE id, COMMIT; "
            "50 tasks, pool 10 (every row a transaction, whatever its mode) ==",
            "write_tx",
            REALISTIC_COLUMNS,
            lambda: results.get("write_tx", {}),
        ),
    ]
    for title, workload, columns, figures in sections:
        rows = figures()
        if rows:
            parts.append(table(title, workload, _ordered(rows), columns))
    parts.append(_targets_table(targets(results)))
    return "\n\n".join(parts) + "\n"


def _ordered(figures: dict[str, Figures]) -> dict[str, Figures]:
    order = [BASELINE_KEY, *(key for cls in CONTENDERS for key in (cls.key, cls.key + SLEEP0))]
    return {key: figures[key] for key in order if key in figures}


if __name__ == "__main__":  # python -m benchmarks.report: the charts, from the results JSON
    from .charts import main

    raise SystemExit(main())
