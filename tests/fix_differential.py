"""The machinery of ``test_differential.py``: steps, three drivers, outcomes, the report.

A case is data: setup SQL and a list of :class:`Step`. Each step is applied the
same way to three drivers:

- :class:`Psycopg2Driver`, the oracle: a psycopg2 connection and cursors used
  directly, every call in a worker thread (``anyio.to_thread.run_sync``);
- :class:`PoolDriver` with ``io="thread"`` and with ``io="loop"``: the same calls
  through ``AsyncConnectionPool``'s public API.

Each step's outcome is a string: the value with its Python types, or the
exception's class, ``pgcode``, ``pgerror`` and ``diag``; for a cursor step,
the cursor's ``rowcount``, ``statusmessage``, ``description``, ``query``,
``rownumber`` and ``lastrowid`` after it. The three lists must be equal.

Conventions: ``{t}`` in SQL (and in a COPY table name) is the case's table;
``run_sync`` functions take ``(raw_connection, table)``. The oracle emulates
the pool's documented extras with psycopg2 alone: ``transaction()`` blocks
(``SAVEPOINT pgpool_sp_N``, ``BEGIN`` in autocommit), the one-hop helpers
(``pool.execute/fetch*``: the statement committed whatever it returned, then
``ProgrammingError`` if it returned no rows) on a second connection, and
``async with pool.connection()``'s commit on a clean exit.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import anyio
import anyio.to_thread
import psycopg2
import psycopg2.extensions

from pgpool_async import AsyncConnectionPool, CommitOutcomeUnknown, TransactionFailed
from pgpool_async._thread.blocking import NO_ROWS_COMMITTED

from .conftest import server_query

NOARG = object()  # fetchmany() called without a size

# The DB-API family of an exception: a "loose" step compares this only.
_FAMILIES = (
    psycopg2.OperationalError,
    psycopg2.ProgrammingError,
    psycopg2.IntegrityError,
    psycopg2.DataError,
    psycopg2.InternalError,
    psycopg2.NotSupportedError,
    psycopg2.InterfaceError,
    psycopg2.DatabaseError,
    psycopg2.Error,
)


@dataclass(frozen=True)
class Step:
    """One operation, applied identically to the three drivers."""

    op: str
    args: tuple[Any, ...] = ()
    kw: tuple[tuple[str, Any], ...] = ()
    cur: str = "c"  # which cursor (cursor steps)
    loose: bool = False  # an exception: compare its DB-API family only
    label: str | None = None

    def describe(self) -> str:
        if self.label is not None:
            return self.label
        shown = [_short(_show(a), 70) for a in self.args if a is not NOARG]
        shown += [f"{k}={_short(repr(v), 40)}" for k, v in self.kw]
        where = f"{self.cur}." if self.op.startswith("cur_") and self.cur != "c" else ""
        return f"{where}{self.op}({', '.join(shown)})"


@dataclass
class Case:
    name: str
    steps: list[Step]
    setup: str = ""  # SQL run on a separate connection before each driver ({t}: the table)
    schema: str = ""  # SQL run once before the three (types, functions: their OIDs stay the same)
    teardown: str = (
        "DROP TABLE IF EXISTS {t}, {t}_p CASCADE; DROP ROUTINE IF EXISTS {t}_f CASCADE; "
        "DROP TYPE IF EXISTS {t}_e, {t}_ty CASCADE; DROP DOMAIN IF EXISTS {t}_d CASCADE"
    )
    tables: tuple[str, ...] = ()  # tables whose rows are compared afterwards
    autocommit: bool = False  # the pools' autocommit option, the oracle's autocommit
    connect: dict[str, Any] = field(default_factory=dict)  # more psycopg2.connect kwargs
    global_casters: tuple[Any, ...] = ()  # registered process-wide during the case
    copy: bool = False  # needs the wait callback off (COPY)


def _show(arg: Any) -> str:
    name = getattr(arg, "__name__", None)
    return name if callable(arg) and name is not None else repr(arg)


# -- outcomes ------------------------------------------------------------------------


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _digest(text: str) -> str:
    """A long outcome: its head and a hash (compared in full through the hash)."""
    if len(text) <= 1500:
        return text
    h = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{text[:600]} ...<{len(text)} chars, sha1 {h}>"


def typed(value: Any) -> str:
    """``value`` with the Python type of every part of it."""
    kind = type(value)
    if value is None:
        return "None"
    if kind is memoryview:
        return f"memoryview:{bytes(value)!r}"
    if kind in (bool, int, float, str, bytes, Decimal):
        return f"{kind.__name__}:{value!r}"
    if kind is tuple:
        return "(" + ", ".join(typed(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if kind is list:
        return "[" + ", ".join(typed(v) for v in value) + "]"
    if kind is dict:
        return "{" + ", ".join(f"{typed(k)}: {typed(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):  # a namedtuple row
        return f"{kind.__name__}(" + ", ".join(typed(v) for v in value) + ")"
    if isinstance(value, dict):  # RealDictRow
        return f"{kind.__name__}{{" + ", ".join(f"{typed(k)}: {typed(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):  # DictRow
        return f"{kind.__name__}[" + ", ".join(typed(v) for v in value) + "]"
    return f"{kind.__name__}:{value!r}"


def family(exc: BaseException) -> str:
    for cls in _FAMILIES:
        if isinstance(exc, cls):
            return f"psycopg2.{cls.__name__}"
    return type(exc).__name__


def raised(exc: BaseException, loose: bool = False) -> str:
    if loose:
        return f"raised {family(exc)} (family)"
    cls = type(exc)
    if cls.__module__.startswith("pgpool_async"):
        # The pool's own errors (its documented contract, emulated for the oracle):
        # their prose is the pool's, so the class is compared.
        return f"raised {cls.__module__}.{cls.__qualname__} (compared by class)"
    parts = [f"raised {cls.__module__}.{cls.__qualname__}: {str(exc)!r}"]
    if isinstance(exc, psycopg2.Error):
        parts.append(f"pgcode={exc.pgcode!r} pgerror={exc.pgerror!r}")
        diag = exc.diag
        parts.append(
            "diag("
            + " ".join(
                f"{name}={getattr(diag, name)!r}"
                for name in (
                    "sqlstate",
                    "message_primary",
                    "message_detail",
                    "message_hint",
                    "statement_position",
                    "context",
                )
            )
            + ")"
        )
    return " ".join(parts)


def _attr(obj: Any, name: str) -> str:
    try:
        value = getattr(obj, name)
    except Exception as exc:
        return f"<{type(exc).__name__}: {exc}>"
    if name == "description" and value is not None:
        return repr([tuple(col) for col in value])
    return repr(value)


def cursor_state(cur: Any) -> str:
    return " ".join(
        f"{name}={_attr(cur, name)}"
        for name in ("rowcount", "statusmessage", "rownumber", "lastrowid", "description", "query")
    )


def psycopg2_view(raw: Any, table: str = "") -> str:
    """psycopg2's own view of its connection (run where psycopg2 code may run)."""
    fields: list[tuple[str, Callable[[], Any]]] = [
        ("closed", lambda: raw.closed),
        ("status", lambda: raw.status),
        ("tx_status", raw.get_transaction_status),
        ("autocommit", lambda: raw.autocommit),
        ("isolation_level", lambda: raw.isolation_level),
        ("readonly", lambda: raw.readonly),
        ("deferrable", lambda: raw.deferrable),
        ("encoding", lambda: raw.encoding),
        ("notices", lambda: list(raw.notices)),
        ("notifies", lambda: [(n.channel, n.payload) for n in raw.notifies]),
    ]
    out = []
    for name, get in fields:
        try:
            out.append(f"{name}={get()!r}")
        except Exception as exc:
            out.append(f"{name}=<{type(exc).__name__}: {exc}>")
    return " ".join(out)


