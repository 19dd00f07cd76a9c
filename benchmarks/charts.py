"""PNG charts from the results JSON the benchmarks write (``python -m benchmarks.report``).

Reads ``benchmarks/results/latest.json`` (``python -m benchmarks.run``) and
``benchmarks/results/web.json`` (``python -m benchmarks.web``) and writes, into
``docs/img/`` by default:

- ``select1.png``: ``SELECT 1`` ops/s, pgpool_async against its peers;
- ``overload.png``: p50 and p99 latency under overload;
- ``waiters.png``: ops/s as the waiting tasks grow from 10 to 2,000;
- ``fastapi.png``: FastAPI end to end, req/s per stack and scenario.

Each chart carries, under its title, the machine, the commit and the date of the run
its figures come from. A results file that is missing is skipped with a message; a
chart whose figures are missing from its file raises ``KeyError`` naming them.
Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "img"

__all__ = ["OUT", "RESULTS", "main", "provenance", "render_all"]

PGPOOL = "#3f51b5"  # the pool's own bars
PGPOOL_LIGHT = "#9fa8da"
PEER = "#9e9e9e"
PEER_DARK = "#616161"

# (key in latest.json, label) in the order shown; the pool's own rows first.
SELECT1 = [
    ("pgpool", "pgpool_async connection() (tx)"),
    ("pgpool-ac", "pgpool_async connection() autocommit"),
    ("pgpool-fetchval", "pgpool_async pool.fetchval"),
    ("aiopg", "aiopg (autocommit)"),
    ("asyncpg", "asyncpg (autocommit)"),
    ("psycopg_pool-ac", "psycopg_pool autocommit"),
    ("psycopg_pool", "psycopg_pool (tx)"),
    ("threads", "psycopg2 pool in 10 OS threads"),
    ("naive", "psycopg2 pool + anyio.to_thread"),
]
OVERLOAD = [
    ("pgpool", "pgpool_async"),
    ("pgpool-thread", 'pgpool_async io="thread"'),
    ("asyncpg", "asyncpg"),
    ("aiopg", "aiopg"),
    ("psycopg_pool", "psycopg_pool"),
    ("naive", "psycopg2 + to_thread"),
]
WAITERS = [
    ("pgpool", "pgpool_async"),
    ("aiopg", "aiopg"),
    ("asyncpg", "asyncpg"),
    ("pgpool-thread", 'pgpool_async io="thread"'),
    ("psycopg_pool", "psycopg_pool"),
    ("naive", "psycopg2 + to_thread"),
]
WEB = [
    ("pgpool", "pgpool_async: Pool / Connection"),
    ("pgpool-direct", "pgpool_async: pool calls in the endpoint"),
    ("pgpool-conn", "pgpool_async: Connection for reads"),
    ("asyncpg", "asyncpg"),
    ("psycopg_pool", "psycopg_pool"),
    ("psycopg2-threadpool", "psycopg2 + run_in_threadpool"),
]


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    if not path.exists():
        print(f"skipped: {path.relative_to(ROOT)} not found (run its benchmark first)")
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def provenance(data: dict[str, Any]) -> str:
    """One line: the machine, the commit and the date a results file was measured at.

    :raises KeyError: the file has no ``machine`` block (not a benchmark's results).
    """
    m = data["machine"]
    server = data.get("server", {}).get("server_version", "?").split(" ")[0]
    date = str(data.get("started_at", "date not recorded"))[:10]
    commit = m.get("source", {}).get("commit", "?")
    load = m.get("loadavg_at_start")
    load_text = f", load {load[0]:.1f} at start" if load else ""
    return (
        f"{m['cpu_model']}, {m['cpu_count']} cores, Python {m['python']}, PostgreSQL {server}"
        f"{load_text} · commit {commit} · {date}"
    )


def _figure(title: str, data: dict[str, Any], height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, height), dpi=110)
    fig.suptitle(title, fontsize=13, fontweight="bold", x=0.02, ha="left")
    fig.text(0.02, 0.01, provenance(data) + f" · {data.get('command', '')}", fontsize=7.5, color="#555")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", color="#e0e0e0")
    ax.set_axisbelow(True)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def _figures(data: dict[str, Any], workload: str, rows: Sequence[tuple[str, str]]) -> list[tuple[str, Any]]:
    results = data["results"][workload]
    missing = [key for key, _ in rows if key not in results]
    if missing:
        raise KeyError(f"{workload}: no figures for {missing}")
    return [(label, results[key]) for key, label in rows]


def chart_select1(data: dict[str, Any], out: Path) -> Path:
    rows = _figures(data, "select1", SELECT1)
    settings = data["settings"]
    fig, ax = _figure(
        f"SELECT 1, 50 tasks, pool of 10: ops/s (median of {settings['rounds']} rounds)", data, 4.6
    )
    labels = [label for label, _ in rows][::-1]
    values = [fig_["ops_per_sec"] for _, fig_ in rows][::-1]
    colors = [PGPOOL if label.startswith("pgpool") else PEER for label in labels]
    bars = ax.barh(labels, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3, fontsize=8)
    ax.set_xlabel("operations per second (higher is better)")
    ax.set_xlim(0, max(values) * 1.15)
    return _save(fig, out / "select1.png")


def chart_overload(data: dict[str, Any], out: Path) -> Path:
    rows = _figures(data, "overload", OVERLOAD)
    fig, ax = _figure("Overload: pg_sleep(0.005), 200 tasks, pool of 10: latency per request", data, 4.2)
    labels = [label for label, _ in rows][::-1]
    p50 = [f["p50_ms"] for _, f in rows][::-1]
    p99 = [f["p99_ms"] for _, f in rows][::-1]
    ys = range(len(labels))
    own = [label.startswith("pgpool") for label in labels]
    b99 = ax.barh(
        [y + 0.2 for y in ys], p99, height=0.4, label="p99", color=[PGPOOL if o else PEER_DARK for o in own]
    )
    b50 = ax.barh(
        [y - 0.2 for y in ys], p50, height=0.4, label="p50", color=[PGPOOL_LIGHT if o else PEER for o in own]
    )
    ax.bar_label(b99, labels=[f"p99 {v:.0f} ms" for v in p99], padding=3, fontsize=7.5)
    ax.bar_label(b50, labels=[f"p50 {v:.0f} ms" for v in p50], padding=3, fontsize=7.5)
    ax.set_yticks(list(ys), labels)
    ax.set_xlabel("milliseconds from request to result (lower, and p99 close to p50, is better)")
    ax.set_xlim(0, max(p99) * 1.25)
    return _save(fig, out / "overload.png")


def chart_waiters(data: dict[str, Any], out: Path) -> Path:
    rows = _figures(data, "waiters", WAITERS)
    fig, ax = _figure("Waiting: SELECT 1 ops/s as tasks grow from 10 to 2,000 on a pool of 10", data, 4.4)
    ax.grid(axis="y", color="#e0e0e0")
    for label, f in rows:
        few, many = f["tasks_few"], f["tasks_many"]
        own = label.startswith("pgpool")
        style = "-" if own else "--"
        color = PGPOOL if label == "pgpool_async" else (PGPOOL_LIGHT if own else None)
        line = ax.plot(
            [few, many], [f["ops_per_sec_few"], f["ops_per_sec_many"]], style, marker="o", color=color
        )
        ax.annotate(
            f"{label}  ({f['many_over_few']:.2f}x)",
            (many, f["ops_per_sec_many"]),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color=line[0].get_color(),
        )
    ax.set_xscale("log")
    ax.set_xlim(8, 2000 * 12)
    ax.set_xticks([10, 100, 1000, 2000], ["10", "100", "1,000", "2,000"])
    ax.set_xlabel("concurrent tasks (log scale); in brackets: ops/s at 2,000 ÷ ops/s at 10")
    ax.set_ylabel("operations per second")
    ax.set_ylim(0, None)
    return _save(fig, out / "waiters.png")


def chart_fastapi(data: dict[str, Any], out: Path) -> Path:
    results = data["results"]
    scenarios = list(results)
    fig, ax = _figure(
        f"FastAPI end to end: req/s, one uvicorn worker, wrk -c 64 (median of {data['settings']['rounds']} "
        "rounds)",
        data,
        4.8,
    )
    n = len(WEB)
    width = 0.8 / n
    greys = ["#757575", "#9e9e9e", "#bdbdbd"]
    blues = [PGPOOL, "#5c6bc0", PGPOOL_LIGHT]
    for i, (key, label) in enumerate(WEB):
        values = []
        for scenario in scenarios:
            runs = results[scenario].get(key)
            if not runs:
                raise KeyError(f"web {scenario}: no figures for {key}")
            values.append(statistics.median(r["rps"] for r in runs))
        own = key.startswith("pgpool")
        color = blues[i % 3] if own else greys[(i - 3) % 3]
        xs = [s + (i - (n - 1) / 2) * width for s in range(len(scenarios))]
        bars = ax.bar(xs, values, width=width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=6.5, padding=2)
    names = {"GET": "GET: one row by key", "POST": "POST: two UPDATEs", "mixed": "GET, sync endpoints busy"}
    ax.set_xticks(range(len(scenarios)), [names.get(s, s) for s in scenarios])
    ax.grid(axis="x", visible=False)
    ax.grid(axis="y", color="#e0e0e0")
    ax.set_ylabel("requests per second (higher is better)")
    ax.legend(fontsize=7.5, ncols=2, loc="upper right", frameon=False)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
    return _save(fig, out / "fastapi.png")


def render_all(out: Path = OUT) -> list[Path]:
    """Every chart whose results file exists; returns the paths written."""
    written: list[Path] = []
    latest = _load("latest.json")
    if latest is not None:
        written += [chart_select1(latest, out), chart_overload(latest, out), chart_waiters(latest, out)]
    web = _load("web.json")
    if web is not None:
        written.append(chart_fastapi(web, out))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report [--out DIR]``: render the charts; 1 if none could be."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="directory for the PNG files (docs/img)")
    opts = parser.parse_args(argv)
    return 0 if render_all(opts.out) else 1
