"""End to end: the same small FastAPI app on six database stacks, under wrk.

``python -m benchmarks.web [--rounds 3] [--duration 4] [--dsn DSN]``

Each stack serves the same three endpoints from its own uvicorn process (one
worker, plain asyncio, pool of 10 connections), all started at once and left
idle while another is measured:

- ``GET /items/{id}``: one row by primary key;
- ``POST /transfer``: a transaction of two UPDATEs (rows locked in id order);
- ``GET /busy``: a sync ``def`` endpoint that blocks 50 ms (``time.sleep``: legacy code),
  used by the *mixed* scenario, where 50 wrk clients keep FastAPI's sync thread pool
  (anyio's default 40 threads) busy while 64 others measure ``GET /items/{id}``.

Stacks: ``pgpool`` (the README's path, FastAPI dependencies: ``Pool(db)`` for the
read, a plain ``async def`` dependency injecting the running pool, then
``pool.fetchone``; ``Connection(db)`` for the transaction), ``pgpool-conn`` (the
all-``Connection`` path: ``Connection(db, autocommit=True)`` for the read,
``Connection(db)`` for the transaction; both generator dependencies, whose
per-request cost in FastAPI this stack keeps visible), ``pgpool-direct``
(the same shape as the asyncpg stack: pool calls in the endpoint, no dependency:
``db.pool.fetchone``, and ``async with db.pool.connection()`` for the transaction),
``psycopg_pool`` (psycopg 3, ``async with pool.connection()``), ``asyncpg``
(``pool.fetchrow``, ``conn.transaction()``),
``psycopg2-threadpool`` (psycopg2's ``ThreadedConnectionPool`` inside
``run_in_threadpool``, the do-it-yourself route). Rounds are interleaved (each round
runs every stack once per scenario, in a rotated order); the table gives medians of
the rounds. wrk (Debian package ``wrk``) is the load generator: 1 thread, 64 connections.
"""

# No `from __future__ import annotations`: FastAPI must resolve the endpoints' annotations,
# which name dependencies local to build_app().

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STACKS = ("pgpool", "pgpool-conn", "pgpool-direct", "psycopg_pool", "asyncpg", "psycopg2-threadpool")
SCENARIOS = ("GET", "POST", "mixed")
ROWS = 1000
POOL = 10

# -- the apps (run in the server processes: `python -m benchmarks.web serve STACK PORT DSN`) --


