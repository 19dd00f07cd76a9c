"""FastAPI: the lifespan opens the pool, the dependency commits or rolls back per request.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations,
which name a dependency made inside a function.
"""

import threading
from typing import Annotated

import anyio
import anyio.to_thread
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

from pgpool_async import AsyncConnection, AsyncConnectionPool
from pgpool_async.fastapi import connection_dependency, pool_lifespan

from .conftest import server_query


def make_app(dsn: str) -> tuple[FastAPI, AsyncConnectionPool, threading.Event]:
    pool = AsyncConnectionPool(1, 4, dsn, timeout=5)
    app = FastAPI(lifespan=pool_lifespan(pool))
    Conn = Annotated[AsyncConnection, Depends(connection_dependency(pool))]
    release = threading.Event()

    @app.post("/items/{name}")
    async def add(name: str, conn: Conn) -> dict[str, int]:
        await conn.execute("INSERT INTO api_items (name) VALUES (%s)", (name,))
        if name == "bad":
            raise HTTPException(status_code=400, detail="bad name")
        return {"count": await conn.fetchval("SELECT count(*) FROM api_items")}

    @app.get("/count")
    async def count(conn: Conn) -> dict[str, int]:
        return {"count": await conn.fetchval("SELECT count(*) FROM api_items")}

    @app.get("/block")
    def block() -> str:  # a sync endpoint: runs in anyio's default thread pool
        release.wait(10)
        return "done"

    return app, pool, release


def test_lifespan_dependency_commit_and_rollback(dsn: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS api_items; CREATE TABLE api_items (name text)")
    app, pool, _ = make_app(dsn)
    with TestClient(app) as client:
        assert not pool.closed and pool.get_stats()["pool_size"] >= 1
        assert client.post("/items/a").json() == {"count": 1}
        assert client.post("/items/bad").status_code == 400  # rolled back
        assert client.get("/count").json() == {"count": 1}
        assert server_query(dsn, "SELECT name FROM api_items") == [("a",)]
        assert pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"]  # all returned
    assert pool.closed


def test_busy_sync_endpoints_do_not_starve_the_pool(dsn: str) -> None:
    """anyio's default limiter full of blocked sync endpoints: async ones still work."""
    server_query(dsn, "DROP TABLE IF EXISTS api_items; CREATE TABLE api_items (name text)")
    app, _, release = make_app(dsn)
    with TestClient(app) as client:
        limiter = client.portal.call(anyio.to_thread.current_default_thread_limiter)
        client.portal.call(setattr, limiter, "total_tokens", 2)
        blockers = [threading.Thread(target=client.get, args=("/block",)) for _ in range(2)]
        for thread in blockers:
            thread.start()
        try:
            with pytest.raises(anyio.WouldBlock):
                client.portal.call(_wait_until_full, limiter)
            # The pool's own threads serve the async endpoint while the default ones
            # are all taken (the blockers hold them for up to 10 s).
            answers: list[object] = []
            post = threading.Thread(target=lambda: answers.append(client.post("/items/x").json()))
            post.start()
            post.join(5)
            assert answers == [{"count": 1}]
        finally:
            release.set()
            for thread in blockers:
                thread.join()
            client.portal.call(setattr, limiter, "total_tokens", 40)


async def _wait_until_full(limiter: anyio.CapacityLimiter) -> None:
    """Wait for the blockers to take every token, then prove none is left."""
    with anyio.fail_after(5):
        while limiter.borrowed_tokens < limiter.total_tokens:
            await anyio.sleep(0.01)
    limiter.acquire_nowait()  # raises WouldBlock
