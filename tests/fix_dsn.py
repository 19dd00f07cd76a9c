"""DSN helpers for tests: ``PGPOOL_TEST_DSN`` may be a libpq ``key=value`` string or a
``postgresql://`` URL (the form most users have), so tests never glue keywords onto a
DSN or split it on spaces; they go through psycopg2's own ``make_dsn``/``parse_dsn``."""

from __future__ import annotations

from urllib.parse import quote, urlencode

import psycopg2.extensions
import pytest


def with_params(dsn: str, **params: str | int) -> str:
    """``dsn`` (either form) with ``params`` added or replaced, as a ``key=value`` string."""
    return psycopg2.extensions.make_dsn(dsn, **params)


def tcp_address(dsn: str) -> tuple[str, int]:
    """The (host, port) a TCP proxy forwards to for ``dsn`` (libpq's defaults for what
    is not given). A Unix-socket DSN has no such address: the test is skipped."""
    params = psycopg2.extensions.parse_dsn(dsn)
    host = params.get("hostaddr") or params.get("host") or "localhost"
    if host.startswith("/"):
        pytest.skip(f"needs a TCP address, and the test DSN names a Unix socket ({host})")
    return host, int(params.get("port") or 5432)


def as_url(dsn: str) -> str:
    """``dsn`` (either form) as a ``postgresql://`` URL; parameters other than the
    user, password, host, port and database name go in the query string."""
    params = psycopg2.extensions.parse_dsn(dsn)
    user = quote(params.pop("user", ""), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{quote(password, safe='')}@" if password is not None else (f"{user}@" if user else "")
    host = params.pop("host", "")
    port = params.pop("port", None)
    netloc = f"{auth}{quote(host, safe=',')}{f':{port}' if port else ''}"
    dbname = quote(params.pop("dbname", ""), safe="")
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{netloc}/{dbname}{query}"
