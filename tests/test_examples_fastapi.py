"""examples/fastapi_app.py through a real uvicorn process and real HTTP (httpx).

What the issue found broken with FastAPI's default dependency scope: a COMMIT
that fails after a 2xx, and reads that miss a write already acknowledged.
Here: the failed COMMIT is a 5xx, every read after a 2xx sees the write, and
clients that vanish mid-request or mid-stream leave the pool clean.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import python_args, server_query
from .webserver import serving

APP = "fastapi_app"  # the example's application_name


@pytest.fixture(scope="module")
def server(dsn: str, pool_io: str | None) -> Iterator[str]:
    server_query(dsn, "DROP TABLE IF EXISTS audit, accounts")
    with serving(sys.executable, python_args(["examples/fastapi_app.py"], pool_io), dsn) as (base, _):
        yield base


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def pool_is_clean(client: httpx.Client, dsn: str, timeout: float = 10.0) -> dict[str, Any]:
    """Every connection back in the pool, and none of the app's backends in a
    transaction or a COPY on the server. Polls: a request the client gave up
    on may still be finishing."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.get("/health").json()["pool"]
        busy = server_query(
            dsn,
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s "
            "AND (state <> 'idle' OR query ILIKE 'COPY%%') AND pid <> pg_backend_pid()",
            (APP,),
        )
        # /health's own probe is one connection taken and returned: available == size.
        if stats["pool_available"] == stats["pool_size"] and not busy:
            return stats
        assert time.monotonic() < deadline, f"not clean: {stats}, busy backends {busy}"
        time.sleep(0.05)


def test_deferred_fk_failing_at_commit_is_a_5xx(client: httpx.Client, dsn: str) -> None:
    assert client.put("/accounts/1", params={"balance": 100}).status_code == 200
    ok = client.post("/audit", json={"account": 1, "note": "fine"})
    assert ok.status_code == 200
    bad = client.post("/audit", json={"account": 999_999, "note": "no such account"})
    assert bad.status_code == 500  # the COMMIT failed: never a 2xx
    notes = server_query(dsn, "SELECT note FROM audit WHERE note IN ('fine', 'no such account')")
    assert notes == [("fine",)]
    pool_is_clean(client, dsn)


def test_every_read_after_a_2xx_write_sees_it(server: str, dsn: str) -> None:
    """Writes on one HTTP connection, reads on another (so on other pool
    connections too): each read must see the write acknowledged just before."""
    with (
        httpx.Client(base_url=server, timeout=30) as writer,
        httpx.Client(base_url=server, timeout=30) as reader,
    ):
        stale = 0
        for i in range(300):
            assert writer.put(f"/accounts/{1000 + i % 7}", params={"balance": i}).status_code == 200
            got = reader.get(f"/accounts/{1000 + i % 7}").json()
            stale += got["balance"] != i
        assert stale == 0


def test_plain_read_through_the_pool_dependency(client: httpx.Client, dsn: str) -> None:
    """GET /accounts/{id} takes Pool(db): a one-hop fetchval, nothing held by a dependency."""
    assert client.put("/accounts/30", params={"balance": 12}).status_code == 200
    assert client.get("/accounts/30").json() == {"id": 30, "balance": 12}
    missing = client.get("/accounts/987654")
    assert missing.status_code == 404 and missing.json() == {"detail": "no account 987654"}
    pool_is_clean(client, dsn)


def test_transfer_commits_rolls_back_and_answers_409(client: httpx.Client, dsn: str) -> None:
    client.put("/accounts/10", params={"balance": 50})
    client.put("/accounts/11", params={"balance": 0})
    assert client.post("/transfers", json={"src": 10, "dst": 11, "amount": 30}).status_code == 200
    assert client.post("/transfers", json={"src": 10, "dst": 11, "amount": 30}).status_code == 409
    assert client.post("/transfers", json={"src": 10, "dst": 12345, "amount": 5}).status_code == 404
    assert client.get("/accounts/10").json()["balance"] == 20  # the 409 and 404 were rolled back
    assert client.get("/accounts/11").json()["balance"] == 30


def test_legacy_reports_async_and_sync_agree(client: httpx.Client, dsn: str) -> None:
    expected = server_query(dsn, "SELECT count(*), coalesce(sum(balance), 0) FROM accounts")[0]
    for path in ("/report", "/report/sync"):
        assert client.get(path).json() == {"accounts": expected[0], "total": expected[1]}


def test_export_streams_every_row(client: httpx.Client, dsn: str) -> None:
    rows = server_query(dsn, "SELECT id, balance FROM accounts ORDER BY id")
    body = client.get("/export.csv").text
    assert body == "".join(f"{a},{b}\n" for a, b in rows)


def test_client_disconnecting_mid_stream_leaves_the_pool_clean(client: httpx.Client, dsn: str) -> None:
    # Enough rows that the COPY is still running when the client goes away (~3 MB of CSV).
    server_query(
        dsn, "INSERT INTO accounts SELECT g, g FROM generate_series(100000, 400000) g ON CONFLICT DO NOTHING"
    )
    try:
        for _ in range(3):
            with client.stream("GET", "/export.csv") as answer:
                assert answer.status_code == 200
                first = next(answer.iter_bytes())
                assert first  # streaming has started; now hang up
        stats = pool_is_clean(client, dsn)
        assert stats["pool_size"] <= 10
    finally:
        server_query(dsn, "DELETE FROM accounts WHERE id >= 100000")
    # The connections that ran the aborted COPYs work.
    assert client.get("/report").status_code == 200


def test_clients_vanishing_mid_request_leave_the_pool_clean(
    client: httpx.Client, server: str, dsn: str
) -> None:
    client.put("/accounts/20", params={"balance": 1000})
    client.put("/accounts/21", params={"balance": 1000})
    host, port = server.removeprefix("http://").split(":")

    def hang_up_after_sending(body_complete: bool) -> None:
        body = b'{"src": 20, "dst": 21, "amount": 1}'
        head = (
            f"POST /transfers HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body) if body_complete else len(body) + 50}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)  # then close: before the answer, or mid-body

    threads = [threading.Thread(target=hang_up_after_sending, args=(i % 2 == 0,)) for i in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool_is_clean(client, dsn)
    balances = [client.get(f"/accounts/{a}").json()["balance"] for a in (20, 21)]
    assert sum(balances) == 2000  # every transfer whole or not at all
    assert balances[1] - 1000 <= 30  # at most the 30 complete requests moved money
