"""psycopg_pool's own pool tests, ported to this pool's API in our own words.

Sources: psycopg/psycopg ``tests/pool/test_pool_common_async.py`` ("common") and
``tests/pool/test_pool_async.py`` ("async"), read at commit c079c37c. Each test
names the one it ports. Only tests whose API maps are ported; timing assertions
became counts or generous bounds, sleeps became events. Where we differ on
purpose, tests/PEERS.md says why; a test failing because of a defect of issue 7
carries a strict xfail naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import uuid
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import psycopg2
import psycopg2.extensions
import pytest

from pgpool_async import (
    AsyncConnection,
    AsyncConnectionPool,
    PoolClosed,
    PoolConfigError,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)
from pgpool_async.testing.faultproxy import FaultProxy

from .conftest import server_query
from .fix_dsn import tcp_address
from .gates import in_use, poll, pool_threads, wait_backends, wait_closed_down

pytestmark = pytest.mark.anyio


@pytest.fixture
def make(dsn: str, app_name: str) -> Any:
    """``make(minconn, maxconn, **options)``: an unopened pool on the test server,
    under this test's application_name and a unique pool name."""

    def make(minconn: int, maxconn: int, target: str | None = None, **options: Any) -> AsyncConnectionPool:
        options.setdefault("name", f"pp-{uuid.uuid4().hex[:10]}")
        options.setdefault("timeout", 5)
        if "connection_factory" in options:
            # A connection class of the test's own runs in threads: io="loop" would refuse it.
            options.setdefault("io", "auto")
        return AsyncConnectionPool(minconn, maxconn, target or dsn, application_name=app_name, **options)

    return make


def pid(conn: AsyncConnection) -> int:
    return int(conn.raw.get_backend_pid())  # libpq keeps it: no I/O


async def terminate(dsn: str, backend_pid: int) -> None:
    await anyio.to_thread.run_sync(server_query, dsn, "SELECT pg_terminate_backend(%s)", (backend_pid,))


async def until_waiting(pool: AsyncConnectionPool, n: int) -> None:
    await poll(lambda: pool.get_stats()["requests_waiting"] >= n, 10, f"{n} requests waiting")


# -- common ------------------------------------------------------------------------------


async def test_defaults(make: Any) -> None:
    """Ports common::test_defaults (the public ones: timeout, sizes, open/closed)."""
    pool = make(1, 4, timeout=30.0)
    assert (pool.minconn, pool.maxconn, pool.timeout) == (1, 4, 30.0)
    assert AsyncConnectionPool(1, 4, "dbname=x").timeout == 30.0  # the default
    async with pool:
        assert not pool.closed
    assert pool.closed


async def test_connection_class(make: Any) -> None:
    """Ports common::test_connection_class: psycopg2's ``connection_factory``."""

    class MyConn(psycopg2.extensions.connection):
        pass

    async with make(1, 1, connection_factory=MyConn) as pool, pool.connection() as conn:
        assert isinstance(conn.raw, MyConn)


async def test_kwargs(make: Any) -> None:
    """Ports common::test_kwargs: autocommit is a pool option here."""
    async with make(1, 1, autocommit=True) as pool, pool.connection() as conn:
        assert conn.autocommit


async def test_context(make: Any) -> None:
    """Ports common::test_context."""
    async with make(1, 1) as pool:
        assert not pool.closed
    assert pool.closed


async def test_closed_getconn(make: Any) -> None:
    """Ports common::test_closed_getconn."""
    pool = make(1, 1)
    await pool.open()
    async with pool.connection():
        pass
    await pool.close()
    assert pool.closed
    with pytest.raises(PoolClosed):
        async with pool.connection():
            pass


async def test_close_connection_on_pool_close(make: Any, dsn: str, app_name: str) -> None:
    """Ports common::test_close_connection_on_pool_close: closing the pool from
    inside a block; once the block ends its connection is closed. (Here close()
    closes it after its timeout, and the block may raise PoolClosed: PEERS.md.)"""
    pool = make(1, 1)
    await pool.open()
    with contextlib.suppress(PoolClosed):  # how we differ: see PEERS.md (issue 7 defect 9)
        async with pool.connection() as conn:
            raw = conn.raw
            await pool.close(timeout=0.1)
    assert raw.closed
    await wait_closed_down(pool, dsn, app_name)


