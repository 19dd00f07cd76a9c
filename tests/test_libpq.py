"""The libpq psycopg2 loaded, reached through ctypes: cancel, socket shutdown, network defaults."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from pgpool_async import AsyncConnectionPool, _libpq

from .conftest import _loop_guard_off


def _run_in_thread(raw: Any, sql: str) -> tuple[threading.Thread, list[BaseException | None]]:
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            with raw.cursor() as cur:
                cur.execute(sql)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_finds_the_libpq_psycopg2_uses() -> None:
    lib = _libpq.libpq()
    assert lib is not None, "no libpq mapped in this process (Linux only)"
    assert lib.PQlibVersion() == psycopg2.extensions.libpq_version()
    if psycopg2.extensions.libpq_version() >= 170000:
        assert hasattr(lib, "PQcancelPoll")


def test_cancel_stops_a_running_statement(dsn: str) -> None:
    with _loop_guard_off():
        raw = psycopg2.connect(dsn)
        try:
            thread, outcome = _run_in_thread(raw, "SELECT pg_sleep(30)")
            time.sleep(0.3)
            started = time.monotonic()
            assert _libpq.cancel(raw, timeout=5) is True
            thread.join(10)
            assert not thread.is_alive()
            assert isinstance(outcome[0], psycopg2.errors.QueryCanceled)
            assert time.monotonic() - started < 5
            raw.rollback()
            with raw.cursor() as cur:  # the connection is fine afterwards
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        finally:
            raw.close()
    assert _libpq.cancel(raw) is False  # closed: nothing to cancel, no error


def test_shutdown_socket_fails_a_blocked_worker_and_marks_the_connection(dsn: str) -> None:
    with _loop_guard_off():
        raw = psycopg2.connect(dsn)
        try:
            thread, outcome = _run_in_thread(raw, "SELECT pg_sleep(30)")
            time.sleep(0.3)
            assert not _libpq.was_shut_down(raw)
            _libpq.shutdown_socket(raw)
            thread.join(5)
            assert not thread.is_alive()
            assert isinstance(outcome[0], psycopg2.OperationalError)
            assert raw.closed and _libpq.was_shut_down(raw)
            _libpq.shutdown_socket(raw)  # twice, and on a closed connection: no error
        finally:
            raw.close()


def test_network_defaults_reach_libpq(dsn: str) -> None:
    """The pool's connections carry the keepalive and tcp_user_timeout defaults; a
    value the user gave is kept."""
    params = _libpq.with_network_defaults({}, {}, 30.0)
    assert params["keepalives"] == 1 and params["keepalives_idle"] == 10
    assert params["tcp_user_timeout"] == 15000
    assert _libpq.with_network_defaults({}, {}, 4.0)["tcp_user_timeout"] == 10000
    assert _libpq.with_network_defaults({}, {}, float("inf"))["tcp_user_timeout"] == 30000
    off = _libpq.with_network_defaults({}, {"keepalives": "0"}, 30.0)
    assert "keepalives" not in off and "keepalives_idle" not in off

    async def connection_params(**kwargs: Any) -> dict[str, str]:
        async with AsyncConnectionPool(1, 1, dsn, **kwargs) as pool:
            async with pool.connection() as conn:
                return dict(conn.raw.get_dsn_parameters())

    import anyio

    with _loop_guard_off():
        got = anyio.run(connection_params)
        mine = anyio.run(lambda: connection_params(keepalives_idle=5, tcp_user_timeout=20000))
    assert got["keepalives"] == "1" and got["keepalives_idle"] == "10"
    assert got["keepalives_interval"] == "3" and got["keepalives_count"] == "3"
    assert got["tcp_user_timeout"] == "15000"
    assert mine["keepalives_idle"] == "5" and mine["tcp_user_timeout"] == "20000"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_timeout_cancels_the_statement_and_the_connection_is_reused(dsn: str) -> None:
    """A healthy network: the cancel reaches the server well within the grace
    period, so the connection is not shut down but kept."""
    import anyio

    async with AsyncConnectionPool(1, 1, dsn) as pool:
        async with pool.connection() as conn:
            first = conn.raw
            with anyio.move_on_after(0.3):
                await conn.fetchval("SELECT pg_sleep(30)")
            assert not _libpq.was_shut_down(first)
            await conn.rollback()  # (the cancelled statement failed the transaction)
        assert await pool.fetchval("SELECT 1") == 1
        async with pool.connection() as conn:
            assert conn.raw is first
