"""The shortest complete FastAPI app on the pool: a write, a read, a psycopg2 report, a COPY stream.

Run: ``PGPOOL_DSN=... python examples/fastapi_quickstart.py`` (``pip install -e '.[fastapi]'``), then
``curl -X POST localhost:8000/items/apple``. ``PORT`` picks the port (default 8000).
The larger ``examples/fastapi_app.py`` adds transfers, 409s and a deferred foreign key.
"""

from __future__ import annotations

# --8<-- [start:app]
import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse

from pgpool_async.copying import copy_out_stream
from pgpool_async.fastapi import (
    AppPool,
    Connection,
    Pool,
    SyncConnection,
    health_router,
    install_error_handlers,
)

dsn = os.environ.get("PGPOOL_DSN", "")
db = AppPool(1, 10, dsn, timeout=5)  # AsyncConnectionPool's arguments; a new pool at each startup


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with db.lifespan(app):  # the pool opens here and closes at shutdown
        await db.pool.execute("CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, name text NOT NULL)")
        yield


app = FastAPI(lifespan=lifespan)  # or FastAPI(lifespan=db.lifespan) when there is no schema to set up
install_error_handlers(app)  # PoolTimeout/TooManyRequests/PoolClosed -> 503 + Retry-After
app.include_router(health_router(db))  # GET /health: SELECT 1 + the pool's stats, or 503

Conn = Connection(db)  # a transaction per request, COMMITTED BEFORE THE RESPONSE
DB = Pool(db)  # the running pool: for one-hop calls (each borrows, commits, returns)
LegacyConn = SyncConnection(db)  # a raw psycopg2 connection for sync `def` endpoints


@app.post("/items/{name}")
async def add(name: str, conn: Conn) -> int:  # committed before the 2xx; rolled back if it raises
    return await conn.fetchval("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,))


@app.get("/items/{item_id}")
async def get(item_id: int, pool: DB) -> dict[str, str]:  # no connection held by a dependency
    name = await pool.fetchval("SELECT name FROM items WHERE id = %s", (item_id,))
    if name is None:
        raise HTTPException(404, f"no item {item_id}")
    return {"name": name}


@app.get("/report")
def report(raw: LegacyConn) -> dict[str, int]:  # your psycopg2 code, in FastAPI's thread pool
    with raw.cursor() as cur:
        cur.execute("SELECT count(*) FROM items")
        return {"items": cur.fetchone()[0]}


@app.get("/export.csv")
async def export() -> StreamingResponse:  # a COPY streamed in chunks; a client that hangs up stops it
    return StreamingResponse(copy_out_stream(db.pool, "COPY items TO STDOUT (FORMAT csv)"))


# --8<-- [end:app]


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), log_level="warning")