async def test_closed_queue(make: Any) -> None:
    """Ports common::test_closed_queue: a queued request gets PoolClosed, the
    holder finishes its work."""
    pool = make(1, 1)
    await pool.open()
    got, done = anyio.Event(), anyio.Event()
    outcome: list[str] = []

    async def holder() -> None:
        async with pool.connection() as conn:
            got.set()
            assert await conn.fetchval("SELECT 1") == 1
            await done.wait()
        outcome.append("holder")

    async def queued() -> None:
        with pytest.raises(PoolClosed):
            async with pool.connection():
                pass
        outcome.append("queued")
        done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(holder)
        await got.wait()
        group.start_soon(queued)
        await until_waiting(pool, 1)
        await pool.close()
    assert sorted(outcome) == ["holder", "queued"]


async def test_open_explicit(make: Any) -> None:
    """Ports common::test_open_explicit (before open: PoolError, not PoolClosed;
    see PEERS.md)."""
    pool = make(1, 1)
    with pytest.raises(PoolError, match="is not open"):
        await pool.getconn()
    await pool.open()
    try:
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
    with pytest.raises(PoolClosed):
        await pool.getconn()


async def test_open_no_op(make: Any) -> None:
    """Ports common::test_open_no_op."""
    pool = make(1, 1)
    await pool.open()
    try:
        await pool.open()
        assert not pool.closed
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_reopen(make: Any) -> None:
    """Ports common::test_reopen."""
    pool = make(1, 1)
    await pool.open()
    await pool.close()
    with pytest.raises(PoolClosed, match="cannot be reopened"):
        await pool.open()


async def test_queue(make: Any) -> None:
    """Ports common::test_queue without timings: six requests through two
    connections are all served, by two backends."""
    pids: list[int] = []

    async def worker() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.02)")
            pids.append(pid(conn))

    async with make(2, 2) as pool, anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(worker)
    assert len(pids) == 6
    assert len(set(pids)) == 2


async def test_queue_size(make: Any) -> None:
    """Ports common::test_queue_size: one request more than max_waiting is refused
    at once, with the pool's name and max_waiting in the message."""
    errors: list[TooManyRequests] = []
    served = 0
    release = anyio.Event()

    async def worker() -> None:
        nonlocal served
        try:
            async with pool.connection():
                served += 1
        except TooManyRequests as exc:
            errors.append(exc)

    async with make(1, 1, max_waiting=3) as pool:
        async with anyio.create_task_group() as group:
            held = await pool.getconn()
            for i in range(3):
                group.start_soon(worker)
                await until_waiting(pool, i + 1)
            await worker()  # the fourth: refused at once
            release.set()
            await pool.putconn(held)
    assert served == 3
    assert len(errors) == 1
    assert pool.get_stats()["requests_errors"] == 1
    assert "max_waiting=3" in str(errors[0])
    assert pool.name in str(errors[0])


async def test_queue_timeout(make: Any) -> None:
    """Ports common::test_queue_timeout: with both connections held, two more
    requests time out (not before their timeout)."""
    release = anyio.Event()
    errors: list[float] = []

    async def holder() -> None:
        async with pool.connection(timeout=5):
            await release.wait()

    async def late() -> None:
        started = anyio.current_time()
        with pytest.raises(PoolTimeout):
            async with pool.connection():
                pass
        errors.append(anyio.current_time() - started)

    async with make(0, 2, timeout=0.1) as pool:  # open() does not depend on 0.1 s
        async with anyio.create_task_group() as group:
            group.start_soon(holder)
            group.start_soon(holder)
            await poll(lambda: in_use(pool) == 2, 10, "both held")
            async with anyio.create_task_group() as lates:
                lates.start_soon(late)
                lates.start_soon(late)
            release.set()
    assert len(errors) == 2
    assert all(e >= 0.09 for e in errors)  # never early (a timer's rounding aside)