def _terminate(dsn: str, pid: int) -> None:
    """End backend ``pid`` from another connection, and wait until it is gone."""
    server_query(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 10
    while server_query(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
        assert time.monotonic() < deadline, f"backend {pid} still there"
        time.sleep(0.01)


def _fix(value: Any, table: str) -> Any:
    return value.replace("{t}", table) if isinstance(value, str) else value


# -- the oracle: psycopg2 itself, in worker threads ------------------------------------


class Psycopg2Driver:
    label = "psycopg2"

    def __init__(self, dsn: str, case: Case, table: str) -> None:
        self.dsn, self.case, self.table = dsn, case, table
        self.raw: Any = None
        self.helper: Any = None  # the one-hop helpers' connection
        self.cursors: dict[str, Any] = {}
        self.txs: list[tuple[str, str]] = []
        self._key = "c"

    async def run(self, steps: list[Step]) -> list[tuple[str, str]]:
        self.raw = await anyio.to_thread.run_sync(self._connect)
        try:
            outcomes = [(s.describe(), await anyio.to_thread.run_sync(self._step, s)) for s in steps]
            outcomes.append(("psycopg2's view (run_sync)", await anyio.to_thread.run_sync(self._view)))
            outcomes.append(("connection block exit", await anyio.to_thread.run_sync(self._exit)))
        finally:
            await anyio.to_thread.run_sync(self._close)
        return outcomes

    def _connect(self) -> Any:
        raw = psycopg2.connect(self.dsn, **self.case.connect)
        raw.autocommit = self.case.autocommit
        return raw

    def _view(self) -> str:
        return psycopg2_view(self.raw)

    def _exit(self) -> str:
        # async with pool.connection(): a clean exit commits (psycopg2's `with conn:`),
        # with the pool's documented rules: a failed transaction is rolled back and
        # raises TransactionFailed; a connection lost during the COMMIT raises
        # CommitOutcomeUnknown.
        raw = self.raw
        try:
            if raw.closed:
                return "ok"
            status = raw.get_transaction_status()
            if status == psycopg2.extensions.TRANSACTION_STATUS_INERROR:
                raw.rollback()
                raise TransactionFailed("the transaction failed earlier")
            if status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                self._commit()
        except Exception as exc:
            return raised(exc)
        return "ok"

    def _commit(self, sql: str | None = None) -> None:
        try:
            if sql is None:
                self.raw.commit()
            else:
                self._sql(sql)
        except psycopg2.OperationalError as exc:
            if self.raw.closed:
                raise CommitOutcomeUnknown("the connection was lost during COMMIT") from exc
            raise

    def _close(self) -> None:
        for conn in (self.raw, self.helper):
            if conn is not None:
                conn.close()

    def _cursor(self, key: str) -> Any:
        if key not in self.cursors:
            self.cursors[key] = self.raw.cursor()
        return self.cursors[key]

    def _step(self, step: Step) -> str:
        cur = self._cursor(step.cur) if step.op.startswith("cur_") and step.op != "cur_open" else None
        self._key = step.cur
        try:
            value = getattr(self, "op_" + step.op)(
                cur, *[_fix(a, self.table) for a in step.args], **dict(step.kw)
            )
            out = "ok " + typed(value)
        except Exception as exc:
            out = raised(exc, step.loose)
        if cur is not None or step.op == "cur_open":
            out += " | " + cursor_state(self.cursors[step.cur])
        return _digest(out)

    # connection
    def op_execute(self, _c: Any, sql: Any, params: Any = None) -> Any:
        with self.raw.cursor() as cur:
            cur.execute(sql, params)
            return cur.rowcount

    def op_fetchone(self, _c: Any, sql: Any, params: Any = None) -> Any:
        with self.raw.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def op_fetchall(self, _c: Any, sql: Any, params: Any = None) -> Any:
        with self.raw.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def op_fetchval(self, _c: Any, sql: Any, params: Any = None) -> Any:
        row = self.op_fetchone(None, sql, params)
        if row is None:
            return None
        return next(iter(row.values())) if isinstance(row, dict) else row[0]

    def op_commit(self, _c: Any) -> None:
        self._commit()

    def op_rollback(self, _c: Any) -> None:
        self.raw.rollback()

    def op_set_session(self, _c: Any, **settings: Any) -> None:
        self.raw.set_session(**settings)

    def op_autocommit(self, _c: Any, value: bool) -> None:
        self.raw.autocommit = value

    def op_run_sync(self, _c: Any, fn: Callable[..., Any]) -> Any:
        return fn(self.raw, self.table)

    def op_register(self, _c: Any, caster: Any) -> None:
        psycopg2.extensions.register_type(caster, self.raw)

    def op_autocommit_view(self, _c: Any) -> Any:
        return (self.raw.autocommit, bool(self.raw.closed))

    def op_terminate(self, _c: Any) -> None:
        _terminate(self.dsn, self.raw.get_backend_pid())

    # transaction() blocks, as the pool documents them
    def _sql(self, sql: str) -> None:
        with self.raw.cursor() as cur:
            cur.execute(sql)

    def op_tx_enter(self, _c: Any) -> None:
        depth = len(self.txs)
        if depth or self.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            self._sql(f"SAVEPOINT pgpool_sp_{depth + 1}")
            self.txs.append(("savepoint", f"pgpool_sp_{depth + 1}"))
        elif self.raw.autocommit:
            self._sql("BEGIN")
            self.txs.append(("explicit", ""))
        else:
            self.txs.append(("implicit", ""))

    def op_tx_exit(self, _c: Any, ok: bool) -> None:
        kind, name = self.txs.pop()
        if ok and self.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR:
            # The pool's rule: a block ending normally on a failed transaction is undone.
            self.txs.append((kind, name))
            self.op_tx_exit(None, False)
            raise TransactionFailed("the transaction failed earlier")
        if kind == "savepoint":
            if ok:
                self._sql(f"RELEASE SAVEPOINT {name}")
            else:
                self._sql(f"ROLLBACK TO SAVEPOINT {name}")
                self._sql(f"RELEASE SAVEPOINT {name}")
        elif kind == "explicit" and ok:
            self._commit("COMMIT")
        elif kind == "explicit":
            self._sql("ROLLBACK")
        elif ok:
            self._commit()
        else:
            self.raw.rollback()

    # the one-hop helpers, on a second connection
    def _helper_conn(self) -> Any:
        if self.helper is None:
            self.helper = self._connect()
        return self.helper

    def _one_hop(self, kind: str, sql: Any, params: Any) -> Any:
        conn = self._helper_conn()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                conn.commit()  # the statement is committed whatever it returned
                if kind == "execute":
                    return cur.rowcount
                if cur.description is None:
                    raise psycopg2.ProgrammingError(NO_ROWS_COMMITTED)
                if kind == "fetchall":
                    return cur.fetchall()
                row = cur.fetchone()
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise
        if kind == "fetchval" and row is not None:
            return next(iter(row.values())) if isinstance(row, dict) else row[0]
        return row

    def op_pool_execute(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return self._one_hop("execute", sql, params)

    def op_pool_fetchone(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return self._one_hop("fetchone", sql, params)

    def op_pool_fetchall(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return self._one_hop("fetchall", sql, params)

    def op_pool_fetchval(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return self._one_hop("fetchval", sql, params)

    def op_pool_run_sync(self, _c: Any, fn: Callable[..., Any]) -> Any:
        conn = self._helper_conn()
        try:
            value = fn(conn, self.table)
            conn.commit()
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise
        return value

    # cursors
    def op_cur_open(self, _c: Any, name: str | None = None, **kwargs: Any) -> None:
        self.cursors[self._key] = self.raw.cursor(name, **kwargs)

    def op_cur_execute(self, cur: Any, sql: Any, params: Any = None) -> None:
        cur.execute(sql, params)

    def op_cur_executemany(self, cur: Any, sql: Any, seq: Any) -> None:
        cur.executemany(sql, seq() if callable(seq) else seq)

    def op_cur_fetchone(self, cur: Any) -> Any:
        return cur.fetchone()

    def op_cur_fetchmany(self, cur: Any, size: Any = NOARG) -> Any:
        return cur.fetchmany() if size is NOARG else cur.fetchmany(size)

    def op_cur_fetchall(self, cur: Any) -> Any:
        return cur.fetchall()

    def op_cur_iter(self, cur: Any) -> Any:
        return list(cur)

    def op_cur_set(self, cur: Any, name: str, value: Any) -> None:
        setattr(cur, name, value)

    def op_cur_scroll(self, cur: Any, value: int, mode: str = "relative") -> Any:
        return cur.scroll(value, mode)

    def op_cur_callproc(self, cur: Any, name: str, params: Any = None) -> Any:
        return cur.callproc(name, params)

    def op_cur_mogrify(self, cur: Any, sql: Any, params: Any = None) -> Any:
        return cur.mogrify(sql, params)

    def op_cur_close(self, cur: Any) -> None:
        cur.close()

    def op_cur_register(self, cur: Any, caster: Any) -> None:
        psycopg2.extensions.register_type(caster, cur)

    # COPY
    def op_copy_expert(self, _c: Any, sql: str, data: bytes | None = None) -> Any:
        f = io.BytesIO(data if data is not None else b"")
        with self.raw.cursor() as cur:
            cur.copy_expert(sql, f)
            return (cur.rowcount, f.getvalue() if data is None else None)

    def op_copy_from(self, _c: Any, data: bytes, table: str, **kwargs: Any) -> Any:
        with self.raw.cursor() as cur:
            cur.copy_from(io.BytesIO(data), table, **kwargs)
            return cur.rowcount

    def op_copy_to(self, _c: Any, table: str, **kwargs: Any) -> Any:
        f = io.BytesIO()
        with self.raw.cursor() as cur:
            cur.copy_to(f, table, **kwargs)
            return (cur.rowcount, f.getvalue())


# -- the pool, with io="thread" or io="loop" -------------------------------------------


class PoolDriver:
    def __init__(self, dsn: str, case: Case, table: str, io: str) -> None:
        self.dsn, self.case, self.table, self.io = dsn, case, table, io
        self.label = f"io={io}"
        self.pool: Any = None
        self.conn: Any = None
        self.cursors: dict[str, Any] = {}
        self.txs: list[Any] = []
        self._key = "c"

    async def run(self, steps: list[Step]) -> list[tuple[str, str]]:
        outcomes: list[tuple[str, str]] = []
        async with AsyncConnectionPool(
            1, 2, self.dsn, io=self.io, autocommit=self.case.autocommit, timeout=10, **self.case.connect
        ) as pool:
            self.pool = pool
            block = pool.connection()
            self.conn = await block.__aenter__()
            try:
                for step in steps:
                    outcomes.append((step.describe(), await self._step(step)))
                try:
                    view = await self.conn.run_sync(psycopg2_view)
                except Exception as exc:
                    view = raised(exc)
                outcomes.append(("psycopg2's view (run_sync)", view))
            except BaseException as exc:
                await block.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            try:
                await block.__aexit__(None, None, None)
                outcomes.append(("connection block exit", "ok"))
            except Exception as exc:
                outcomes.append(("connection block exit", raised(exc)))
        return outcomes

    async def _step(self, step: Step) -> str:
        cur = None
        if step.op.startswith("cur_") and step.op != "cur_open":
            if step.cur not in self.cursors:
                self.cursors[step.cur] = self.conn.cursor()
            cur = self.cursors[step.cur]
        self._key = step.cur
        try:
            args = [_fix(a, self.table) for a in step.args]
            value = await getattr(self, "op_" + step.op)(cur, *args, **dict(step.kw))
            out = "ok " + typed(value)
        except Exception as exc:
            out = raised(exc, step.loose)
        if cur is not None or step.op == "cur_open":
            out += " | " + cursor_state(self.cursors[step.cur])
        return _digest(out)

    # connection
    async def op_execute(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.conn.execute(sql, params)

    async def op_fetchone(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.conn.fetchone(sql, params)

    async def op_fetchall(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.conn.fetchall(sql, params)

    async def op_fetchval(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.conn.fetchval(sql, params)

    async def op_commit(self, _c: Any) -> None:
        await self.conn.commit()

    async def op_rollback(self, _c: Any) -> None:
        await self.conn.rollback()

    async def op_set_session(self, _c: Any, **settings: Any) -> None:
        await self.conn.set_session(**settings)

    async def op_autocommit(self, _c: Any, value: bool) -> None:
        await self.conn.set_session(autocommit=value)

    async def op_run_sync(self, _c: Any, fn: Callable[..., Any]) -> Any:
        return await self.conn.run_sync(fn, self.table)

    async def op_register(self, _c: Any, caster: Any) -> None:
        psycopg2.extensions.register_type(caster, self.conn.raw)  # no I/O

    async def op_autocommit_view(self, _c: Any) -> Any:
        return (self.conn.autocommit, self.conn.closed)

    async def op_terminate(self, _c: Any) -> None:
        pid = self.conn.raw.get_backend_pid()  # (no I/O)
        await anyio.to_thread.run_sync(_terminate, self.dsn, pid)

    async def op_tx_enter(self, _c: Any) -> None:
        tx = self.conn.transaction()
        self.txs.append(tx)  # (exited whatever happens, as `async with` would)
        await tx.__aenter__()

    async def op_tx_exit(self, _c: Any, ok: bool) -> None:
        tx = self.txs.pop()
        if ok:
            await tx.__aexit__(None, None, None)
        else:
            exc = RuntimeError("the block's body failed")
            await tx.__aexit__(RuntimeError, exc, None)

    async def op_pool_execute(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.pool.execute(sql, params)

    async def op_pool_fetchone(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.pool.fetchone(sql, params)

    async def op_pool_fetchall(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.pool.fetchall(sql, params)

    async def op_pool_fetchval(self, _c: Any, sql: Any, params: Any = None) -> Any:
        return await self.pool.fetchval(sql, params)

    async def op_pool_run_sync(self, _c: Any, fn: Callable[..., Any]) -> Any:
        return await self.pool.run_sync(fn, self.table)

    # cursors
    async def op_cur_open(self, _c: Any, name: str | None = None, **kwargs: Any) -> None:
        self.cursors[self._key] = self.conn.cursor(name, **kwargs)

    async def op_cur_execute(self, cur: Any, sql: Any, params: Any = None) -> None:
        await cur.execute(sql, params)

    async def op_cur_executemany(self, cur: Any, sql: Any, seq: Any) -> None:
        await cur.executemany(sql, seq() if callable(seq) else seq)

    async def op_cur_fetchone(self, cur: Any) -> Any:
        return await cur.fetchone()

    async def op_cur_fetchmany(self, cur: Any, size: Any = NOARG) -> Any:
        return await (cur.fetchmany() if size is NOARG else cur.fetchmany(size))

    async def op_cur_fetchall(self, cur: Any) -> Any:
        return await cur.fetchall()

    async def op_cur_iter(self, cur: Any) -> Any:
        return [row async for row in cur]

    async def op_cur_set(self, cur: Any, name: str, value: Any) -> None:
        setattr(cur, name, value)

    async def op_cur_scroll(self, cur: Any, value: int, mode: str = "relative") -> Any:
        result = cur.scroll(value, mode)  # (AttributeError if AsyncCursor has none)
        return await result if inspect.isawaitable(result) else result

    async def op_cur_callproc(self, cur: Any, name: str, params: Any = None) -> Any:
        return await cur.callproc(name, params)

    async def op_cur_mogrify(self, cur: Any, sql: Any, params: Any = None) -> Any:
        return cur.mogrify(sql, params)

    async def op_cur_close(self, cur: Any) -> None:
        await cur.close()

    async def op_cur_register(self, cur: Any, caster: Any) -> None:
        psycopg2.extensions.register_type(caster, cur.raw)  # no I/O

    # COPY
    async def op_copy_expert(self, _c: Any, sql: str, data: bytes | None = None) -> Any:
        f = io.BytesIO(data if data is not None else b"")
        count = await self.conn.copy_expert(sql, f)
        return (count, f.getvalue() if data is None else None)

    async def op_copy_from(self, _c: Any, data: bytes, table: str, **kwargs: Any) -> Any:
        return await self.conn.copy_from(io.BytesIO(data), table, **kwargs)

    async def op_copy_to(self, _c: Any, table: str, **kwargs: Any) -> Any:
        f = io.BytesIO()
        count = await self.conn.copy_to(f, table, **kwargs)
        return (count, f.getvalue())


# -- a case, three ways --------------------------------------------------------------


def _persisted(dsn: str, tables: tuple[str, ...]) -> str:
    """The rows each table holds now, as text, seen from a separate connection."""
    out = []
    for table in tables:
        try:
            rows = server_query(dsn, f"SELECT r::text FROM {table} r ORDER BY 1")
            out.append(f"{table}: {[r[0] for r in rows]!r}")
        except psycopg2.Error as exc:
            out.append(f"{table}: {raised(exc)}")
    return _digest(" ; ".join(out))


def _sql(dsn: str, sql: str) -> None:
    if sql.strip():
        server_query(dsn, sql)


async def run_three_ways(dsn: str, case: Case, table: str) -> dict[str, list[tuple[str, str]]]:
    """The case's outcomes per driver: psycopg2, io=thread, io=loop."""
    registries = (
        psycopg2.extensions.string_types,
        psycopg2.extensions.binary_types,
        psycopg2.extensions.adapters,
    )
    saved = [dict(r) for r in registries]
    for caster in case.global_casters:
        psycopg2.extensions.register_type(caster)
    results: dict[str, list[tuple[str, str]]] = {}
    tables = tuple(t.replace("{t}", table) for t in case.tables)
    reset = ("DROP TABLE IF EXISTS {t}, {t}_p CASCADE;\n" + case.setup).replace("{t}", table)
    drivers: list[Callable[[], Any]] = [
        functools.partial(Psycopg2Driver, dsn, case, table),
        functools.partial(PoolDriver, dsn, case, table, "thread"),
        functools.partial(PoolDriver, dsn, case, table, "loop"),
    ]
    try:
        await anyio.to_thread.run_sync(_sql, dsn, (case.teardown + ";\n" + case.schema).replace("{t}", table))
        for make in drivers:
            await anyio.to_thread.run_sync(_sql, dsn, reset)
            driver = make()
            outcomes = await driver.run(case.steps)
            if tables:
                outcomes.append(("rows persisted", await anyio.to_thread.run_sync(_persisted, dsn, tables)))
            results[driver.label] = outcomes
    finally:
        for registry, before in zip(registries, saved, strict=True):
            registry.clear()
            registry.update(before)
        await anyio.to_thread.run_sync(_sql, dsn, case.teardown.replace("{t}", table))
    return results


def report(case: Case, results: dict[str, list[tuple[str, str]]]) -> str | None:
    """None when the three drivers agree; else every step with its outcomes,
    the differing ones side by side."""
    labels = list(results)
    oracle = results[labels[0]]
    if all(results[label] == oracle for label in labels[1:]):
        return None
    lines = [
        f"case {case.name!r}: the drivers disagree ('=' : same as psycopg2; steps marked '!' differ)",
    ]
    width = max(len(label) for label in labels)
    length = max(len(results[label]) for label in labels)
    for i in range(length):
        row = [results[label][i] if i < len(results[label]) else ("?", "<missing>") for label in labels]
        desc = row[0][0]
        first = row[0][1]
        if all(r[1] == first for r in row):
            lines.append(f"   {i + 1:2d} {_short(desc, 90)}  ->  {_short(first, 300)}")
            continue
        lines.append(f" ! {i + 1:2d} {_short(desc, 200)}")
        for label, (_, out) in zip(labels, row, strict=True):
            shown = "=" if label != labels[0] and out == first else _short(out, 1200)
            lines.append(f"        {label:<{width}} : {shown}")
    return "\n".join(lines)
