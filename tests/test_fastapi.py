"""FastAPI: the lifespan opens the pool, the dependency commits or rolls back per request.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations,
which name a dependency made inside a function.
"""

import threading
import time
from typing import Annotated

import anyio
import anyio.to_thread
import psycopg2.errors
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from pgpool_async import AsyncConnection, AsyncConnectionPool, PoolClosed
from pgpool_async.copying import copy_out_stream
from pgpool_async.fastapi import (
    AppPool,
    Connection,
    Pool,
    SyncConnection,
    connection_dependency,
    health_router,
    install_error_handlers,
    pool_dependency,
    pool_lifespan,
)

from .conftest import server_query


def make_app(dsn: str) -> tuple[FastAPI, AsyncConnectionPool, threading.Event]:
    pool = AsyncConnectionPool(1, 4, dsn, timeout=5)
    app = FastAPI(lifespan=pool_lifespan(pool))
    # The spelled-out form of Connection(pool): scope="function" commits before the response.
    Conn = Annotated[AsyncConnection, Depends(connection_dependency(pool), scope="function")]
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


# -- Connection, AppPool, SyncConnection, error handlers, health ---------------------------


def make_bank(dsn: str, **pool_kwargs: object) -> tuple[FastAPI, AppPool]:
    db = AppPool(1, 4, dsn, timeout=5, **pool_kwargs)
    app = FastAPI(lifespan=db.lifespan)
    install_error_handlers(app, retry_after=2.5)
    app.include_router(health_router(db))
    Conn = Connection(db)
    Auto = Connection(db, autocommit=True)
    Raw = SyncConnection(db, limit=1)
    DB = Pool(db)

    @app.post("/tx/{name}")
    async def tx(name: str, conn: Conn, fail: bool = False) -> dict[str, bool]:
        await conn.execute("INSERT INTO api_items (name) VALUES (%s)", (name,))
        if fail:
            raise HTTPException(400, "rolled back")
        return {"autocommit": conn.autocommit}

    @app.post("/auto/{name}")
    async def auto(name: str, conn: Auto, fail: bool = False) -> dict[str, bool]:
        await conn.execute("INSERT INTO api_items (name) VALUES (%s)", (name,))
        if fail:
            raise HTTPException(400, "already committed: autocommit")
        return {"autocommit": conn.autocommit}

    @app.post("/deferred/{ref}")
    async def deferred(ref: int, conn: Conn) -> dict[str, bool]:
        await conn.execute("INSERT INTO api_child (ref) VALUES (%s)", (ref,))
        return {"ok": True}

    @app.post("/sync/{name}")
    def sync(name: str, raw: Raw, fail: bool = False) -> dict[str, str]:
        with raw.cursor() as cur:
            cur.execute("INSERT INTO api_items (name) VALUES (%s)", (name,))
        if fail:
            raise HTTPException(400, "rolled back")
        return {"thread": threading.current_thread().name}

    @app.get("/pool/{name}")
    async def pool_read(name: str, pool: DB) -> dict[str, object]:
        stats = pool.get_stats()  # the dependency lends nothing: none lent when the endpoint starts
        assert stats["pool_size"] == stats["pool_available"], stats
        row = await pool.fetchone(
            "SELECT name, count(*) FROM api_items WHERE name = %s GROUP BY name", (name,)
        )
        return {"row": list(row) if row else None, "running": pool is db.pool}

    @app.post("/pool/{name}")
    async def pool_write(name: str, pool: DB) -> dict[str, int]:
        # One hop: borrowed, run, committed and returned before execute() returns.
        return {"rows": await pool.execute("INSERT INTO api_items (name) VALUES (%s)", (name,))}

    @app.post("/pool-block/{name}")
    async def pool_block(name: str, pool: DB, fail: bool = False) -> dict[str, bool]:
        async with pool.connection() as conn:  # committed when the block exits, rolled back if it raises
            await conn.execute("INSERT INTO api_items (name) VALUES (%s)", (name,))
            if fail:
                raise HTTPException(400, "rolled back")
        return {"ok": True}

    return app, db