def build_app(stack: str, dsn: str) -> Any:
    """The FastAPI app of one stack; its lifespan opens and closes the pool."""
    from fastapi import FastAPI

    @dataclasses.dataclass
    class Transfer:
        src: int
        dst: int
        amount: int

    def ordered(t: Transfer) -> list[tuple[int, int]]:
        return sorted([(t.src, -t.amount), (t.dst, t.amount)])  # lock rows in id order

    get_sql = "SELECT id, name, balance FROM web_items WHERE id = %s"
    upd_sql = "UPDATE web_items SET balance = balance + %s WHERE id = %s"

    if stack in ("pgpool", "pgpool-conn", "pgpool-direct"):
        from pgpool_async.fastapi import AppPool, Connection, Pool

        db = AppPool(POOL, POOL, dsn, timeout=30)
        app = FastAPI(lifespan=db.lifespan)
        if stack in ("pgpool", "pgpool-conn"):
            Conn = Connection(db)

            @app.post("/transfer")
            async def transfer(t: Transfer, conn: Conn) -> dict[str, bool]:
                for account, delta in ordered(t):
                    await conn.execute(upd_sql, (delta, account))
                return {"ok": True}

        if stack == "pgpool":
            DB = Pool(db)

            @app.get("/items/{item}")
            async def get_item(item: int, pool: DB) -> dict[str, Any]:
                row = await pool.fetchone(get_sql, (item,))  # one implicit transaction: one round trip
                return {"id": row[0], "name": row[1], "balance": row[2]}

        elif stack == "pgpool-conn":
            ReadConn = Connection(db, autocommit=True)

            @app.get("/items/{item}")
            async def get_item_conn(item: int, conn: ReadConn) -> dict[str, Any]:
                row = await conn.fetchone(get_sql, (item,))
                return {"id": row[0], "name": row[1], "balance": row[2]}

        else:

            @app.get("/items/{item}")
            async def get_item_direct(item: int) -> dict[str, Any]:
                row = await db.pool.fetchone(get_sql, (item,))  # one implicit transaction: one round trip
                return {"id": row[0], "name": row[1], "balance": row[2]}

            @app.post("/transfer")
            async def transfer_direct(t: Transfer) -> dict[str, bool]:
                async with db.pool.connection() as conn:  # committed on exit, rolled back on error
                    for account, delta in ordered(t):
                        await conn.execute(upd_sql, (delta, account))
                return {"ok": True}

    elif stack == "psycopg_pool":
        from psycopg_pool import AsyncConnectionPool as PsycopgPool

        ppool = PsycopgPool(dsn, min_size=POOL, max_size=POOL, open=False)

        @contextlib.asynccontextmanager
        async def lifespan_pp(app: Any) -> Any:
            await ppool.open(wait=True)
            yield
            await ppool.close()

        app = FastAPI(lifespan=lifespan_pp)

        @app.get("/items/{item}")
        async def get_item_pp(item: int) -> dict[str, Any]:
            async with ppool.connection() as conn:
                cur = await conn.execute(get_sql, (item,))
                row = await cur.fetchone()
            assert row is not None
            return {"id": row[0], "name": row[1], "balance": row[2]}

        @app.post("/transfer")
        async def transfer_pp(t: Transfer) -> dict[str, bool]:
            async with ppool.connection() as conn:
                for account, delta in ordered(t):
                    await conn.execute(upd_sql, (delta, account))
            return {"ok": True}

    elif stack == "asyncpg":
        import asyncpg

        holder: dict[str, Any] = {}

        @contextlib.asynccontextmanager
        async def lifespan_apg(app: Any) -> Any:
            holder["pool"] = await asyncpg.create_pool(_uri(dsn), min_size=POOL, max_size=POOL)
            yield
            await holder["pool"].close()

        app = FastAPI(lifespan=lifespan_apg)

        @app.get("/items/{item}")
        async def get_item_apg(item: int) -> dict[str, Any]:
            row = await holder["pool"].fetchrow("SELECT id, name, balance FROM web_items WHERE id = $1", item)
            return {"id": row[0], "name": row[1], "balance": row[2]}

        @app.post("/transfer")
        async def transfer_apg(t: Transfer) -> dict[str, bool]:
            async with holder["pool"].acquire() as conn, conn.transaction():
                for account, delta in ordered(t):
                    await conn.execute(
                        "UPDATE web_items SET balance = balance + $1 WHERE id = $2", delta, account
                    )
            return {"ok": True}

    elif stack == "psycopg2-threadpool":
        from fastapi.concurrency import run_in_threadpool
        from psycopg2.pool import ThreadedConnectionPool

        holder2: dict[str, Any] = {}
        # psycopg2's pool raises at once when all are lent: wait for a slot instead.
        slots = threading.BoundedSemaphore(POOL)

        @contextlib.contextmanager
        def borrowed() -> Iterator[Any]:
            with slots:
                conn = holder2["pool"].getconn()
                try:
                    yield conn
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                finally:
                    holder2["pool"].putconn(conn)

        @contextlib.asynccontextmanager
        async def lifespan_tp(app: Any) -> Any:
            holder2["pool"] = ThreadedConnectionPool(POOL, POOL, dsn)
            yield
            holder2["pool"].closeall()

        app = FastAPI(lifespan=lifespan_tp)

        def get_sync(item: int) -> Any:
            with borrowed() as conn, conn.cursor() as cur:
                cur.execute(get_sql, (item,))
                return cur.fetchone()

        def transfer_sync2(steps: list[tuple[int, int]]) -> None:
            with borrowed() as conn, conn.cursor() as cur:
                for account, delta in steps:
                    cur.execute(upd_sql, (delta, account))

        @app.get("/items/{item}")
        async def get_item_tp(item: int) -> dict[str, Any]:
            row = await run_in_threadpool(get_sync, item)
            return {"id": row[0], "name": row[1], "balance": row[2]}

        @app.post("/transfer")
        async def transfer_tp(t: Transfer) -> dict[str, bool]:
            await run_in_threadpool(transfer_sync2, ordered(t))
            return {"ok": True}

    else:
        raise SystemExit(f"unknown stack {stack!r}; one of {', '.join(STACKS)}")

    @app.get("/busy")
    def busy() -> str:  # legacy blocking code: runs in FastAPI's (anyio's) thread pool
        time.sleep(0.05)
        return "done"

    @app.get("/ready")
    async def ready() -> str:
        return "ok"

    return app


def _uri(dsn: str) -> str:
    """asyncpg wants a URI: turn ``host=... port=... user=... dbname=...`` into one."""
    import psycopg2.extensions

    if "://" in dsn:
        return dsn
    params = psycopg2.extensions.parse_dsn(dsn)
    return (
        f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
        f"{params.get('port', '5432')}/{params.get('dbname', 'postgres')}"
    )


