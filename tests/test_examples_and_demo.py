"""Examples and the demo run against the real server, so they never rot."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import python_args

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], dsn: str | None, io: str | None) -> str:
    """``python *args`` with the pools' default io set to ``io`` (the test's ``pool_io``)."""
    env = {k: v for k, v in os.environ.items() if k != "PGPOOL_DSN"}
    if dsn:
        env["PGPOOL_DSN"] = dsn
    proc = subprocess.run(
        [sys.executable, *python_args(args, io)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_basic_example(dsn: str, pool_io: str | None) -> None:
    out = run(["examples/basic.py"], dsn, pool_io)
    assert "rows after commit: 1" in out
    assert "rows after rollback: 1" in out
    assert "legacy code says: [1]" in out
    assert "rows after 20 workers: 21" in out
    assert "as expected: couldn't get a connection after 0.10 sec" in out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_with_dsn(dsn: str, backend: str, pool_io: str | None) -> None:
    out = run(
        ["-m", "pgpool_async", "demo", "--tasks", "200", "--pool", "4", "--backend", backend], dsn, pool_io
    )
    assert "200 transfers" in out and "money conserved: True" in out
    assert "requests_num=" in out and "pool_max=4" in out
    # Not a terminal: plain progress lines, no live view.
    assert "running 200 concurrent transfers through a pool of 4 connections" in out
    line = r"\d+/200 done, +\d+ waiting \| connections: \d+ idle, \d+ in use, \d+ opening"
    assert re.search(line, out), out
    assert "╭" not in out


@pytest.mark.single_io("the demo's terminal view: io does not change it")
def test_demo_live_view_on_a_terminal(dsn: str) -> None:
    """On a terminal the demo draws a live view (rich) of requests and connections,
    then prints the same summary lines."""
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "PGPOOL_DSN"}
    env.update(PGPOOL_DSN=dsn, COLUMNS="100", LINES="30", TERM="xterm-256color")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpool_async", "demo", "--tasks", "400", "--pool", "3"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "pgpool_async demo: 400 tasks, a pool of 3 connections" in screen, screen[-3000:]
    for label in ("requests done", "waiting", "in use", "idle", "opening"):
        assert label in screen, label
    assert "400/400" in screen
    assert "money conserved: True" in screen


def test_demo_starts_its_own_server(pool_io: str | None) -> None:
    out = run(["-m", "pgpool_async", "demo", "--tasks", "50"], None, pool_io)
    assert "starting a throwaway PostgreSQL" in out
    assert "money conserved: True" in out


def test_from_psycopg2_example(dsn: str, pool_io: str | None) -> None:
    out = run(["examples/from_psycopg2.py"], dsn, pool_io)
    assert "Worker 4: 200 records" in out
    assert "same counts both ways: True" in out


def test_trio_example(dsn: str, pool_io: str | None) -> None:
    out = run(["examples/trio_app.py"], dsn, pool_io)
    assert "total after 200 transfers: 1000" in out
    assert "slow query cancelled: True" in out
    assert "all connections back: True" in out


def test_listen_worker_example(dsn: str, pool_io: str | None) -> None:
    out = run(["examples/listen_worker.py"], dsn, pool_io)
    assert "processed 20 jobs, in order: True" in out
    assert "queue empty: True" in out


def test_subprocesses_follow_pool_io(tmp_path: Path, pool_io: str | None) -> None:
    """The examples above really run with the test's io (conftest.python_args)."""
    script = tmp_path / "show_io.py"
    script.write_text(
        "from pgpool_async import AsyncConnectionPool\nprint(AsyncConnectionPool(1, 1, 'dbname=x'))\n"
    )
    assert f"io={pool_io or 'auto'}]" in run([str(script)], None, pool_io)