def names(dsn: str) -> list[str]:
    return sorted(r[0] for r in server_query(dsn, "SELECT name FROM api_items"))


@pytest.fixture
def bank_tables(dsn: str) -> None:
    server_query(
        dsn,
        "DROP TABLE IF EXISTS api_items, api_child, api_parent; CREATE TABLE api_items (name text);"
        "CREATE TABLE api_parent (id int PRIMARY KEY); INSERT INTO api_parent VALUES (1);"
        "CREATE TABLE api_child (ref int REFERENCES api_parent DEFERRABLE INITIALLY DEFERRED)",
    )


@pytest.mark.usefixtures("bank_tables")
def test_connection_commits_before_the_response_and_rolls_back_on_error(dsn: str) -> None:
    app, _ = make_bank(dsn)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/tx/a").json() == {"autocommit": False}
        assert client.post("/tx/b", params={"fail": True}).status_code == 400
        assert names(dsn) == ["a"]
        assert client.post("/deferred/1").status_code == 200
        failed = client.post("/deferred/2")  # the foreign key fails at COMMIT
        assert failed.status_code == 500
        assert failed.json() == {"detail": "database error", "sqlstate": "23503"}
        assert server_query(dsn, "SELECT ref FROM api_child") == [(1,)]


@pytest.mark.usefixtures("bank_tables")
def test_autocommit_connection_and_the_pool_mode_after_it(dsn: str) -> None:
    app, db = make_bank(dsn)
    with TestClient(app) as client:
        assert client.post("/auto/x").json() == {"autocommit": True}
        assert client.post("/auto/y", params={"fail": True}).status_code == 400
        assert names(dsn) == ["x", "y"]  # autocommit: the error rolled nothing back
        # The same (only idle) connection goes on in transaction mode for the others.
        assert db.pool.get_stats()["pool_size"] == 1
        assert client.post("/tx/z", params={"fail": True}).json() == {"detail": "rolled back"}
        assert client.post("/tx/w").json() == {"autocommit": False}
        assert names(dsn) == ["w", "x", "y"]


@pytest.mark.usefixtures("bank_tables")
def test_app_pool_lets_the_app_start_twice(dsn: str) -> None:
    app, db = make_bank(dsn)
    pools = []
    for run in ("first", "second"):
        with TestClient(app) as client:
            assert client.post(f"/tx/{run}").status_code == 200
            pools.append(db.pool)
        assert pools[-1].closed
    assert pools[0] is not pools[1]
    assert names(dsn) == ["first", "second"]
    with pytest.raises(PoolClosed, match="lifespan"):
        db.pool  # noqa: B018 (the property raises outside the lifespan)


def test_a_plain_pool_starts_once_with_a_message_naming_the_fix(dsn: str) -> None:
    pool = AsyncConnectionPool(1, 2, dsn)
    app = FastAPI(lifespan=pool_lifespan(pool))
    with TestClient(app):
        pass
    with pytest.raises(PoolClosed, match="cannot be reopened"), TestClient(app):
        pass


def test_pool_errors_answer_503_with_retry_after(dsn: str) -> None:
    db = AppPool(1, 1, dsn, timeout=5)
    app = FastAPI(lifespan=db.lifespan)
    install_error_handlers(app, retry_after=2.5)
    Conn = Connection(db)

    @app.get("/exhaust")
    async def exhaust(conn: Conn) -> None:
        # A pool of one: this endpoint holds it and asks for a second.
        await db.pool.fetchval("SELECT 1", timeout=0.05)

    with TestClient(app) as client:
        answer = client.get("/exhaust")
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "3"
        assert "couldn't get a connection" in answer.json()["detail"]


@pytest.mark.usefixtures("bank_tables")
def test_health_reports_stats_and_503_outside_the_lifespan(dsn: str) -> None:
    app, _ = make_bank(dsn)
    with TestClient(app) as client:
        body = client.get("/health").json()
        assert body["status"] == "ok" and body["pool"]["pool_max"] == 4
    outside = TestClient(app).get("/health")  # no lifespan: no pool
    assert outside.status_code == 503 and outside.json()["status"] == "unavailable"


