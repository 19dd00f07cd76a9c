"""The sync engine: psycopg2's pool API, with the seed's promises kept, on a real server."""

from __future__ import annotations

import threading
from typing import Any

import psycopg2
import psycopg2.extras
import psycopg2.pool
import pytest

from pgpool_async import (
    PoolClosed,
    PoolConfigError,
    PoolError,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)
from pgpool_async.testing.faultproxy import FaultProxy

from .conftest import backends, server_query, wait_backends_gone
from .fix_dsn import tcp_address

pytestmark = pytest.mark.single_io("the sync engine (psycopg2's pool API): no io option")


def test_is_psycopg2_pool_and_error(dsn: str) -> None:
    with ThreadedConnectionPool(1, 2, dsn) as pool:
        assert isinstance(pool, psycopg2.pool.ThreadedConnectionPool)
        assert PoolError is psycopg2.pool.PoolError
        a = pool.getconn()
        b = pool.getconn()
        with pytest.raises(psycopg2.pool.PoolError, match="connection pool exhausted"):
            pool.getconn()
        pool.putconn(a)
        pool.putconn(b)
    assert pool.closed
    assert a.closed and b.closed


def test_context_manager_closes_all(dsn: str, app_name: str) -> None:
    with ThreadedConnectionPool(2, 4, dsn, application_name=app_name) as pool:
        held = pool.getconn()
        assert len(backends(dsn, app_name)) == 2
    assert held.closed
    wait_backends_gone(dsn, app_name)


def test_idle_kept_up_to_maxconn(dsn: str) -> None:
    """psycopg2 closes every connection above minconn on return; we keep them."""
    with ThreadedConnectionPool(1, 5, dsn) as pool:
        for _ in range(3):  # three bursts of five
            conns = [pool.getconn() for _ in range(5)]
            for conn in conns:
                pool.putconn(conn)
        assert pool.connections_opened == 5
        assert pool.idle_count == 5


def test_rollback_on_return(dsn: str, app_name: str) -> None:
    server_query(dsn, "CREATE TABLE IF NOT EXISTS engine_rb (x int)")
    with ThreadedConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        conn = pool.getconn()
        conn.cursor().execute("INSERT INTO engine_rb VALUES (42)")
        assert backends(dsn, app_name)[0][0] == "idle in transaction"
        pool.putconn(conn)
        assert backends(dsn, app_name)[0][0] == "idle"
        again = pool.getconn()
        assert again is conn
        assert again.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        pool.putconn(again)
    assert server_query(dsn, "SELECT count(*) FROM engine_rb WHERE x = 42") == [(0,)]