async def test_dead_client(make: Any) -> None:
    """Ports common::test_dead_client: a request that gives up loses no connection."""
    release = anyio.Event()

    async def holder() -> None:
        async with pool.connection():
            await release.wait()

    async with make(2, 2) as pool:
        async with anyio.create_task_group() as group:
            group.start_soon(holder)
            group.start_soon(holder)
            await poll(lambda: in_use(pool) == 2, 10, "both held")
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0.05)
            release.set()
        await poll(lambda: pool.get_stats()["pool_available"] == 2, 10, "both back")
        assert pool.get_stats()["pool_size"] == 2


async def test_queue_timeout_override(make: Any) -> None:
    """Ports common::test_queue_timeout_override: ``connection(timeout=)`` wins
    over the pool's."""
    # minconn 0: open() itself must not depend on connecting within 0.05 s.
    async with make(0, 1, timeout=0.05) as pool:
        held = await pool.getconn(timeout=5)
        with pytest.raises(PoolTimeout, match=r"after 0\.05 sec"):
            await pool.getconn()
        async with anyio.create_task_group() as group:

            async def patient() -> None:
                async with pool.connection(timeout=5) as conn:
                    assert await conn.fetchval("SELECT 1") == 1

            group.start_soon(patient)
            await until_waiting(pool, 1)
            await pool.putconn(held)


async def test_broken_reconnect(make: Any) -> None:
    """Ports common::test_broken_reconnect: a connection closed by its user is
    replaced."""
    async with make(1, 1) as pool:
        async with pool.connection() as conn:
            first = pid(conn)
            await conn.run_sync(lambda raw: raw.close())
        async with pool.connection() as conn:
            assert pid(conn) != first


async def test_close_no_tasks(make: Any) -> None:
    """Ports common::test_close_no_tasks: no thread of the pool outlives close()."""
    pool = make(1, 2)
    await pool.open()
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    assert pool_threads(pool.name)
    await pool.close()
    await poll(lambda: not pool_threads(pool.name), 10, "the pool's threads gone")


async def test_putconn_no_pool(make: Any, dsn: str) -> None:
    """Ports common::test_putconn_no_pool: a connection the pool never lent."""
    raw = await anyio.to_thread.run_sync(psycopg2.connect, dsn)
    try:
        async with make(1, 1) as pool:
            with pytest.raises(PoolError):
                await pool.putconn(raw)
    finally:
        raw.close()


async def test_putconn_wrong_pool(make: Any) -> None:
    """Ports common::test_putconn_wrong_pool."""
    async with make(1, 1) as one, make(1, 1) as two:
        conn = await one.getconn()
        with pytest.raises(PoolError, match="not a member of this pool"):
            await two.putconn(conn)
        await one.putconn(conn)


async def test_stats_measures(make: Any) -> None:
    """Ports common::test_stats_measures, with held connections instead of sleeps."""
    release = anyio.Event()

    async def holder() -> None:
        async with pool.connection():
            await release.wait()

    async with make(2, 4) as pool:
        stats = pool.get_stats()
        assert (stats["pool_min"], stats["pool_max"], stats["pool_size"]) == (2, 4, 2)
        assert (stats["pool_available"], stats["requests_waiting"]) == (2, 0)
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(holder)
            await poll(lambda: pool.get_stats()["requests_waiting"] == 0 and in_use(pool) == 3, 10, "3 lent")
            stats = pool.get_stats()
            assert (stats["pool_available"], stats["requests_waiting"]) == (0, 0)
            for _ in range(4):
                group.start_soon(holder)
            await poll(lambda: pool.get_stats()["requests_waiting"] == 3, 10, "3 waiting")
            stats = pool.get_stats()
            assert (stats["pool_size"], stats["pool_available"]) == (4, 0)
            release.set()


async def test_stats_usage(make: Any) -> None:
    """Ports common::test_stats_usage: the counters (no timing ranges)."""
    release = anyio.Event()

    async def holder() -> None:
        async with pool.connection():
            await release.wait()

    async with make(3, 3) as pool:
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(holder)
            await poll(lambda: in_use(pool) == 3, 10, "3 lent")
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0.05)
            release.set()
        stats = pool.get_stats()
        assert stats["requests_num"] == 4
        assert stats["requests_queued"] == 1
        assert stats["requests_errors"] == 1
        assert stats["requests_wait_ms"] >= 45  # waited its 0.05 s (ms are truncated)
        assert stats["usage_ms"] > 0
        assert stats.get("returns_bad", 0) == 0
        async with pool.connection() as conn:
            await conn.run_sync(lambda raw: raw.close())
        stats = pool.pop_stats()
        assert stats["requests_num"] == 5
        assert stats["returns_bad"] == 1
        async with pool.connection():
            pass
        assert pool.get_stats()["requests_num"] == 1


