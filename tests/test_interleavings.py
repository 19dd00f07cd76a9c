"""Randomized interleavings of every API on one lent connection, io="loop" against io="thread".

Each seed makes one sequence of steps (``gen_sequence``): statements on the loop
(``conn.execute/fetch*``, client cursors, ``executemany``), psycopg2 code in threads
(``conn.run_sync``, COPY, LISTEN/NOTIFY, named cursors, ``set_session``), SQL
``BEGIN``/``COMMIT``/``ROLLBACK``, ``conn.commit()/rollback()``, nested
``transaction()`` blocks, failing statements, statements cancelled once the
server runs them (``pg_sleep`` seen in ``pg_stat_activity``: deterministic), and,
between loans, the pool's one-hop helpers and FastAPI's ``SyncConnection``
dependency. The pool has one connection (its ``autocommit`` drawn per seed), so
every loan is the same psycopg2 connection.

After every step the test reads psycopg2's own view (``raw.status``,
``raw.autocommit``) and the server's (``raw.get_transaction_status()``) and checks:

- ``raw.status`` and ``raw.autocommit`` equal a model of what psycopg2 would
  believe (:class:`Model`): a statement sent with autocommit off while the status
  is READY makes it BEGIN (unless psycopg2's own BEGIN fails, on a failed
  transaction it did not open); ``commit()``/``rollback()`` make it READY; SQL
  ``COMMIT``/``ROLLBACK`` change the server, not the status;
- the server is in a transaction only if psycopg2's status is BEGIN or the test
  itself sent an SQL ``BEGIN`` psycopg2 did not see (autocommit on);
- every loan starts clean (READY, idle, the pool's autocommit).

The same sequence runs on io="thread" (psycopg2 itself does the work) and on
io="loop": the outcomes of the steps (values or exception class names, and the
three fields above after each step) and the table's final contents must be equal.

Also here: the smallest form of the one divergence the sequences found (a
cancel request landing on the next statement, io="thread"; until it is fixed a
sequence with a cancel may fail on io="thread" now and then, on a busy machine),
and the README's FastAPI example served by uvicorn, every route in a dozen orders.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import httpx
import psycopg2.errors
import psycopg2.extensions as ext
import pytest

from pgpool_async import AsyncConnection, AsyncConnectionPool
from pgpool_async._loop.native import unavailable_reason
from pgpool_async.fastapi import sync_connection_dependency

from .conftest import _wait_off_loop, python_args, server_query
from .webserver import serving

pytestmark = pytest.mark.single_io("passes io itself")

needs_loop = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

READY, BEGIN = ext.STATUS_READY, ext.STATUS_BEGIN
IDLE, INTRANS, INERROR = (
    ext.TRANSACTION_STATUS_IDLE,
    ext.TRANSACTION_STATUS_INTRANS,
    ext.TRANSACTION_STATUS_INERROR,
)
STATUS_NAME = {READY: "READY", BEGIN: "BEGIN"}
TX_NAME = {IDLE: "IDLE", INTRANS: "INTRANS", INERROR: "INERROR", ext.TRANSACTION_STATUS_ACTIVE: "ACTIVE"}

SEEDS = range(80)
TRIO_SEEDS = range(1000, 1020)
FOUND_SEEDS = [3583, 4128, 6064, 6159]  # at 40 steps: see test_interleavings_that_found_a_defect
STEPS = 30
CHANNEL = f"interleave_{os.getpid()}"  # (NOTIFY reaches every session listening, on any test run)


class Deliberate(Exception):
    """Raised by the test to end a block or a loan with an error."""


# -- the sequences -------------------------------------------------------------------------

# name: (sql with {t} for the table, params or None, returns rows)
SQL: dict[str, tuple[str, Any, bool]] = {
    "insert": ("INSERT INTO {t} VALUES (%s)", "value", False),
    "count": ("SELECT count(*) FROM {t}", None, True),
    "rows": ("SELECT x FROM {t} ORDER BY x", None, True),
    "div0": ("SELECT 1 / 0", None, True),
    "syntax": ("SELEC 1", None, False),
    "bad_params": ("SELECT %s", (), True),
    "begin": ("BEGIN", None, False),
    "commit": ("COMMIT", None, False),
    "rollback": ("ROLLBACK", None, False),
    "listen": (f"LISTEN {CHANNEL}", None, False),
    "notify": (f"NOTIFY {CHANNEL}, 'sql'", None, False),
}
SQL_WEIGHTS = {
    "insert": 6,
    "count": 2,
    "rows": 1,
    "div0": 2,
    "syntax": 1,
    "bad_params": 1,
    "begin": 3,
    "commit": 2,
    "rollback": 2,
    "listen": 1,
    "notify": 1,
}
LOAN_OPS = {
    "sql": 34,
    "commit": 5,
    "rollback": 4,
    "raw_commit": 2,
    "raw_rollback": 2,
    "copy_in": 3,
    "copy_out": 2,
    "listen": 2,
    "notify": 3,
    "receive": 3,
    "named_cursor": 4,
    "set_session": 6,
    "cancel": 4,
    "block": 10,
}
SESSIONS: list[dict[str, Any]] = [
    {"autocommit": True},
    {"autocommit": True},
    {"autocommit": False},
    {"readonly": True},
    {"isolation_level": "SERIALIZABLE"},
    {"isolation_level": "REPEATABLE READ", "readonly": True, "deferrable": True},
]


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


def gen_loan_step(rng: random.Random, depth: int) -> dict[str, Any]:
    op = _pick(rng, LOAN_OPS)
    if op == "block" and depth >= 2:
        op = "sql"
    step: dict[str, Any] = {"op": op}
    if op == "sql":
        name = _pick(rng, SQL_WEIGHTS)
        rows = SQL[name][2]
        step["name"] = name
        step["via"] = rng.choice(
            ["fetchval", "fetchall", "fetchone", "cursor", "run_sync"]
            if rows
            else ["execute", "execute", "cursor", "executemany", "run_sync"]
        )
        step["value"] = rng.randrange(1000)
    elif op == "copy_in":
        step["values"] = [rng.randrange(1000) for _ in range(rng.randint(1, 3))]
        step["via"] = rng.choice(["copy_expert", "copy_from"])
    elif op == "copy_out":
        step["via"] = rng.choice(["copy_expert", "copy_to"])
    elif op == "listen":
        step["unlisten"] = rng.random() < 0.3
    elif op == "named_cursor":
        step["loop_statement_while_open"] = rng.random() < 0.5
    elif op == "notify":
        step["payload"] = f"p{rng.randrange(100)}"
    elif op == "set_session":
        step["settings"] = rng.choice(SESSIONS)
    elif op == "cancel":
        step["via"] = rng.choice(["fetchval", "cursor", "run_sync"])
    elif op == "block":
        step["propagate"] = rng.random() < 0.5
        step["raise"] = rng.random() < 0.3
        step["body"] = [gen_loan_step(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    return step


def gen_sequence(seed: int, n: int = STEPS) -> tuple[bool, list[dict[str, Any]]]:
    """The pool's autocommit and a sequence of ``n`` steps (and the loans' ends);
    the same for every io."""
    rng = random.Random(seed)
    autocommit = rng.random() < 0.3
    steps: list[dict[str, Any]] = []
    loan: str | None = None
    while len(steps) < n:
        if loan is None:
            if rng.random() < 0.25:
                what = rng.choice(["fetchval", "execute", "fail", "run_sync", "sync_conn", "sync_conn_fail"])
                steps.append({"op": "pool", "what": what, "value": rng.randrange(1000)})
            else:
                loan = rng.choice(["ctx", "ctx", "getconn"])
                steps.append({"op": "lend", "kind": loan})
                if rng.random() < 0.3:  # (else set_session mostly finds psycopg2's transaction open)
                    steps.append({"op": "set_session", "settings": {"autocommit": not autocommit}})
        elif rng.random() < 0.08:
            steps.append(_end(rng, loan))
            loan = None
        else:
            steps.append(gen_loan_step(rng, 0))
    if loan is not None:
        steps.append(_end(rng, loan))
    return autocommit, steps


def _end(rng: random.Random, loan: str) -> dict[str, Any]:
    if loan == "getconn":
        return {"op": "end", "how": "putconn"}
    return {"op": "end", "how": rng.choice(["commit", "commit", "error"])}


def label(step: dict[str, Any]) -> str:
    op = step["op"]
    if op == "sql":
        arg = f"({step['value']})" if step["name"] == "insert" else ""
        return f"{step['name']}{arg}@{step['via']}"
    if op == "block":
        inner = "; ".join(label(s) for s in step["body"])
        mode = "propagate" if step["propagate"] else "catch"
        return f"transaction[{mode}{', raise' if step['raise'] else ''}]{{ {inner} }}"
    extra = {k: v for k, v in step.items() if k != "op"}
    return f"{op}{extra}" if extra else op


# -- psycopg2's view, as psycopg2 would have it ---------------------------------------------


class Model:
    """What psycopg2 believes about the lent connection."""

    def __init__(self, autocommit: bool) -> None:
        # READY or BEGIN; None: either (the server decides, see sent()), to be read.
        self.status: int | None = READY
        self.autocommit = autocommit
        # The server has a transaction psycopg2 did not open: BEGIN sent as SQL in
        # autocommit mode (reset once the server is seen idle).
        self.sql_begun = False
        # set_session() gave an isolation level or deferrable: psycopg2's BEGIN says so.
        self.modes = False

    def sent(self, server_before: int) -> None:
        """A statement went out through psycopg2's rule: without autocommit and
        with the status ready, psycopg2 sends BEGIN first, which fails on a
        failed transaction (then the statement is not sent). Inside a
        transaction psycopg2 did not open, a BEGIN with an isolation level or
        DEFERRABLE fails too once a query ran or in a savepoint: the server's
        rules, which this model leaves to the observed status."""
        if self.autocommit or self.status != READY or server_before == INERROR:
            return
        self.status = None if server_before == INTRANS and self.modes else BEGIN

    def ended(self) -> None:
        """``commit()``/``rollback()``: ready, whatever happened."""
        self.status = READY


def state_of(raw: Any) -> tuple[int, int, bool]:
    """psycopg2's status, the server's transaction status, autocommit (plain reads)."""
    return raw.status, raw.get_transaction_status(), bool(raw.autocommit)


def show_state(state: tuple[int, int, bool] | None) -> str:
    if state is None:
        return "-"
    status, tx, autocommit = state
    return f"{STATUS_NAME.get(status, status)}/{TX_NAME.get(tx, tx)}{'/autocommit' if autocommit else ''}"


def outcome_of(exc: BaseException) -> str:
    return f"!{type(exc).__name__}"


# -- running one sequence --------------------------------------------------------------------


def _raw_statement(raw: Any, sql: str, params: Any) -> Any:
    with raw.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description is not None else cur.rowcount


def _raw_insert(raw: Any, table: str, value: int, fail: bool) -> int:
    with raw.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
        if fail:
            raise Deliberate
        return int(cur.rowcount)


class Run:
    """One sequence on one pool (one io)."""

    def __init__(self, pool: AsyncConnectionPool, dsn: str, table: str, app: str, io_name: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.table = table
        self.app = app
        self.io = io_name
        self.conn: AsyncConnection | None = None
        self.ctx: Any = None
        self.raw: Any = None
        self.model = Model(pool.autocommit)
        self.depth = 0  # open transaction() blocks
        self.trace: list[tuple[str, Any, tuple[int, int, bool] | None]] = []

    # -- checks

    def fail(self, message: str) -> None:
        lines = [f"io={self.io}: {message}", "steps so far (label -> outcome, status/server):"]
        lines += [f"  {lbl} -> {out!r}, {show_state(st)}" for lbl, out, st in self.trace]
        raise AssertionError("\n".join(lines))

    def check(self, where: str) -> tuple[int, int, bool]:
        model, state = self.model, state_of(self.raw)
        status, tx, autocommit = state
        if tx == IDLE:
            model.sql_begun = False
        problems = []
        if model.status is None and status in (READY, BEGIN):
            model.status = status  # (the server's rules decided: see Model.sent)
        if status != model.status:
            expected = STATUS_NAME.get(model.status, "READY or BEGIN")  # type: ignore[arg-type]
            problems.append(f"raw.status is {STATUS_NAME.get(status)}, psycopg2 would say {expected}")
        if autocommit != model.autocommit:
            problems.append(f"raw.autocommit is {autocommit}, expected {model.autocommit}")
        if status == BEGIN and autocommit:
            problems.append("status BEGIN in autocommit mode")
        if tx in (INTRANS, INERROR) and status != BEGIN and not model.sql_begun:
            problems.append(f"server {TX_NAME[tx]} but psycopg2 status READY and no SQL BEGIN was sent")
        if tx not in (IDLE, INTRANS, INERROR):
            problems.append(f"server transaction status {TX_NAME.get(tx, tx)} between steps")
        if problems:
            self.fail(f"after {where}: " + "; ".join(problems))
        return state

    def record(self, step_label: str, outcome: Any, state: tuple[int, int, bool] | None) -> None:
        self.trace.append((step_label, outcome, state))

    # -- steps

    async def run(self, steps: list[dict[str, Any]]) -> None:
        for step in steps:
            await self.step(step, propagate=False)

    async def step(self, step: dict[str, Any], propagate: bool) -> None:
        op = step["op"]
        if op in ("lend", "end", "pool"):
            await getattr(self, f"do_{op}")(step)
            return
        assert self.conn is not None
        if op == "block":
            await self.do_block(step, propagate)
            return
        before = self.raw.get_transaction_status()
        error: BaseException | None = None
        try:
            outcome = await getattr(self, f"do_{op}")(step, before)
        except AssertionError:  # (a failed check, or an assert in the pool: never an outcome)
            raise
        except Exception as exc:
            outcome, error = outcome_of(exc), exc
        text = label(step)
        self.record(text, outcome, self.check(text))
        if error is not None and propagate:
            raise error

    async def do_lend(self, step: dict[str, Any]) -> None:
        if step["kind"] == "ctx":
            self.ctx = self.pool.connection()
            self.conn = await self.ctx.__aenter__()
        else:
            self.ctx = None
            self.conn = await self.pool.getconn()
        self.raw = self.conn.raw
        self.model = Model(self.pool.autocommit)
        self.depth = 0
        state = state_of(self.raw)
        self.record(label(step), "lent", state)
        if state != (READY, IDLE, self.pool.autocommit):
            self.fail(f"a loan starts with {show_state(state)}, not READY/IDLE (pool autocommit as set)")

    async def do_end(self, step: dict[str, Any]) -> None:
        conn, ctx = self.conn, self.ctx
        assert conn is not None
        self.conn = self.ctx = None
        outcome: Any = "returned"
        try:
            if step["how"] == "putconn":
                await self.pool.putconn(conn)
            elif step["how"] == "commit":
                await ctx.__aexit__(None, None, None)
            else:
                await ctx.__aexit__(Deliberate, Deliberate(), None)
        except AssertionError:
            raise
        except Exception as exc:
            outcome = outcome_of(exc)
        assert conn.released
        self.record(label(step), outcome, None)

    async def do_pool(self, step: dict[str, Any]) -> None:
        pool, what, table = self.pool, step["what"], self.table
        outcome: Any
        try:
            if what == "fetchval":
                outcome = await pool.fetchval(f"SELECT count(*) FROM {table}")
            elif what == "execute":
                outcome = await pool.execute(f"INSERT INTO {table} VALUES (%s)", (step["value"],))
            elif what == "fail":
                outcome = await pool.fetchval("SELECT 1 / 0")
            elif what == "run_sync":
                outcome = await pool.run_sync(_raw_insert, table, step["value"], False)
            else:
                # What FastAPI does with SyncConnection(pool) for a sync endpoint:
                # the dependency lends, the endpoint runs in a thread, then commit
                # (or rollback when the endpoint raised) and return.
                dep = contextlib.asynccontextmanager(sync_connection_dependency(pool))
                async with dep() as raw:
                    outcome = await anyio.to_thread.run_sync(
                        _raw_insert, raw, table, step["value"], what == "sync_conn_fail"
                    )
        except AssertionError:
            raise
        except Exception as exc:
            outcome = outcome_of(exc)
        self.record(label(step), outcome, None)

    async def do_sql(self, step: dict[str, Any], before: int) -> Any:
        conn, model = self.conn, self.model
        assert conn is not None
        text, params, _ = SQL[step["name"]]
        sql = text.format(t=self.table)
        if params == "value":
            params = (step["value"],)
        via = step["via"]
        if step["name"] != "bad_params":  # (refused by mogrify: nothing is sent)
            model.sent(before)
            if step["name"] == "begin" and model.autocommit:
                model.sql_begun = True
        if via == "execute":
            return await conn.execute(sql, params)
        if via == "fetchval":
            return await conn.fetchval(sql, params)
        if via == "fetchall":
            return await conn.fetchall(sql, params)
        if via == "fetchone":
            return await conn.fetchone(sql, params)
        if via == "executemany":  # (the statement twice: an insert of the value and its successor)
            many = [params, (step["value"] + 1,)] if step["name"] == "insert" else [params, params]
            async with conn.cursor() as cur:
                await cur.executemany(sql, many)
                return cur.rowcount
        if via == "cursor":
            async with conn.cursor() as cur:
                await cur.execute(sql, params)
                return await cur.fetchall() if cur.description is not None else cur.rowcount
        return await conn.run_sync(_raw_statement, sql, params)

    async def do_commit(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        self.model.ended()
        return await self.conn.commit()

    async def do_rollback(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        self.model.ended()
        return await self.conn.rollback()

    async def do_raw_commit(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        self.model.ended()
        return await self.conn.run_sync(lambda raw: raw.commit())

    async def do_raw_rollback(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        self.model.ended()
        return await self.conn.run_sync(lambda raw: raw.rollback())

    async def do_copy_in(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        self.model.sent(before)
        data = io.BytesIO("".join(f"{v}\n" for v in step["values"]).encode())
        with _copy_allowed():
            if step["via"] == "copy_from":
                return await self.conn.copy_from(data, self.table)
            return await self.conn.copy_expert(f"COPY {self.table} FROM STDIN", data)

    async def do_copy_out(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        self.model.sent(before)
        out = io.BytesIO()
        with _copy_allowed():
            if step["via"] == "copy_to":
                count = await self.conn.copy_to(out, self.table)
                return count, sorted(out.getvalue().split())  # (in the table's order)
            sql = f"COPY (SELECT x FROM {self.table} ORDER BY x) TO STDOUT"
            count = await self.conn.copy_expert(sql, out)
        return count, out.getvalue()

    async def _listen_or_notify(self, call: Any, before: int) -> Any:
        """conn.listen/notify: the statement, then a commit() unless autocommit
        or inside transaction() (none when the statement failed)."""
        model = self.model
        model.sent(before)
        result = await call
        if self.depth == 0 and not model.autocommit:
            model.ended()
        return result

    async def do_listen(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        call = self.conn.unlisten(CHANNEL) if step["unlisten"] else self.conn.listen(CHANNEL)
        return await self._listen_or_notify(call, before)

    async def do_notify(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        return await self._listen_or_notify(self.conn.notify(CHANNEL, step["payload"]), before)

    async def do_receive(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        return [(n.channel, n.payload) async for n in self.conn.notifies(timeout=0.05, stop_after=5)]

    async def do_named_cursor(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        if not self.model.autocommit:  # (refused before anything is sent in autocommit mode)
            self.model.sent(before)
        async with self.conn.cursor(f"named_{len(self.trace)}") as cur:
            await cur.execute(f"SELECT x FROM {self.table} ORDER BY x")
            if not step["loop_statement_while_open"]:
                return await cur.fetchall()
            # psycopg2's transaction (DECLARE) is open: the loop takes the
            # connection for a statement, then the cursor fetches in a thread.
            first = await cur.fetchmany(2)
            count = await self.conn.fetchval(f"SELECT count(*) FROM {self.table}")
            return first, count, await cur.fetchall()

    async def do_set_session(self, step: dict[str, Any], before: int) -> Any:
        assert self.conn is not None
        settings = step["settings"]
        await self.conn.set_session(**settings)  # (psycopg2 refuses it inside its transaction)
        self.model.autocommit = settings.get("autocommit", self.model.autocommit)
        self.model.modes |= "isolation_level" in settings or "deferrable" in settings

    async def do_cancel(self, step: dict[str, Any], before: int) -> Any:
        """A statement cancelled once it runs (pg_sleep has started: deterministic)."""
        conn = self.conn
        assert conn is not None
        self.model.sent(before)
        result: Any = None
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(self._cancel_when_sleeping, scope)
            with scope:
                try:
                    if step["via"] == "fetchval":
                        result = await conn.fetchval("SELECT pg_sleep(5)")
                    elif step["via"] == "run_sync":
                        # psycopg2 code in a thread: its statement is cancelled on the server too.
                        result = await conn.run_sync(_raw_statement, "SELECT pg_sleep(5)", None)
                    else:
                        async with conn.cursor() as cur:
                            await cur.execute("SELECT pg_sleep(5)")
                            result = await cur.fetchall()
                except Exception as exc:  # (it failed at once: a failed transaction)
                    error = exc
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return "cancelled" if scope.cancelled_caught else result

    async def _cancel_when_sleeping(self, scope: anyio.CancelScope) -> None:
        query = (
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event = 'PgSleep' "
            "AND pid <> pg_backend_pid()"
        )
        with anyio.fail_after(10):
            while not await anyio.to_thread.run_sync(server_query, self.dsn, query, (self.app,)):
                await anyio.sleep(0.002)
        scope.cancel()

    async def do_block(self, step: dict[str, Any], propagate: bool) -> None:
        """``async with conn.transaction()`` around inner steps; ``propagate``: the
        first inner error leaves the block (else it is recorded and the body goes on)."""
        conn, model = self.conn, self.model
        assert conn is not None
        text = label(step)
        before = self.raw.get_transaction_status()
        if self.depth or before != IDLE:
            kind = "savepoint"
            model.sent(before)  # SAVEPOINT
        elif model.autocommit:
            kind = "explicit"
            model.sql_begun = True  # BEGIN, as SQL
        else:
            kind = "implicit"
        self.record(f"enter {text} as {kind}", None, None)
        end: int | None = None
        outcome: Any = "ok"
        error: BaseException | None = None
        try:
            async with conn.transaction():
                self.depth += 1
                self.check(f"entering {text}")
                try:
                    for inner in step["body"]:
                        await self.step(inner, step["propagate"])
                finally:
                    self.depth -= 1
                    end = self.raw.get_transaction_status()  # the exit starts from here
                if step["raise"]:
                    raise Deliberate
        except AssertionError:  # (a failed check, or an assert in the pool: never an outcome)
            raise
        except Exception as exc:
            outcome, error = outcome_of(exc), exc
        if end is not None:  # the block was entered: its exit ran
            if kind == "implicit":
                model.ended()  # commit() or rollback()
            else:
                model.sent(end)  # RELEASE / ROLLBACK TO, or COMMIT / ROLLBACK as SQL
        exit_label = f"exit {text}"
        self.record(exit_label, outcome, self.check(exit_label))
        if error is not None and propagate:
            raise error

    async def finish(self) -> list[int]:
        if self.conn is not None:
            await self.do_end({"op": "end", "how": "putconn" if self.ctx is None else "commit"})
        rows = await anyio.to_thread.run_sync(
            server_query, self.dsn, f"SELECT x FROM {self.table} ORDER BY x"
        )
        return [r[0] for r in rows]


@contextlib.contextmanager
def _copy_allowed() -> Iterator[None]:
    """COPY can't run with a wait callback: off around the COPY only, so the
    libpq guard watches every other step."""
    ext.set_wait_callback(None)
    try:
        yield
    finally:
        ext.set_wait_callback(_wait_off_loop)


@pytest.fixture
def table(dsn: str) -> Iterator[str]:
    name = f"t_interleave_{os.getpid()}"
    server_query(dsn, f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (x int)")
    yield name
    server_query(dsn, f"DROP TABLE IF EXISTS {name}")


async def run_sequence(
    autocommit: bool, steps: list[dict[str, Any]], io_name: str, dsn: str, table: str, app: str
) -> tuple[list[Any], list[int]]:
    await anyio.to_thread.run_sync(server_query, dsn, f"TRUNCATE {table}")
    async with AsyncConnectionPool(
        1, 1, dsn, io=io_name, timeout=10, autocommit=autocommit, application_name=app
    ) as pool:
        run = Run(pool, dsn, table, app, io_name)
        try:
            await run.run(steps)
            final = await run.finish()
        finally:
            if run.conn is not None:  # a check failed mid-loan
                await pool.putconn(run.conn)
    return run.trace, final


def first_difference(a: list[Any], b: list[Any]) -> str:
    for i, (x, y) in enumerate(itertools.zip_longest(a, b)):
        if x != y:
            prefix = "\n".join(f"  {lbl} -> {out!r}, {show_state(st)}" for lbl, out, st in a[:i])
            return f"step {i}: thread {x!r}\n        loop   {y!r}\nafter (thread):\n{prefix}"
    return "none"


async def check_seed(seed: int, dsn: str, table: str, app: str, n: int = STEPS) -> None:
    autocommit, steps = gen_sequence(seed, n)
    ext.set_wait_callback(_wait_off_loop)  # (no_wait_callback took it off: COPY steps do that)
    on_thread, rows_thread = await run_sequence(autocommit, steps, "thread", dsn, table, app)
    on_loop, rows_loop = await run_sequence(autocommit, steps, "loop", dsn, table, app)
    assert on_loop == on_thread, (
        f"seed {seed}: loop and thread differ at {first_difference(on_thread, on_loop)}"
    )
    assert rows_loop == rows_thread, f"seed {seed}: final rows differ: thread {rows_thread}, loop {rows_loop}"


@needs_loop
@pytest.mark.anyio
@pytest.mark.usefixtures("no_wait_callback")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("seed", SEEDS)
async def test_interleavings_agree_with_psycopg2(seed: int, dsn: str, table: str, app_name: str) -> None:
    await check_seed(seed, dsn, table, app_name)


@needs_loop
@pytest.mark.anyio
@pytest.mark.usefixtures("no_wait_callback")
@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("seed", TRIO_SEEDS)
async def test_interleavings_agree_with_psycopg2_on_trio(
    seed: int, dsn: str, table: str, app_name: str
) -> None:
    await check_seed(seed, dsn, table, app_name)


@needs_loop
@pytest.mark.anyio
@pytest.mark.usefixtures("no_wait_callback")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("seed", FOUND_SEEDS)
async def test_interleavings_that_found_a_defect(seed: int, dsn: str, table: str, app_name: str) -> None:
    """Sequences of 40 steps that found the defect of
    ``test_statement_after_sql_begin_fails_to_parse_as_with_psycopg2`` (kept as found)."""
    await check_seed(seed, dsn, table, app_name, n=40)


@needs_loop
@pytest.mark.anyio
@pytest.mark.parametrize("failed", [False, True], ids=["in-transaction", "failed-transaction"])
@pytest.mark.parametrize("statement", ["SELEC 1", "SELECT 1 +"])
async def test_statement_after_sql_begin_fails_to_parse_as_with_psycopg2(
    dsn: str, statement: str, failed: bool
) -> None:
    """The smallest form of seeds 3583, 4128, 6064 and 6159 (40 steps): a
    transaction the server has and psycopg2 does not know (BEGIN sent as SQL in
    autocommit mode, then autocommit off: allowed, psycopg2's status is READY),
    then a statement that does not parse.

    psycopg2 sends its BEGIN alone: in a good transaction it only warns (one is
    in progress), so its status is BEGIN when the statement fails, and
    ``commit()`` then ends the failed transaction; in a failed one the BEGIN
    fails (InFailedSqlTransaction) and the statement is never sent. The loop path
    sends ``BEGIN;<statement>`` in one packet, which fails to parse as a whole:
    the error is always the statement's, with the BEGIN in it (``LINE 1:
    BEGIN;SELEC 1``), and the status stays READY, so ``commit()`` sends nothing,
    the transaction stays failed and the next statement fails."""
    seen: dict[str, list[Any]] = {}
    for io_name in ("thread", "loop"):
        async with AsyncConnectionPool(1, 1, dsn, io=io_name, autocommit=True) as pool:
            conn = await pool.getconn()
            raw = conn.raw
            await conn.execute("BEGIN")  # as SQL: psycopg2's status stays READY
            if failed:
                with pytest.raises(psycopg2.errors.DivisionByZero):
                    await conn.execute("SELECT 1 / 0")
            await conn.set_session(autocommit=False)
            steps: list[Any] = []
            try:
                await conn.execute(statement)
            except psycopg2.Error as exc:
                steps.append(f"{type(exc).__name__}: {exc.pgerror}")
            steps.append(show_state(state_of(raw)))
            await conn.commit()
            steps.append(show_state(state_of(raw)))
            try:
                steps.append(await conn.fetchval("SELECT 1"))
            except psycopg2.Error as exc:
                steps.append(outcome_of(exc))
            await pool.putconn(conn)
        seen[io_name] = steps
    if failed:  # psycopg2 itself
        assert seen["thread"][0].startswith("InFailedSqlTransaction")
        assert seen["thread"][1:] == ["READY/INERROR", "READY/INERROR", "!InFailedSqlTransaction"]
    else:
        assert seen["thread"][0].startswith("SyntaxError")
        assert seen["thread"][1:] == ["BEGIN/INERROR", "READY/IDLE", 1]
    assert seen["loop"] == seen["thread"], f"\nthread {seen['thread']}\nloop   {seen['loop']}"


@needs_loop
@pytest.mark.anyio
@pytest.mark.parametrize("io_name", ["loop", "thread"])
async def test_a_cancel_request_never_cancels_the_next_statement(dsn: str, io_name: str) -> None:
    """The smallest form of a divergence the interleavings found (io="thread"
    only): a statement is cancelled, then the next one fails with QueryCanceled
    ("canceling statement due to user request") where io="loop" returns its value.

    Found as ``lend (pool autocommit); cancel{'via': 'fetchval'}; BEGIN;
    run_sync(SELECT pg_sleep(0.01)) -> QueryCanceled`` (trio seeds 5059, 5197 at
    40 steps, a few times in a few hundred runs on a loaded machine). The
    statement ended cancelled while the pool's cancel request was still on its
    way, and the thread path hands the connection on as soon as a statement
    ends with QueryCanceled (taking it for the request's doing); the loop path
    first waits until the request has reached the server. Here the statement
    ends by the server's ``statement_timeout`` just after the caller's deadline
    (within the pool's 10 ms delay before it sends the cancel): then the request
    lands on the next statement nearly every time."""
    async with AsyncConnectionPool(1, 1, dsn, io=io_name, autocommit=True) as pool:
        async with pool.connection() as conn:
            await conn.execute("SET statement_timeout = '200ms'")
            hit = []
            for attempt in range(8):
                with anyio.move_on_after(0.196), contextlib.suppress(psycopg2.errors.QueryCanceled):
                    await conn.fetchval("SELECT pg_sleep(5)")  # the deadline, or the timeout
                try:
                    await conn.fetchval("SELECT 1 FROM pg_sleep(0.05)")
                except psycopg2.errors.QueryCanceled as exc:
                    hit.append(f"attempt {attempt}: {str(exc).strip()}")
    assert not hit, f"io={io_name}: the next statement was cancelled: {hit}"


# -- the README's FastAPI example, every route in several orders ---------------------------


class Bank:
    """What examples/fastapi_app.py should answer, for the accounts of one order."""

    def __init__(self) -> None:
        self.balances: dict[int, int] = {}

    def expect(self, route: str, a: int, b: int) -> tuple[int, Any]:
        """(status code, JSON body or None) for ``route`` on accounts ``a``, ``b``;
        updates the model."""
        bal = self.balances
        if route == "open":
            bal[a] = 100
            return 200, {"id": a, "balance": 100}
        if route == "balance":
            return (200, {"id": a, "balance": bal[a]}) if a in bal else (404, {"detail": f"no account {a}"})
        if route in ("transfer", "overdraft"):
            amount = 30 if route == "transfer" else 10**6
            if a in bal and bal[a] < amount:
                return 409, {"detail": "insufficient funds"}  # the CHECK fails at the first UPDATE
            if a not in bal or b not in bal:
                return 404, {"detail": "no such account"}
            bal[a] -= amount
            bal[b] += amount
            return 200, {"ok": True, "src": a, "dst": b, "amount": amount}
        if route == "audit":
            return (200, None) if a in bal else (500, None)  # the deferred FK fails at COMMIT
        if route == "audit_unknown":
            return 500, None  # meant to fail: never a 2xx
        return 200, None  # report, report/sync, export


ROUTES = ["open", "open_b", "balance", "transfer", "overdraft", "audit", "audit_unknown"]
ROUTES += ["report", "report_sync", "export", "balance_b"]


def _request(client: httpx.Client, route: str, a: int, b: int) -> httpx.Response:
    if route in ("open", "open_b"):
        return client.put(f"/accounts/{a if route == 'open' else b}", params={"balance": 100})
    if route in ("balance", "balance_b"):
        return client.get(f"/accounts/{a if route == 'balance' else b}")
    if route in ("transfer", "overdraft"):
        amount = 30 if route == "transfer" else 10**6
        return client.post("/transfers", json={"src": a, "dst": b, "amount": amount})
    if route in ("audit", "audit_unknown"):
        return client.post("/audit", json={"account": a if route == "audit" else 987_654_321, "note": route})
    path = {"report": "/report", "report_sync": "/report/sync", "export": "/export.csv"}[route]
    return client.get(path)


@pytest.fixture(params=["loop", "thread"])
def fastapi_server(request: pytest.FixtureRequest, dsn: str) -> Iterator[str]:
    server_query(dsn, "DROP TABLE IF EXISTS audit, accounts")  # (as test_examples_fastapi.py does)
    args = python_args(["examples/fastapi_app.py"], request.param)
    with serving(sys.executable, args, dsn) as (base, _):
        yield base


def test_fastapi_example_every_route_in_many_orders(fastapi_server: str, dsn: str) -> None:
    """Twelve seeded orders of every route of the README's example (its two
    SyncConnection and run_sync reports, the COPY export and the one-hop read
    among them): each answer is the one the bank's rules give, the only 5xx are
    the audits meant to fail at COMMIT, and /health answers 200 after each."""
    rng = random.Random(7)
    with httpx.Client(base_url=fastapi_server, timeout=30) as client:
        for order in range(12):
            a, b = 70_000 + 2 * order, 70_001 + 2 * order
            routes = list(ROUTES)
            rng.shuffle(routes)
            bank = Bank()
            for route in routes:
                if route in ("open_b", "balance_b"):
                    code, body = bank.expect(route.removesuffix("_b"), b, a)
                else:
                    code, body = bank.expect(route, a, b)
                answer = _request(client, route, a, b)
                where = f"order {order} {routes}: {route}"
                assert answer.status_code == code, f"{where}: {answer.status_code} {answer.text}"
                if body is not None:
                    assert answer.json() == body, where
                if route == "export":
                    lines = set(answer.text.splitlines())
                    assert {f"{k},{v}" for k, v in bank.balances.items()} <= lines, where
                if route.startswith("report"):
                    assert set(answer.json()) == {"accounts", "total"}, where
                health = client.get("/health")
                assert health.status_code == 200, f"{where}: /health {health.status_code} {health.text}"
            got = server_query(dsn, "SELECT id, balance FROM accounts WHERE id IN (%s, %s)", (a, b))
            assert dict(got) == bank.balances, f"order {order} {routes}"
            notes = server_query(dsn, "SELECT note FROM audit WHERE account = %s", (a,))
            assert notes == ([("audit",)] if routes.index("audit") > routes.index("open") else [])
