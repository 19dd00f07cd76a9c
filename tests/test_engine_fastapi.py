"""FastAPI over an engine: ``AppPool.over(engine)``, a new face per app run, one engine.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations.
"""

import threading

import psycopg2.pool
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pgpool_async import PoolConfigError, SimpleConnectionPool, ThreadedConnectionPool
from pgpool_async.fastapi import AppPool, Connection


@pytest.mark.parametrize("kind", [psycopg2.pool.ThreadedConnectionPool, ThreadedConnectionPool])
def test_app_pool_over_an_engine(dsn: str, app_name: str, kind: type) -> None:
    engine = kind(1, 2, dsn, application_name=app_name)
    try:
        db = AppPool.over(engine, timeout=5)
        app = FastAPI(lifespan=db.lifespan)
        Conn = Connection(db)

        @app.get("/one")
        async def one(conn: Conn) -> dict[str, int]:
            return {"one": await conn.fetchval("SELECT 1"), "used": len(engine._used)}

        @app.get("/stats")
        async def stats() -> dict[str, int]:
            return db.pool.get_stats()

        for _ in range(2):  # two app runs: a new face each, the same engine
            with TestClient(app) as client:
                held = engine.getconn()  # a thread holds one of the two meanwhile
                try:
                    assert client.get("/one").json() == {"one": 1, "used": 2}
                finally:
                    engine.putconn(held)
                assert client.get("/stats").json()["engine_used"] == 0
            assert not engine.closed
            assert not engine._used
        # A thread and the app at once, through the same budget.
        with TestClient(app) as client:
            errors: list[BaseException] = []

            def thread_job() -> None:
                try:
                    for _ in range(20):
                        conn = engine.getconn(timeout=5) if kind is ThreadedConnectionPool else None
                        if conn is None:
                            continue
                        engine.putconn(conn)
                except BaseException as exc:
                    errors.append(exc)

            t = threading.Thread(target=thread_job)
            t.start()
            for _ in range(20):
                assert client.get("/one").json()["one"] == 1
            t.join(10)
            assert not errors
    finally:
        engine.closeall()


def test_app_pool_over_refuses_a_simple_pool(dsn: str) -> None:
    engine = SimpleConnectionPool(0, 1, dsn)
    with pytest.raises(PoolConfigError, match="not thread-safe"):
        AppPool.over(engine)