async def test_debug_deadlock(make: Any) -> None:
    """Ports common::test_debug_deadlock: DEBUG logging while opening does not deadlock."""
    logger = logging.getLogger("pgpool_async")
    handler = logging.StreamHandler()
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        async with make(4, 4) as pool:
            assert pool.get_stats()["pool_available"] == 4
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


async def test_check_init(make: Any) -> None:
    """Ports common::test_check_init: the check runs before lending."""
    checked = 0

    def check(raw: Any) -> None:
        nonlocal checked
        checked += 1

    async with make(1, 1, check=check, check_idle=0) as pool, pool.connection(timeout=1) as conn:
        await conn.execute("SELECT 1")
    assert checked


async def test_check_timeout(make: Any) -> None:
    """Ports common::test_check_timeout: a check that always fails ends in
    PoolTimeout at the timeout (plus a margin), not a hang."""

    def check(raw: Any) -> None:
        raise RuntimeError("unfit")

    async with make(1, 1, check=check, check_idle=0) as pool:
        started = anyio.current_time()
        with pytest.raises(PoolTimeout):
            async with pool.connection(timeout=0.5):
                raise AssertionError("lent a connection that failed its check")
    assert anyio.current_time() - started < 5


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cancellation_in_queue(make: Any) -> None:
    """Ports common::test_cancellation_in_queue (psycopg issue 509): task.cancel()
    on holders and queued requests leaves every connection available."""
    got: list[AsyncConnection] = []
    all_taken = asyncio.Event()

    async def worker() -> None:
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            got.append(conn)
            if len(got) >= 3:
                all_taken.set()
            await asyncio.sleep(30)

    async with make(3, 3, timeout=5) as pool:
        tasks = [asyncio.ensure_future(worker()) for _ in range(9)]
        await asyncio.wait_for(all_taken.wait(), 10)
        await until_waiting(pool, 6)
        for task in reversed(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await poll(lambda: pool.get_stats()["pool_available"] == 3, 10, "all 3 available")
        assert pool.get_stats()["requests_waiting"] == 0
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cancel_on_check(make: Any) -> None:
    """Ports common::test_cancel_on_check: a check that raises CancelledError
    once loses no connection."""
    raised = False

    def check(raw: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise asyncio.CancelledError

    async with make(1, 1, check=check, check_idle=0, timeout=1) as pool:
        with contextlib.suppress(asyncio.CancelledError):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1


def _rollback_raising_once(exc: BaseException) -> tuple[type[psycopg2.extensions.connection], list[bool]]:
    armed = [False]

    class Conn(psycopg2.extensions.connection):
        def rollback(self) -> None:
            if armed[0]:
                armed[0] = False
                raise exc
            super().rollback()

    return Conn, armed


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cancel_on_rollback(make: Any) -> None:
    """Ports common::test_cancel_on_rollback: the rollback on return raises
    CancelledError; the pool still serves afterwards."""
    factory, armed = _rollback_raising_once(asyncio.CancelledError())
    pool = make(1, 1, connection_factory=factory, timeout=1)
    try:
        await pool.open()
        armed[0] = True
        with pytest.raises((psycopg2.errors.SyntaxError, asyncio.CancelledError)):
            async with pool.connection() as conn:
                await conn.execute("selexx 2")
        with anyio.fail_after(3):  # its timeout is 1 s
            async with pool.connection() as conn:
                assert await conn.fetchval("SELECT 3") == 3
    finally:
        with anyio.move_on_after(5, shield=True):
            await pool.close(timeout=0.1)


async def test_drain(make: Any) -> None:
    """Ports common::test_drain: drain() while both are lent; afterwards, new
    backends, which then stay."""
    async with make(2, 2) as pool:
        async with pool.connection() as a, pool.connection() as b:
            before = {pid(a), pid(b)}
            await pool.drain()
        async with pool.connection() as a, pool.connection() as b:
            after = {pid(a), pid(b)}
        async with pool.connection() as a, pool.connection() as b:
            again = {pid(a), pid(b)}
    assert len(before) == len(after) == 2
    assert not before & after
    assert after == again


async def test_configure_broken(make: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Ports common::test_configure_broken: a configure hook that fails keeps the
    pool from opening, and the failure is logged."""

    def configure(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("WAT")

    caplog.set_level(logging.WARNING, logger="pgpool_async")
    with pytest.raises(PoolTimeout):
        async with make(1, 1, configure=configure, timeout=1.0):
            pass
    assert any("WAT" in r.getMessage() for r in caplog.records)


async def test_configure_badstate(make: Any) -> None:
    """Ports common::test_configure_badstate, where we differ (PEERS.md): a
    configure that leaves a transaction open is committed, not refused."""

    def configure(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SET TIME ZONE '+03:00'")  # opens a transaction

    async with make(1, 1, configure=configure) as pool, pool.connection() as conn:
        assert "+03" in await conn.fetchval("SHOW TimeZone")


# -- async --------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(0, 0), (-1, 2), (4, 2)])
async def test_bad_size(sizes: tuple[int, int], dsn: str) -> None:
    """Ports async::test_bad_size (PoolConfigError is a ValueError)."""
    with pytest.raises(ValueError):
        AsyncConnectionPool(sizes[0], sizes[1], dsn)


@pytest.mark.parametrize("sizes", [(2, 2), (0, 2), (2, 4)])
async def test_min_size_max_size(make: Any, sizes: tuple[int, int]) -> None:
    """Ports async::test_min_size_max_size."""
    async with make(*sizes) as pool:
        assert (pool.minconn, pool.maxconn) == sizes
        assert pool.get_stats()["pool_size"] == sizes[0]


async def test_its_really_a_pool(make: Any) -> None:
    """Ports async::test_its_really_a_pool."""
    async with make(2, 2) as pool:
        async with pool.connection() as a, pool.connection() as b:
            pids = {pid(a), pid(b)}
        async with pool.connection() as c:
            assert pid(c) in pids


async def test_connection_not_lost(make: Any) -> None:
    """Ports async::test_connection_not_lost."""
    async with make(1, 1) as pool:
        with pytest.raises(ZeroDivisionError):
            async with pool.connection() as conn:
                first = pid(conn)
                1 / 0  # noqa: B018
        async with pool.connection() as conn:
            assert pid(conn) == first


async def test_configure(make: Any) -> None:
    """Ports async::test_configure: once per new connection, and it lasts."""
    inits = 0

    def configure(raw: Any) -> None:
        nonlocal inits
        inits += 1
        with raw.cursor() as cur:
            cur.execute("SET default_transaction_read_only TO on")

    async with make(1, 1, configure=configure) as pool:
        for expected in (1, 1):
            async with pool.connection() as conn:
                assert inits == expected
                assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        async with pool.connection() as conn:
            await conn.run_sync(lambda raw: raw.close())
        async with pool.connection() as conn:
            assert inits == 2
            assert await conn.fetchval("SHOW default_transaction_read_only") == "on"


async def test_reset(make: Any) -> None:
    """Ports async::test_reset: called on each return; what it sets lasts."""
    resets = 0

    def reset(raw: Any) -> None:
        nonlocal resets
        resets += 1
        with raw.cursor() as cur:
            cur.execute("SET TIME ZONE UTC")

    async with make(1, 1, reset=reset) as pool:
        async with pool.connection() as conn:
            assert resets == 0
            await conn.execute("SET TIME ZONE '+02:00'")
        await poll(lambda: resets == 1, 10, "reset once")
        async with pool.connection() as conn:
            assert await conn.fetchval("SHOW TimeZone") == "UTC"
        await poll(lambda: resets == 2, 10, "reset twice")


async def test_reset_badstate(make: Any) -> None:
    """Ports async::test_reset_badstate, where we differ (PEERS.md): a reset that
    leaves a transaction open is committed and the connection kept."""

    def reset(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("RESET ALL")

    async with make(1, 1, reset=reset) as pool:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            first = pid(conn)
        async with pool.connection() as conn:
            assert pid(conn) == first


async def test_reset_broken(make: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Ports async::test_reset_broken: a failing reset discards the connection,
    with a warning naming the error."""

    def reset(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("WAT")

    caplog.set_level(logging.WARNING, logger="pgpool_async")
    async with make(1, 1, reset=reset) as pool:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            first = pid(conn)
        async with pool.connection() as conn:
            assert pid(conn) != first
    assert any("WAT" in r.getMessage() for r in caplog.records)


async def test_intrans_rollback(make: Any) -> None:
    """Ports async::test_intrans_rollback (no warning here: see PEERS.md)."""
    table = f"t_intrans_{uuid.uuid4().hex[:8]}"
    async with make(1, 1) as pool:
        conn = await pool.getconn()
        first = pid(conn)
        await conn.execute(f"CREATE TABLE {table} ()")
        assert conn.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        await pool.putconn(conn)
        async with pool.connection() as conn:
            assert pid(conn) == first
            assert conn.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
            assert await conn.fetchone("SELECT 1 FROM pg_class WHERE relname = %s", (table,)) is None


async def test_inerror_rollback(make: Any) -> None:
    """Ports async::test_inerror_rollback."""
    async with make(1, 1) as pool:
        conn = await pool.getconn()
        first = pid(conn)
        with pytest.raises(psycopg2.ProgrammingError):
            await conn.execute("wat")
        assert conn.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        await pool.putconn(conn)
        async with pool.connection() as conn:
            assert pid(conn) == first
            assert conn.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


async def test_fail_rollback_close(make: Any) -> None:
    """Ports async::test_fail_rollback_close: the rollback on return fails (the
    connection broke): it is replaced."""

    class BreaksOnRollback(psycopg2.extensions.connection):
        def rollback(self) -> None:
            self.close()
            super().rollback()

    async with make(1, 1, connection_factory=BreaksOnRollback) as pool:
        conn = await pool.getconn()
        first = pid(conn)
        with pytest.raises(psycopg2.ProgrammingError):
            await conn.execute("wat")
        await pool.putconn(conn)
        async with pool.connection() as conn:
            assert pid(conn) != first
            assert conn.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


async def test_del_no_warning(make: Any, recwarn: pytest.WarningsRecorder) -> None:
    """Ports async::test_del_no_warning: a pool closed properly is collected
    without a warning."""
    pool = make(2, 2)
    await pool.open()
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    await pool.close()
    ref = weakref.ref(pool)
    del pool, conn
    await poll(lambda: gc.collect() >= 0 and ref() is None, 10, "the closed pool collected")
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


async def test_open_wait(make: Any) -> None:
    """Ports async::test_open_wait: open() gives up at its timeout, with the
    connection error as the cause."""
    with socket_nobody_listens() as port:
        pool = AsyncConnectionPool(1, 1, f"host=127.0.0.1 port={port} dbname=x", timeout=0.3)
        with pytest.raises(PoolTimeout) as info:
            await pool.open()
    assert isinstance(info.value.__cause__, psycopg2.OperationalError)
    assert pool.closed


@contextlib.contextmanager
def socket_nobody_listens() -> Any:
    """A loopback port with nothing listening (bound, never listened on)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_grow(make: Any) -> None:
    """Ports async::test_grow without timings: a burst grows the pool up to
    maxconn, never beyond."""
    sizes: list[int] = []

    async def worker() -> None:
        async with pool.connection() as conn:
            sizes.append(pool.get_stats()["pool_size"])
            await conn.execute("SELECT pg_sleep(0.05)")

    async with make(0, 4) as pool:
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(worker)
        assert max(sizes) <= 4
        assert pool.get_stats()["pool_size"] > 1


async def test_shrink(make: Any) -> None:
    """Ports async::test_shrink: connections above minconn idle past max_idle go."""
    async with make(2, 4, max_idle=0.2) as pool:
        conns = [await pool.getconn() for _ in range(4)]
        for conn in conns:
            await pool.putconn(conn)
        assert pool.get_stats()["pool_size"] == 4
        await poll(lambda: pool.get_stats()["pool_size"] == 2, 10, "shrunk to minconn")


async def test_reconnect(make: Any, dsn: str) -> None:
    """Ports async::test_reconnect: the server goes away, a query fails, and once
    it is back the pool serves again (no timing of the backoff)."""
    with FaultProxy(*tcp_address(dsn)) as proxy:
        async with make(1, 1, proxy.dsn(dsn), timeout=1) as pool:
            conn = await pool.getconn()
            proxy.refuse()
            proxy.sever()
            with pytest.raises(psycopg2.OperationalError):
                await conn.execute("SELECT 1")
            await pool.putconn(conn)
            proxy.passthrough()
            async with pool.connection(timeout=10) as conn:
                assert await conn.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("is_async", [False, True])
async def test_reconnect_failure(make: Any, dsn: str, is_async: bool) -> None:
    """Ports async::test_reconnect_failure: after reconnect_timeout, the callback
    gets the pool; once the server is back, the pool serves again."""
    called = anyio.Event()
    seen: list[str] = []

    def failed(pool: AsyncConnectionPool) -> None:
        seen.append(pool.name)
        called.set()

    async def afailed(pool: AsyncConnectionPool) -> None:
        await anyio.lowlevel.checkpoint()
        failed(pool)

    with FaultProxy(*tcp_address(dsn)) as proxy:
        options = {
            "name": "this-one",
            "reconnect_timeout": 0.2,
            "reconnect_failed": afailed if is_async else failed,
        }
        async with make(1, 1, proxy.dsn(dsn), **options) as pool:
            proxy.refuse()
            await pool.drain()
            with anyio.fail_after(2):
                await called.wait()
            assert seen == ["this-one"]
            proxy.passthrough()
            async with pool.connection(timeout=10) as conn:
                assert await conn.fetchval("SELECT 1") == 1


async def test_uniform_use(make: Any) -> None:
    """Ports async::test_uniform_use, where we differ (PEERS.md): the most
    recently returned connection is lent first, so one connection serves
    sequential requests and the others can expire as idle."""
    async with make(4, 4) as pool:
        pids = []
        for _ in range(8):
            async with pool.connection() as conn:
                pids.append(pid(conn))
    assert len(set(pids)) == 1


async def test_resize(make: Any) -> None:
    """Ports async::test_resize without the sampler: growing refills minconn in
    the background, shrinking closes the idle surplus at once."""
    async with make(2, 2) as pool:
        await pool.resize(4, 4)
        assert (pool.minconn, pool.maxconn) == (4, 4)
        await poll(lambda: pool.get_stats()["pool_size"] == 4, 10, "grown to 4")
        await pool.resize(2, 2)
        assert (pool.minconn, pool.maxconn) == (2, 2)
        assert pool.get_stats()["pool_size"] == 2


@pytest.mark.parametrize("sizes", [(0, 0), (-1, 2), (4, 2)])
async def test_bad_resize(make: Any, sizes: tuple[int, int]) -> None:
    """Ports async::test_bad_resize: refused, the pool unchanged."""
    async with make(1, 2) as pool:
        with pytest.raises(PoolConfigError):
            await pool.resize(*sizes)
        assert (pool.minconn, pool.maxconn) == (1, 2)


async def test_max_lifetime(make: Any) -> None:
    """Ports async::test_max_lifetime: a connection past its lifetime is replaced."""
    async with make(1, 1, max_lifetime=0.2) as pool:
        async with pool.connection() as conn:
            first = pid(conn)
        seen = {first}

        async def replaced() -> bool:
            async with pool.connection() as conn:
                seen.add(pid(conn))
            return len(seen) > 1

        with anyio.fail_after(10):
            while not await replaced():
                await anyio.sleep(0.02)


async def test_connect_no_check(make: Any, dsn: str) -> None:
    """Ports async::test_connect_no_check, where we differ (PEERS.md): without
    a check, an idle connection whose backend was terminated is still screened
    out (socket peek), so no query fails."""
    async with make(2, 2) as pool:
        async with pool.connection() as a:
            async with pool.connection() as b:
                victim = pid(b)
            await a.execute("SELECT pg_terminate_backend(%s)", (victim,))
        await wait_gone(dsn, victim)
        async with pool.connection() as a, pool.connection() as b:
            assert victim not in {pid(a), pid(b)}
            assert await b.fetchval("SELECT 2") == 2


async def wait_gone(dsn: str, backend_pid: int) -> None:
    def alive() -> bool:
        return bool(server_query(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend_pid,)))

    with anyio.fail_after(10):
        while await anyio.to_thread.run_sync(alive):
            await anyio.sleep(0.01)


@pytest.mark.parametrize("autocommit", [True, False])
async def test_getconn_check(make: Any, dsn: str, autocommit: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Ports async::test_connect_check and ::test_getconn_check: with check=True
    a terminated connection is replaced, quietly."""
    caplog.set_level(logging.WARNING, logger="pgpool_async")
    async with make(2, 2, autocommit=autocommit, check=True, check_idle=0) as pool:
        async with pool.connection() as a:
            keep = pid(a)
            async with pool.connection() as b:
                victim = pid(b)
            await a.execute("SELECT pg_terminate_backend(%s)", (victim,))
        await wait_gone(dsn, victim)
        a, b = await pool.getconn(), await pool.getconn()
        try:
            for conn in (a, b):
                assert conn.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
                assert await conn.fetchval("SELECT 1") == 1
            pids = {pid(a), pid(b)}
        finally:
            await pool.putconn(a)
            await pool.putconn(b)
    assert keep in pids
    assert victim not in pids
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_stats_check(make: Any, dsn: str) -> None:
    """Ports async::test_stats_check."""
    async with make(1, 1, check=True, check_idle=0) as pool:
        async with pool.connection() as conn:
            victim = pid(conn)
        await terminate(dsn, victim)
        await wait_gone(dsn, victim)
        async with pool.connection() as conn:
            assert pid(conn) != victim
        assert pool.get_stats()["connections_lost"] == 1


async def test_spike(make: Any, dsn: str) -> None:
    """Ports async::test_spike: 50 short requests at once while connecting is
    slow do not open a connection each."""
    with FaultProxy(*tcp_address(dsn)) as proxy:
        async with make(5, 10, proxy.dsn(dsn)) as pool:
            proxy.delay(connect=0.15)

            async def worker() -> None:
                async with pool.connection():
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(worker)
            assert pool.get_stats()["pool_size"] < 7


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cancelled_waiter_assigned_conn_is_reclaimed(make: Any) -> None:
    """Ports async::test_cancelled_waiter_assigned_conn_is_reclaimed: a waiter
    cancelled in the same loop step as a connection is handed to it does not
    keep it; without monkeypatching, the hand-off is made in that step."""
    async with make(1, 1, timeout=1) as pool:
        held = await pool.getconn()
        first = pid(held)
        waiter = asyncio.ensure_future(pool.getconn())
        await until_waiting(pool, 1)
        waiter.cancel()
        await pool.putconn(held)  # hands it over before the waiter wakes up
        try:
            unexpected = await waiter
        except asyncio.CancelledError:
            pass
        else:
            await pool.putconn(unexpected)
            pytest.fail("a cancelled waiter returned a connection instead of raising")
        stats = pool.get_stats()
        assert (stats["pool_available"], stats["requests_waiting"]) == (1, 0)
        async with pool.connection() as conn:
            assert pid(conn) == first
            assert await conn.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("status", ["ERROR", "INTRANS"])
async def test_check_returns_an_ok_connection(make: Any, dsn: str, app_name: str, status: str) -> None:
    """Ports async::test_check_returns_an_ok_connection: a check that fails
    leaving the connection in error or in a transaction leaves nothing idle in a
    transaction on the server."""

    def check(raw: Any) -> None:
        with raw.cursor() as cur:
            if status == "ERROR":
                cur.execute("wat")
            cur.execute("SELECT 1")
            raise ZeroDivisionError

    async with make(1, 1, check=check, check_idle=0) as pool:
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.3)
        states = await wait_backends(dsn, app_name, lambda: pool.get_stats()["pool_size"])
        assert "idle in transaction" not in states
        assert "idle in transaction (aborted)" not in states


async def test_no_timeout_is_math_inf(make: Any) -> None:
    """Ports the idea of common::test_setup_no_timeout: ``math.inf`` waits
    forever (here: until a connection comes back)."""
    async with make(1, 1, timeout=math.inf) as pool:
        held = await pool.getconn()
        async with anyio.create_task_group() as group:
            group.start_soon(pool.fetchval, "SELECT 1")
            await until_waiting(pool, 1)
            await pool.putconn(held)