@pytest.mark.usefixtures("bank_tables")
def test_sync_endpoints_get_a_raw_connection_under_their_own_limit(dsn: str) -> None:
    app, db = make_bank(dsn)
    with TestClient(app) as client:
        assert client.post("/sync/s1").json()["thread"] != threading.main_thread().name
        assert client.post("/sync/s2", params={"fail": True}).status_code == 400
        assert names(dsn) == ["s1"]

        # limit=1: however many sync endpoints run, at most one connection is theirs;
        # an async endpoint still gets one at once.
        release = threading.Event()
        held: list[int] = []

        @app.post("/sync-hold")
        def hold(raw: SyncConnection(db, limit=1)) -> None:  # type: ignore[valid-type]
            held.append(1)
            release.wait(10)

        threads = [threading.Thread(target=client.post, args=("/sync-hold",)) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 5
            while not held:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)  # give the others a chance to (wrongly) get in
            assert len(held) == 1
            assert client.post("/tx/async-ok").status_code == 200
        finally:
            release.set()
            for thread in threads:
                thread.join()
        assert len(held) == 3
        stats = db.pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"]


# -- Pool: the running pool, no generator dependency ------------------------------------


def all_returned(db: AppPool) -> None:
    stats = db.pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"] >= 1, stats
    assert stats["requests_waiting"] == 0, stats


@pytest.mark.usefixtures("bank_tables")
def test_pool_dependency_injects_the_running_pool_of_each_app_run(dsn: str) -> None:
    app, db = make_bank(dsn)
    server_query(dsn, "INSERT INTO api_items VALUES ('seed'), ('seed')")
    pools = []
    for _ in range(2):  # an AppPool builds a new pool per run: the dependency follows it
        with TestClient(app) as client:
            answer = client.get("/pool/seed")
            assert answer.status_code == 200
            assert answer.json() == {"row": ["seed", 2], "running": True}
            assert client.get("/pool/nobody").json() == {"row": None, "running": True}
            all_returned(db)  # the dependency lends nothing; the one-hop calls gave theirs back
            pools.append(db.pool)
    assert pools[0] is not pools[1] and pools[0].closed and pools[1].closed


@pytest.mark.usefixtures("bank_tables")
def test_pool_dependency_writes_are_committed_when_the_2xx_arrives(dsn: str) -> None:
    app, db = make_bank(dsn)
    with TestClient(app) as client:
        for i in range(20):
            assert client.post(f"/pool/w{i}").json() == {"rows": 1}
            # Another connection (not the pool's) sees the write as soon as the 2xx is here.
            assert server_query(dsn, "SELECT count(*) FROM api_items WHERE name = %s", (f"w{i}",)) == [(1,)]
            assert client.get(f"/pool/w{i}").json() == {"row": [f"w{i}", 1], "running": True}
        # The endpoint's own `async with pool.connection()`: committed inside the endpoint,
        # rolled back when the block raises.
        assert client.post("/pool-block/b1").json() == {"ok": True}
        assert server_query(dsn, "SELECT count(*) FROM api_items WHERE name = 'b1'") == [(1,)]
        assert client.post("/pool-block/b2", params={"fail": True}).status_code == 400
        assert server_query(dsn, "SELECT count(*) FROM api_items WHERE name = 'b2'") == [(0,)]
        all_returned(db)
        assert db.pool.get_stats()["pool_size"] <= 4


@pytest.mark.usefixtures("bank_tables")
def test_pool_dependency_outside_the_lifespan_is_pool_closed_and_a_503(dsn: str) -> None:
    app, db = make_bank(dsn)  # with install_error_handlers(retry_after=2.5)
    for _ in range(2):  # before the first startup, then after a shutdown
        answer = TestClient(app).get("/pool/x")  # no `with`: no lifespan, no pool
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "3"
        assert "lifespan" in answer.json()["detail"]
        with TestClient(app) as client:
            assert client.get("/pool/x").status_code == 200

    # Without the handlers: PoolClosed itself, and the endpoint is not run.
    bare = FastAPI(lifespan=db.lifespan)
    ran: list[int] = []

    @bare.get("/read")
    async def read(pool: Pool(db)) -> None:  # type: ignore[valid-type]
        ran.append(1)

    with pytest.raises(PoolClosed, match="lifespan"):
        TestClient(bare).get("/read")
    assert not ran
    with pytest.raises(PoolClosed, match="lifespan"):
        anyio.run(pool_dependency(db))