def serve(stack: str, port: int, dsn: str) -> None:
    import uvicorn

    uvicorn.run(build_app(stack, dsn), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the driver ------------------------------------------------------------------------------

POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local a = math.random(1, %(rows)d)
  local b = math.random(1, %(rows)d)
  if a == b then b = a %% %(rows)d + 1 end
  return wrk.format(nil, "/transfer", nil, string.format('{"src": %%d, "dst": %%d, "amount": 1}', a, b))
end
"""

GET_LUA = """
request = function()
  return wrk.format("GET", "/items/" .. math.random(1, %(rows)d))
end
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def servers(dsn: str) -> Iterator[dict[str, str]]:
    """Every stack's uvicorn process, started together; their base URLs."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for stack in STACKS:
            port = _free_port()
            procs[stack] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.web", "serve", stack, str(port), dsn],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
            urls[stack] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        for stack, url in urls.items():
            while True:
                if procs[stack].poll() is not None:
                    raise SystemExit(f"{stack} server exited with {procs[stack].returncode}")
                try:
                    with urllib.request.urlopen(url + "/ready", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{stack} server did not start") from None
                    time.sleep(0.1)
        yield urls
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wrk(url: str, script: str, duration: float, connections: int) -> dict[str, float]:
    """One wrk run: requests/s, p50 and p99 latency (ms), error count."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script % {"rows": ROWS})
    try:
        proc = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s", "--latency", "-s", f.name, url],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=True,
        )
    finally:
        os.unlink(f.name)
    out = proc.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {
        m.group(1): _ms(m.group(2), m.group(3)) for m in re.finditer(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)
    }
    errors = 0
    for m in re.finditer(
        r"Non-2xx or 3xx responses: (\d+)"
        r"|Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
        out,
    ):
        errors += sum(int(g) for g in m.groups() if g)
    return {
        "rps": rps,
        "p50_ms": lat.get("50", float("nan")),
        "p99_ms": lat.get("99", float("nan")),
        "errors": errors,
    }


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_scenario(scenario: str, url: str, duration: float) -> dict[str, float]:
    if scenario == "GET":
        return wrk(url, GET_LUA, duration, 64)
    if scenario == "POST":
        return wrk(url, POST_LUA, duration, 64)
    # mixed: 50 clients on the blocking sync endpoint, 64 measured on GET meanwhile.
    busy: list[subprocess.Popen[bytes]] = [
        subprocess.Popen(
            ["wrk", "-t1", "-c50", f"-d{round(duration) + 2}s", url + "/busy"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        time.sleep(1.0)  # the thread pool is full by now
        return wrk(url, GET_LUA, duration, 64)
    finally:
        for proc in busy:
            proc.wait(timeout=duration + 30)


def setup(dsn: str) -> None:
    from pgpool_async.testing.throwaway import run_sql

    run_sql(
        dsn,
        "DROP TABLE IF EXISTS web_items; "
        "CREATE TABLE web_items (id int PRIMARY KEY, name text NOT NULL, balance int NOT NULL); "
        f"INSERT INTO web_items SELECT g, 'item ' || g, 1000 FROM generate_series(1, {ROWS}) g",
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        serve(args[1], int(args[2]), args[3])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--dsn", default=os.environ.get("PGPOOL_BENCH_DSN"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "web.json")
    opts = parser.parse_args(args)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")

    from .machine import machine_info, server_info
    from .run import server

    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with server(opts.dsn) as (dsn, source):
        setup(dsn)
        machine = machine_info()
        srv = server_info(dsn)
        results: dict[str, dict[str, list[dict[str, float]]]] = {
            s: {st: [] for st in STACKS} for s in SCENARIOS
        }
        with servers(dsn) as urls:
            for stack in STACKS:  # warm-up: imports, pools filled, code paths hot
                wrk(urls[stack], GET_LUA, 1, 16)
            for rnd in range(opts.rounds):
                order = list(STACKS)
                random.Random(rnd).shuffle(order)
                for scenario in SCENARIOS:
                    for stack in order:
                        figures = run_scenario(scenario, urls[stack], opts.duration)
                        results[scenario][stack].append(figures)
                        print(
                            f"round {rnd + 1} {scenario:5} {stack:20} {figures['rps']:9,.0f} req/s "
                            f"p50 {figures['p50_ms']:7.2f} ms p99 {figures['p99_ms']:7.2f} ms "
                            f"errors {figures['errors']:.0f}",
                            flush=True,
                        )
        machine["loadavg_at_end"] = list(os.getloadavg())
    table = report(results)
    print()
    print(table)
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(
        json.dumps(
            {
                "command": "python -m benchmarks.web " + " ".join(args),
                "started_at": started_at,
                "machine": machine,
                "server": srv,
                "server_source": source,
                "settings": vars(opts) | {"json": _shown(opts.json), "dsn": "given" if opts.dsn else None},
                "results": results,
                "table": table,
            },
            indent=2,
        )
    )
    return 0


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it: no local directory in the results."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def report(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """A markdown table: medians per scenario and stack, and ratios to the pgpool stacks."""
    lines = [
        "| scenario | stack | req/s | p50 ms | p99 ms | errors | pgpool ÷ it | pgpool-direct ÷ it |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        med = {
            stack: {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")}
            | {"errors": sum(r["errors"] for r in runs)}
            for stack, runs in results[scenario].items()
            if runs
        }
        for stack, m in med.items():
            lines.append(
                f"| {scenario} | {stack} | {m['rps']:,.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} "
                f"| {m['errors']:.0f} "
                f"| {med['pgpool']['rps'] / m['rps']:.2f} | {med['pgpool-direct']['rps'] / m['rps']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
