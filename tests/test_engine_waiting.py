"""This package's ThreadedConnectionPool may wait: getconn(timeout=...) queues
threads first come first served; without a timeout, psycopg2's behaviour."""

from __future__ import annotations

import threading
import time

import psycopg2.pool
import pytest

from pgpool_async import PoolClosed, PoolConfigError, PoolTimeout, ThreadedConnectionPool

pytestmark = pytest.mark.single_io("the sync engine: no io option")


def _engine_true(pool: ThreadedConnectionPool) -> None:
    """psycopg2's documented state agrees with itself."""
    assert {id(c) for c in pool._used.values()} == set(pool._rused)
    assert all(pool._used[k] is c for c, k in ((c, pool._rused[id(c)]) for c in pool._used.values()))
    assert not {id(c) for c in pool._pool} & set(pool._rused)
    assert len(pool._pool) + len(pool._used) <= pool.maxconn


def test_without_timeout_psycopg2_behaviour(dsn: str) -> None:
    with ThreadedConnectionPool(0, 1, dsn) as pool:
        held = pool.getconn()
        with pytest.raises(psycopg2.pool.PoolError, match="exhausted"):
            pool.getconn()
        pool.putconn(held)


def test_timeout_expires_on_schedule(dsn: str) -> None:
    with ThreadedConnectionPool(0, 1, dsn) as pool:
        held = pool.getconn()
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        assert 0.18 <= time.monotonic() - started < 2.0
        assert not pool._waiters
        pool.putconn(held)
        _engine_true(pool)
        assert pool.idle_count == 1


def test_bad_timeout(dsn: str) -> None:
    with ThreadedConnectionPool(0, 1, dsn) as pool, pytest.raises(PoolConfigError):
        pool.getconn(timeout=-1)


def test_waiters_served_in_order_by_any_return(dsn: str) -> None:
    with ThreadedConnectionPool(0, 2, dsn) as pool:
        held = [pool.getconn(), pool.getconn()]
        served: list[int] = []
        got: dict[int, object] = {}

        def wait(i: int) -> None:
            conn = pool.getconn(timeout=10)
            served.append(i)
            got[i] = conn

        threads = []
        for i in range(3):
            t = threading.Thread(target=wait, args=(i,))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 5
            while len(pool._waiters) < i + 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        # No barging: a getconn without timeout does not jump the queue.
        pool.putconn(held[0])
        threads[0].join(5)
        assert served == [0]
        with pytest.raises(psycopg2.pool.PoolError, match="exhausted"):
            pool.getconn()
        pool.putconn(held[1], close=True)  # a closed slot: the next waiter opens one
        threads[1].join(5)
        assert served == [0, 1]
        pool.putconn(got[0])
        threads[2].join(5)
        assert served == [0, 1, 2]
        _engine_true(pool)
        for i in (1, 2):
            pool.putconn(got[i])
        _engine_true(pool)
        assert len(pool._used) == 0


def test_keyed_waiter_gets_its_key(dsn: str) -> None:
    with ThreadedConnectionPool(0, 1, dsn) as pool:
        held = pool.getconn()
        out: list[object] = []
        t = threading.Thread(target=lambda: out.append(pool.getconn("k", timeout=5)))
        t.start()
        while not pool._waiters:
            time.sleep(0.005)
        pool.putconn(held)
        t.join(5)
        assert pool._used["k"] is out[0]
        assert pool.getconn("k") is out[0]
        pool.putconn(key="k")
        _engine_true(pool)


def test_closeall_wakes_waiters(dsn: str) -> None:
    pool = ThreadedConnectionPool(0, 1, dsn)
    pool.getconn()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn(timeout=10)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    while not pool._waiters:
        time.sleep(0.005)
    pool.closeall()
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed)
