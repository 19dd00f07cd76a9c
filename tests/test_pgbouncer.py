"""Behind a real PgBouncer (Debian's ``pgbouncer``), in transaction and session mode.

Started by the tests (:mod:`pgpool_async.testing.pgbouncer`) in front of the
session's throwaway server. Without pgbouncer installed these tests skip with the
reason; with ``CI`` set they fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg2
import pytest

from pgpool_async import (
    AsyncConnectionPool,
    PoolConfigError,
    TransactionPoolingError,
)
from pgpool_async.testing import ComponentMissing, skip_or_fail
from pgpool_async.testing.load import prepare
from pgpool_async.testing.pgbouncer import ThrowawayPgBouncer, find_pgbouncer
from pgpool_async.testing.throwaway import ThrowawayPostgres

from .conftest import _loop_guard_off, server_query

# Errors a request in flight may see when PgBouncer dies under it.
_LOST = {"OperationalError", "InterfaceError", "CommitOutcomeUnknown", "AdminShutdown"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def backend_server(pg_server: ThrowawayPostgres | None) -> Iterator[ThrowawayPostgres]:
    """The session's throwaway server, or one of our own when PGPOOL_TEST_DSN points
    elsewhere (PgBouncer's config here assumes user postgres with trust auth)."""
    if pg_server is not None:
        yield pg_server
        return
    with ThrowawayPostgres() as own:
        yield own


def _bouncer(server: ThrowawayPostgres, mode: str, pool_size: int, **settings: str) -> ThrowawayPgBouncer:
    try:
        find_pgbouncer()
    except ComponentMissing as exc:
        skip_or_fail(str(exc))
    return ThrowawayPgBouncer(server.port, pool_mode=mode, pool_size=pool_size, settings=settings).start()


def _bouncer_waiting(server: ThrowawayPostgres, seconds: str) -> ThrowawayPgBouncer:
    """Session mode, one server connection, ``query_wait_timeout=seconds``."""
    return _bouncer(server, "session", 1, query_wait_timeout=seconds)


@pytest.fixture(scope="module")
def tx_bouncer(backend_server: ThrowawayPostgres) -> Iterator[ThrowawayPgBouncer]:
    """Transaction mode, 4 server connections: clients share them for sure."""
    bouncer = _bouncer(backend_server, "transaction", 4)
    try:
        prepare(bouncer.dsn)
        yield bouncer
    finally:
        bouncer.destroy()


@pytest.fixture
def own_tx_bouncer(backend_server: ThrowawayPostgres) -> Iterator[ThrowawayPgBouncer]:
    """A transaction-mode PgBouncer a test may kill and restart."""
    bouncer = _bouncer(backend_server, "transaction", 8)
    try:
        yield bouncer
    finally:
        bouncer.destroy()


@pytest.fixture(scope="module")
def session_bouncer(backend_server: ThrowawayPostgres) -> Iterator[ThrowawayPgBouncer]:
    """Session mode with one server connection: every client gets the same session."""
    bouncer = _bouncer(backend_server, "session", 1)
    try:
        yield bouncer
    finally:
        bouncer.destroy()


# -- transaction pooling: nothing session-level leaks ------------------------------------------


#: Loans of a transaction_pooling pool run on threads whatever the io (pool.py gives them
#: io="thread"): running these tests once per io would only repeat them.
tx_pooling_io = pytest.mark.single_io("transaction_pooling loans run on threads whatever the io")


def _run_processes(dsn: str, n: int, seconds: float, *flags: str) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "pgpool_async.testing.load", "--dsn", dsn, "--seconds", str(seconds)]
    procs = [subprocess.Popen([*argv, *flags], stdout=subprocess.PIPE) for _ in range(n)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.append(json.loads(out))
    return results


def _total(results: list[dict[str, Any]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for result in results:
        total.update({k: v for k, v in result.items() if isinstance(v, int)})
        total.update({f"error:{k}": v for k, v in result["errors"].items()})
    return total


@pytest.mark.slow
@tx_pooling_io
def test_set_session_does_not_leak_between_processes(tx_bouncer: ThrowawayPgBouncer) -> None:
    """4 processes share 4 server connections; 10% of loans are read-only and
    SERIALIZABLE. With ``transaction_pooling`` no write ever runs read-only or
    SERIALIZABLE (zero foreign failures) and every read-only loan ran read-only; in
    autocommit the read-only loans are refused. The control run (no option,
    autocommit) shows the same harness catches the leak."""
    with_option = _total(_run_processes(tx_bouncer.dsn, 4, 1.0, "--transaction-pooling"))
    # Generous floors: the machine may be busy; the point is that there was load.
    assert with_option["writes"] > 100 and with_option["ro"] > 10, with_option
    assert with_option["foreign"] == 0, with_option
    assert with_option["ro_not_applied"] == 0, with_option
    assert not [k for k in with_option if k.startswith("error:")], with_option

    refused = _total(_run_processes(tx_bouncer.dsn, 2, 1.0, "--transaction-pooling", "--autocommit"))
    assert refused["ro_refused"] >= 5 and refused["ro"] == 0, refused
    assert refused["foreign"] == 0 and refused["writes"] > 50, refused

    control = _total(_run_processes(tx_bouncer.dsn, 2, 0.5, "--autocommit"))
    assert control["foreign"] > 0, f"the harness did not see the known leak: {control}"


@pytest.mark.anyio
@tx_pooling_io
async def test_session_features_refused_with_reason(tx_bouncer: ThrowawayPgBouncer) -> None:
    async with AsyncConnectionPool(1, 2, tx_bouncer.dsn, timeout=5, transaction_pooling=True) as pool:
        async with pool.connection() as conn:
            with pytest.raises(TransactionPoolingError, match="LISTEN"):
                await conn.listen("chan")
            with pytest.raises(TransactionPoolingError, match="LISTEN"):
                conn.notifies(timeout=0.1)
            with pytest.raises(TransactionPoolingError, match="WITH HOLD"):
                conn.cursor("held", withhold=True)
            with pytest.raises(TransactionPoolingError, match="autocommit mode"):
                await conn.set_session(autocommit=True, readonly=True)
            # Outside autocommit a named cursor lives in the loan's transaction: fine.
            async with conn.cursor("streamed") as cur:
                await cur.execute("SELECT generate_series(1, 2500)")
                assert len([row async for row in cur]) == 2500
            await conn.commit()
            await conn.set_session(autocommit=True)
            with pytest.raises(TransactionPoolingError, match="named cursor outside a transaction"):
                conn.cursor("loose")
            with pytest.raises(TransactionPoolingError, match="autocommit mode"):
                await conn.set_session(isolation_level="SERIALIZABLE")
        # The connection came back in the pool's mode (autocommit off), still usable.
        async with pool.connection() as conn:
            assert not conn.autocommit
            assert await conn.fetchval("SELECT current_setting('transaction_read_only')") == "off"
    with pytest.raises(PoolConfigError, match="reset= cannot be used with transaction_pooling"):
        AsyncConnectionPool(1, 2, tx_bouncer.dsn, transaction_pooling=True, reset=lambda raw: None)


@pytest.mark.anyio
@tx_pooling_io
async def test_read_only_applies_to_the_transaction_only(tx_bouncer: ThrowawayPgBouncer) -> None:
    """set_session(readonly=True) makes this loan's transaction read-only, and
    nothing after it: the next loans, on the same PgBouncer, write."""
    async with AsyncConnectionPool(1, 1, tx_bouncer.dsn, timeout=5, transaction_pooling=True) as pool:
        async with pool.connection() as conn:
            await conn.set_session(readonly=True)
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                await conn.execute("INSERT INTO scale_load (v) VALUES (2)")
            await conn.rollback()  # (the failed INSERT failed the transaction)
        for _ in range(20):
            assert await pool.fetchval("INSERT INTO scale_load (v) VALUES (2) RETURNING v") == 2


@pytest.mark.anyio
@tx_pooling_io
async def test_nothing_sent_on_return(dsn: str, app_name: str) -> None:
    """With ``transaction_pooling`` the return of a loan that changed its session
    characteristics sends no statement: the backend's last statement stays the
    loan's COMMIT (without the option it is ``SET default_transaction_... TO DEFAULT``,
    which behind a transaction pooler runs on someone else's server connection)."""
    async with AsyncConnectionPool(
        1, 1, dsn, timeout=5, autocommit=True, transaction_pooling=True, application_name=app_name
    ) as pool:
        async with pool.connection() as conn:
            await conn.set_session(autocommit=False, readonly=True)
            assert await conn.fetchval("SELECT current_setting('transaction_read_only')") == "on"
        rows = await _in_thread(
            server_query,
            dsn,
            "SELECT query FROM pg_stat_activity WHERE application_name = %s AND state = 'idle'",
            (app_name,),
        )
        assert rows == [("COMMIT",)]
        async with pool.connection() as conn:  # back in the pool's mode, nothing left
            assert conn.autocommit
            assert await conn.fetchval("SELECT current_setting('transaction_read_only')") == "off"


# -- session mode: reset with DISCARD ALL --------------------------------------------------------


def discard_all(raw: Any) -> None:
    """The documented ``reset`` for session mode (see docs/scaling.md); the pool
    runs it outside any transaction, as DISCARD ALL requires."""
    with raw.cursor() as cur:
        cur.execute("DISCARD ALL")


@pytest.mark.anyio
async def test_session_mode_reset_discard_all(session_bouncer: ThrowawayPgBouncer) -> None:
    """In session mode the pool's connection keeps its server session between loans
    (PgBouncer resets it only when the client disconnects): ``reset=discard_all``
    clears what a loan left; without it, the next loan sees it."""
    leave = "SET search_path TO leaked; PREPARE left_over AS SELECT 1"
    see = "SELECT current_setting('search_path'), (SELECT count(*) FROM pg_prepared_statements)"
    async with AsyncConnectionPool(1, 1, session_bouncer.dsn, timeout=5, autocommit=True) as pool:
        await pool.execute(leave)
        assert await pool.fetchone(see) == ("leaked", 1)  # the leftovers the reset must clear
        await pool.execute("DISCARD ALL")
    async with AsyncConnectionPool(1, 1, session_bouncer.dsn, timeout=5, reset=discard_all) as pool:
        await pool.execute(leave)
        assert await pool.fetchone(see) == ('"$user", public', 0)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_query_wait_timeout_bounds_the_wait_inside_pgbouncer(backend_server: ThrowawayPostgres) -> None:
    """Session mode, one server connection, two client pools: the second pool gets
    its own connection at once (the pool's timeout is not involved), then waits
    inside PgBouncer until ``query_wait_timeout`` (1 s here) ends it."""
    bouncer = await _in_thread(_bouncer_waiting, backend_server, "1")
    try:
        async with (
            AsyncConnectionPool(1, 1, bouncer.dsn, timeout=30) as first,
            AsyncConnectionPool(0, 1, bouncer.dsn, timeout=30) as second,
        ):
            assert await first.fetchval("SELECT 1") == 1  # holds the only server session
            started = time.monotonic()
            with pytest.raises(psycopg2.OperationalError, match="query_wait_timeout"):
                await second.fetchval("SELECT 1")
            waited = time.monotonic() - started
            assert 0.9 < waited < 10, waited
    finally:
        await _in_thread(bouncer.destroy)


# -- PgBouncer killed and restarted, paused and resumed, under load ---------------------------


class _Load:
    """Tasks looping ``pool.fetchval`` and recording (start, end, error name or None)."""

    def __init__(self, pool: AsyncConnectionPool, tasks: int) -> None:
        self.pool = pool
        self.tasks = tasks
        self.events: list[tuple[float, float, str | None]] = []
        self.stop = False

    async def _worker(self) -> None:
        while not self.stop:
            started = time.monotonic()
            try:
                await self.pool.fetchval("SELECT 1")
                error = None
            except Exception as exc:
                error = type(exc).__name__
                await anyio.sleep(0.01)  # an error is fast: don't spin
            self.events.append((started, time.monotonic(), error))

    async def run(self, scenario: Any) -> None:
        async with anyio.create_task_group() as group:
            for _ in range(self.tasks):
                group.start_soon(self._worker)
            try:
                await scenario()
            finally:
                self.stop = True

    def errors(self) -> list[tuple[float, float, str | None]]:
        return [e for e in self.events if e[2] is not None]


def _in_thread(func: Any, *args: Any) -> Any:
    def call() -> Any:
        with _loop_guard_off():
            return func(*args)

    return anyio.to_thread.run_sync(call)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@tx_pooling_io
async def test_pgbouncer_killed_and_restarted_under_load(own_tx_bouncer: ThrowawayPgBouncer) -> None:
    """SIGKILL PgBouncer under 8 tasks, restart it 0.3 s later: only requests in
    flight at the kill fail (at most one per task), none started 0.5 s after the
    restart fails, and requests succeed again."""
    tasks = 8
    marks: dict[str, float] = {}
    async with AsyncConnectionPool(2, 4, own_tx_bouncer.dsn, timeout=5, transaction_pooling=True) as pool:
        load = _Load(pool, tasks)

        async def scenario() -> None:
            await anyio.sleep(0.5)
            marks["kill"] = time.monotonic()
            await _in_thread(own_tx_bouncer.kill)
            await anyio.sleep(0.3)
            await _in_thread(own_tx_bouncer.start)
            marks["restart"] = time.monotonic()
            await anyio.sleep(1.5)

        await load.run(scenario)
    errors = load.errors()
    assert {e[2] for e in errors} <= _LOST, errors
    assert len(errors) <= tasks, errors
    assert [e for e in errors if e[0] >= marks["restart"] + 0.5] == []
    after = [e for e in load.events if e[0] >= marks["restart"] and e[2] is None]
    before = [e for e in load.events if e[1] < marks["kill"] and e[2] is None]
    assert len(before) > 20 and len(after) > 20, (len(before), len(after))


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@tx_pooling_io
async def test_pgbouncer_pause_resume_under_load(own_tx_bouncer: ThrowawayPgBouncer) -> None:
    """PAUSE for 0.5 s under 8 tasks: requests wait inside PgBouncer (the pool's
    timeout is longer), none fails, and they complete after RESUME."""
    marks: dict[str, float] = {}
    async with AsyncConnectionPool(2, 4, own_tx_bouncer.dsn, timeout=5, transaction_pooling=True) as pool:
        load = _Load(pool, 8)

        async def scenario() -> None:
            await anyio.sleep(0.3)
            await _in_thread(own_tx_bouncer.admin, "PAUSE")  # returns once servers are released
            marks["paused"] = time.monotonic()
            await anyio.sleep(0.5)
            marks["resume"] = time.monotonic()
            await _in_thread(own_tx_bouncer.admin, "RESUME")
            await anyio.sleep(0.5)

        await load.run(scenario)
    assert load.errors() == []
    # Requests made while paused were held inside PgBouncer: none started after
    # PAUSE returned completed before RESUME (one that finished on the server just
    # before the pause may be seen by its task a moment after), and some that were
    # waiting then completed after RESUME.
    assert [e for e in load.events if marks["paused"] < e[0] and e[1] < marks["resume"]] == []
    held = [e for e in load.events if e[0] < marks["resume"] and e[1] >= marks["resume"]]
    assert held, "no request was held by the pause"
    after = [e for e in load.events if e[0] > marks["resume"]]
    assert len(after) > 10
