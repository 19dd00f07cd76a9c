"""A connect that fails never shows the password: not in the exception open()
raises, not in PoolTimeout's cause, not in the pool's log, not from the sync pools.

libpq quotes what it could not use, and a postgresql:// URI whose password holds an
unencoded '/' or '@' is read as the port or the host, so pieces of the password
reach libpq's own message. Real server: the DSN points at the suite's server.
"""

from __future__ import annotations

import logging

import psycopg2
import pytest
from psycopg2.extensions import parse_dsn

from pgpool_async import AsyncConnectionPool, PoolTimeout
from pgpool_async.sync import ThreadedConnectionPool

pytestmark = [pytest.mark.anyio, pytest.mark.single_io("the connect path is the same on both")]

PIECES = ("Xk9mQ2vR", "pL7wZ4t")


def _uri(dsn: str, separator: str) -> str:
    params = parse_dsn(dsn)
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return (
        f"postgresql://{params.get('user', 'postgres')}:{PIECES[0]}{separator}{PIECES[1]}"
        f"@{host}:{port}/{params.get('dbname', 'postgres')}"
    )


def _text(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("separator", ["/", "@"])
async def test_a_uri_password_with_a_slash_or_at_never_shows(
    dsn: str, separator: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pgpool_async")
    uri = _uri(dsn, separator)
    with pytest.raises((psycopg2.Error, PoolTimeout)) as info:
        async with AsyncConnectionPool(1, 2, uri, timeout=2):
            pass
    shown = _text(info.value) + "\n" + caplog.text
    for piece in PIECES:
        assert piece not in shown, shown
    assert "percent-encoded" in shown  # the message names the fix


@pytest.mark.parametrize("separator", ["/", "@"])
def test_the_sync_pool_never_shows_it_either(dsn: str, separator: str) -> None:
    with pytest.raises(psycopg2.Error) as info:
        ThreadedConnectionPool(1, 2, _uri(dsn, separator))
    shown = _text(info.value)
    for piece in PIECES:
        assert piece not in shown, shown
    assert "percent-encoded" in shown


async def test_an_error_without_the_password_is_psycopg2s_own(dsn: str) -> None:
    params = parse_dsn(dsn)
    params["dbname"] = "no_such_database_here"
    with pytest.raises(psycopg2.OperationalError) as info:
        async with AsyncConnectionPool(1, 2, **params, timeout=2):
            pass
    assert 'database "no_such_database_here" does not exist' in str(info.value)
    assert "percent-encoded" not in str(info.value)