def test_broken_idle_connection_replaced(dsn: str, app_name: str) -> None:
    with ThreadedConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        conn = pool.getconn()
        pid = conn.get_backend_pid()
        pool.putconn(conn)
        server_query(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        # The server's goodbye reaches the socket; wait for it deterministically.
        server_query(dsn, "SELECT pg_sleep(0.05)")
        fresh = pool.getconn()
        assert fresh is not conn
        cur = fresh.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        pool.putconn(fresh)
        assert conn.closed


def test_closed_connection_replaced_and_close_flag(dsn: str) -> None:
    with ThreadedConnectionPool(0, 2, dsn) as pool:
        conn = pool.getconn()
        pool.putconn(conn, close=True)
        assert conn.closed and pool.idle_count == 0
        conn = pool.getconn()
        pool.putconn(conn)
        conn.close()  # closed behind the pool's back while idle
        fresh = pool.getconn()
        assert fresh is not conn and not fresh.closed
        pool.putconn(fresh)


def test_keys(dsn: str) -> None:
    with ThreadedConnectionPool(0, 3, dsn) as pool:
        a = pool.getconn("user_queries")
        assert pool.getconn("user_queries") is a
        b = pool.getconn("admin_queries")
        assert b is not a
        pool.putconn(a, "user_queries")
        pool.putconn(key="admin_queries")  # the seed: conn found from its key
        assert pool.idle_count == 2
        with pytest.raises(PoolError, match="key"):
            pool.putconn(key="nobody")


def test_misuse_errors(dsn: str) -> None:
    with ThreadedConnectionPool(0, 2, dsn) as pool, ThreadedConnectionPool(0, 2, dsn) as other:
        conn = pool.getconn()
        with pytest.raises(PoolError, match="not a member of this pool"):
            other.putconn(conn)
        pool.putconn(conn)
        with pytest.raises(PoolError, match="already returned"):
            pool.putconn(conn)
        foreign = psycopg2.connect(dsn)
        with pytest.raises(PoolError, match="not a member"):
            pool.putconn(foreign)
        foreign.close()
        assert pool.idle_count == 1  # still usable
        pool.putconn(pool.getconn())


def test_after_closeall(dsn: str) -> None:
    pool = ThreadedConnectionPool(1, 2, dsn)
    held = pool.getconn()
    pool.closeall()
    assert held.closed  # the seed: closeall closes connections still in use
    with pytest.raises(PoolClosed, match="connection pool is closed"):
        pool.getconn()
    with pytest.raises(PoolClosed, match="connection pool is closed"):
        pool.closeall()
    pool.putconn(held)  # no error from a finally block after closeall


@pytest.mark.parametrize(
    ("minconn", "maxconn", "match"),
    [
        (3, 2, "minconn \\(3\\) is greater than maxconn \\(2\\)"),
        (-1, 2, "minconn must be >= 0"),
        (0, 0, "maxconn must be >= 1"),
        (1.5, 2, "minconn must be an int"),
    ],
)
def test_bad_sizes(minconn: Any, maxconn: Any, match: str) -> None:
    with pytest.raises(PoolConfigError, match=match) as info:
        ThreadedConnectionPool(minconn, maxconn, "dbname=x")
    assert isinstance(info.value, ValueError)


def test_bad_dsn_without_io() -> None:
    with pytest.raises(PoolConfigError, match="fix the DSN"):
        ThreadedConnectionPool.unopened(1, 2, "this is not a dsn")
    with pytest.raises(PoolConfigError, match="invalid connection option"):
        ThreadedConnectionPool.unopened(1, 2, "dbname=x", no_such_option=1)


def test_unreachable_server_fails_init_without_leak(dsn: str) -> None:
    with pytest.raises(psycopg2.OperationalError):
        ThreadedConnectionPool(1, 2, "host=127.0.0.1 port=1 connect_timeout=2")


def test_connection_factories(dsn: str) -> None:
    with ThreadedConnectionPool(0, 1, dsn, connection_factory=psycopg2.extras.RealDictConnection) as p:
        conn = p.getconn()
        cur = conn.cursor()
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == {"one": 1}
        p.putconn(conn)


class DictConnectionPool(ThreadedConnectionPool):
    """The seed's custom factory example: a subclass overriding ``_connect``."""

    def _connect(self, key: Any = None) -> Any:
        conn = psycopg2.connect(
            *self._args, connection_factory=psycopg2.extras.DictConnection, **self._kwargs
        )
        if key is not None:
            self._used[key] = conn
            self._rused[id(conn)] = key
        else:
            self._pool.append(conn)
        return conn


def test_seed_style_subclass(dsn: str) -> None:
    with DictConnectionPool(1, 2, dsn) as pool:
        conn = pool.getconn()
        assert isinstance(conn, psycopg2.extras.DictConnection)
        cur = conn.cursor()
        cur.execute("SELECT 7 AS seven")
        assert cur.fetchone()["seven"] == 7
        pool.putconn(conn)
        assert pool.idle_count == 1 and pool.size == 1


def test_simple_pool(dsn: str) -> None:
    with SimpleConnectionPool(1, 2, dsn) as pool:
        assert isinstance(pool, psycopg2.pool.SimpleConnectionPool)
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
        assert pool.idle_count == 1


def test_connect_outside_lock(dsn: str) -> None:
    """A slow connect must not stall another thread's getconn/putconn."""
    with FaultProxy(*tcp_address(dsn)) as proxy:
        with ThreadedConnectionPool(1, 2, proxy.dsn(dsn)) as pool:
            proxy.delay(connect=1.0)
            done = threading.Event()

            def slow() -> None:
                conn = pool.getconn()  # needs a new, slow connection
                done.set()
                pool.putconn(conn)

            first = pool.getconn()  # takes the one idle connection
            thread = threading.Thread(target=slow)
            thread.start()
            while pool._pending == 0:  # the slow connect has begun, outside the lock
                threading.Event().wait(0.005)
            pool.putconn(first)
            again = pool.getconn()
            assert not done.is_set(), "getconn/putconn waited for another thread's connect"
            pool.putconn(again)
            thread.join()
            assert done.is_set()
