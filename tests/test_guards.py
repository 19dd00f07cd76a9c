"""The guards themselves: a libpq wait on the event loop is caught."""

from __future__ import annotations

import psycopg2
import pytest

from pgpool_async import ThreadedConnectionPool

from . import conftest

pytestmark = pytest.mark.single_io("the guards themselves, on the sync engine and raw psycopg2")


@pytest.mark.anyio
async def test_sync_engine_on_the_loop_is_caught(dsn: str) -> None:
    """Opening the sync engine on the loop (network I/O) trips the wait guard."""
    with pytest.raises(AssertionError, match="libpq network wait on the event loop"):
        ThreadedConnectionPool(1, 1, dsn)
    assert conftest._violations
    conftest._violations.clear()  # this test wanted exactly that


def test_sync_code_off_the_loop_is_allowed(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.close()
    assert not conftest._violations