def test_pool_dependency_of_a_plain_pool_returns_it(dsn: str) -> None:
    pool = AsyncConnectionPool(1, 2, dsn, timeout=5)
    assert anyio.run(pool_dependency(pool)) is pool  # no I/O: the pool is handed over as is
    app = FastAPI(lifespan=pool_lifespan(pool))

    @app.get("/one")
    async def one(injected: Pool(pool)) -> int:  # type: ignore[valid-type]
        value: int = await injected.fetchval("SELECT 1")
        return value

    with TestClient(app) as client:
        assert client.get("/one").json() == 1
        stats = pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"]


# -- COPY as an async iterator ---------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.usefixtures("no_wait_callback")
async def test_copy_out_stream_yields_every_row_in_chunks(dsn: str) -> None:
    async with AsyncConnectionPool(1, 2, dsn) as pool:
        chunks = [
            c
            async for c in copy_out_stream(
                pool, "COPY (SELECT g FROM generate_series(1, 20000) g) TO STDOUT", size=4096
            )
        ]
        assert b"".join(chunks) == b"".join(b"%d\n" % i for i in range(1, 20001))
        assert len(chunks) > 10 and all(isinstance(c, bytes) for c in chunks)
        assert max(map(len, chunks)) < 4096 + 100  # about size bytes each
        with pytest.raises(psycopg2.errors.UndefinedTable):
            async for _ in copy_out_stream(pool, "COPY no_such_table TO STDOUT"):
                pass


@pytest.mark.anyio
@pytest.mark.usefixtures("no_wait_callback")
async def test_copy_out_stream_closed_early_leaves_the_connection_clean(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        for _ in range(3):
            stream = copy_out_stream(pool, "COPY (SELECT g FROM generate_series(1, 2000000) g) TO STDOUT")
            async for chunk in stream:  # type: ignore[attr-defined]
                assert chunk
                break
            await stream.aclose()  # type: ignore[attr-defined]
            # The only connection comes back, clean, and works.
            with anyio.fail_after(10):
                assert await pool.fetchval("SELECT 42") == 42
        stats = pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"] == 1
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND state <> 'idle' AND pid <> pg_backend_pid()",
                (app_name,),
            )
            == 0
        )


@pytest.mark.anyio
@pytest.mark.usefixtures("bank_tables")
async def test_the_glue_never_blocks_the_loop(dsn: str) -> None:
    """The app served in the test's own event loop (asyncio and trio), with blockbuster
    and the libpq wait guard on: dependencies, commits, sync endpoints, health."""
    import httpx

    app, db = make_bank(dsn)
    async with db.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.post("/tx/a")).status_code == 200
            assert (await client.post("/auto/b")).status_code == 200
            assert (await client.post("/sync/c")).status_code == 200
            assert (await client.post("/deferred/9")).status_code == 500
            assert (await client.get("/health")).json()["status"] == "ok"
            assert (await client.post("/pool/d")).json() == {"rows": 1}
            assert (await client.post("/pool-block/e")).status_code == 200
            assert (await client.get("/pool/d")).json() == {"row": ["d", 1], "running": True}
            all_returned(db)
    assert names(dsn) == ["a", "b", "c", "d", "e"]


@pytest.mark.anyio
@pytest.mark.usefixtures("bank_tables", "no_wait_callback")
async def test_copy_stream_as_a_streaming_response(dsn: str) -> None:
    import httpx

    app, db = make_bank(dsn)

    @app.get("/export")
    async def export() -> StreamingResponse:
        return StreamingResponse(copy_out_stream(db.pool, "COPY api_items TO STDOUT"))

    async with db.lifespan(app):
        await db.pool.execute("INSERT INTO api_items SELECT 'n' || g FROM generate_series(1, 5000) g")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            lines = (await client.get("/export")).text.splitlines()
    assert sorted(lines) == sorted(f"n{i}" for i in range(1, 5001))
