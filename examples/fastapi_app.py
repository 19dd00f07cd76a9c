"""A small bank on FastAPI: every write committed before its 2xx, errors as status codes.

Run: ``PGPOOL_DSN=... python examples/fastapi_app.py`` (needs ``pip install -e '.[fastapi]'``),
then e.g. ``curl -X POST localhost:8000/transfers -H 'content-type: application/json'
-d '{"src": 1, "dst": 2, "amount": 5}'``. ``PORT`` picks the port (default 8000).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any

import psycopg2.errors
import uvicorn
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0));
CREATE TABLE IF NOT EXISTS audit (
    id serial PRIMARY KEY,
    account int REFERENCES accounts DEFERRABLE INITIALLY DEFERRED,  -- checked at COMMIT
    note text NOT NULL
);
"""

# A new pool at each startup (the app can start twice in a test suite); no I/O here.
db = AppPool(1, 10, os.environ.get("PGPOOL_DSN", ""), timeout=5, application_name="fastapi_app")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with db.lifespan(app):
        await db.pool.execute(SCHEMA)
        yield


app = FastAPI(lifespan=lifespan)
install_error_handlers(app)  # no connection in time -> 503 + Retry-After
app.include_router(health_router(db))  # GET /health: SELECT 1 and the pool's stats

Conn = Connection(db)  # a transaction per request, committed before the response
DB = Pool(db)  # the running pool: one-hop calls (borrow, run, commit, return), no generator dependency
LegacyConn = SyncConnection(db)  # a raw psycopg2 connection for sync endpoints


@dataclasses.dataclass
class Transfer:
    src: int
    dst: int
    amount: int


@dataclasses.dataclass
class Note:
    account: int
    note: str


@app.put("/accounts/{account}")
async def open_account(account: int, balance: int, conn: Conn) -> dict[str, int]:
    await conn.execute(
        "INSERT INTO accounts VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET balance = excluded.balance",
        (account, balance),
    )
    return {"id": account, "balance": balance}


@app.get("/accounts/{account}")
async def balance(account: int, pool: DB) -> dict[str, int]:
    value = await pool.fetchval("SELECT balance FROM accounts WHERE id = %s", (account,))
    if value is None:
        raise HTTPException(404, f"no account {account}")
    return {"id": account, "balance": value}


# --8<-- [start:transfer]
@app.post("/transfers")
async def transfer(t: Transfer, conn: Conn) -> dict[str, Any]:
    """Both UPDATEs or neither: an exception rolls the transaction back."""
    try:
        moved = await conn.execute(
            "UPDATE accounts SET balance = balance - %s WHERE id = %s", (t.amount, t.src)
        )
        moved += await conn.execute(
            "UPDATE accounts SET balance = balance + %s WHERE id = %s", (t.amount, t.dst)
        )
    except psycopg2.errors.CheckViolation:
        raise HTTPException(409, "insufficient funds") from None  # rolled back
    if moved != 2:
        raise HTTPException(404, "no such account")  # rolled back too
    return {"ok": True, **dataclasses.asdict(t)}


# --8<-- [end:transfer]


@app.post("/audit")
async def audit(n: Note, conn: Conn) -> dict[str, int]:
    """The foreign key is checked at COMMIT: an unknown account is a 500, never a 2xx."""
    note_id = await conn.fetchval(
        "INSERT INTO audit (account, note) VALUES (%s, %s) RETURNING id", (n.account, n.note)
    )
    return {"id": note_id}


def legacy_totals(raw: Any) -> dict[str, int]:
    """Existing psycopg2 code, unchanged."""
    with raw.cursor() as cur:
        cur.execute("SELECT count(*), coalesce(sum(balance), 0) FROM accounts")
        accounts, total = cur.fetchone()
    return {"accounts": accounts, "total": total}


@app.get("/report")
async def report(conn: Conn) -> dict[str, int]:
    return await conn.run_sync(legacy_totals)  # in one of the pool's worker threads


@app.get("/report/sync")
def report_sync(raw: LegacyConn) -> dict[str, int]:
    return legacy_totals(raw)  # a sync endpoint: FastAPI's thread pool, the pool's connection


@app.get("/export.csv")
async def export() -> StreamingResponse:
    """COPY streamed to the client; a client that goes away stops it, the connection stays clean."""
    chunks = copy_out_stream(
        db.pool, "COPY (SELECT id, balance FROM accounts ORDER BY id) TO STDOUT (FORMAT csv)"
    )
    return StreamingResponse(chunks, media_type="text/csv")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), log_level="warning")
