"""is_permanent_connect_error against real servers: what cannot heal, and what can."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import psycopg2
import pytest

from pgpool_async.errors import PoolTimeout, is_permanent_connect_error
from pgpool_async.testing.throwaway import ThrowawayPostgres, run_sql

from .fix_dsn import with_params

pytestmark = pytest.mark.single_io("connect errors on raw psycopg2 connections: no pool statements")


def connect_error(dsn: str) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as info:
        psycopg2.connect(dsn, connect_timeout=5).close()
    return info.value


def test_unknown_database_and_role_are_permanent(dsn: str) -> None:
    missing_db = connect_error(with_params(dsn, dbname="no_such_database_x"))
    assert 'database "no_such_database_x" does not exist' in str(missing_db)
    assert is_permanent_connect_error(missing_db)
    missing_role = connect_error(with_params(dsn, user="no_such_role_x"))
    assert is_permanent_connect_error(missing_role)


@pytest.mark.parametrize(
    "bad",
    [
        "host=127.0.0.1 port=54x2",
        "postgresql://u@127.0.0.1:99999999/db",
        "nonsense dsn",
        "host=127.0.0.1 sslmode=nope",
    ],
)
def test_unparsable_dsns_are_permanent(bad: str) -> None:
    assert is_permanent_connect_error(connect_error(bad))


def test_transient_errors_are_not(dsn: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on: refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = connect_error(f"host=127.0.0.1 port={port} dbname=x")
    assert not is_permanent_connect_error(refused)
    # Too many connections: a server that is full now may not be in a second.
    run_sql(dsn, "DROP ROLE IF EXISTS limited_role; CREATE ROLE limited_role LOGIN CONNECTION LIMIT 0")
    try:
        full = connect_error(with_params(dsn, user="limited_role"))
        assert "too many connections" in str(full)
        assert not is_permanent_connect_error(full)
    finally:
        run_sql(dsn, "DROP ROLE limited_role")
    assert not is_permanent_connect_error(PoolTimeout("couldn't get a connection"))
    assert not is_permanent_connect_error(ValueError("not psycopg2"))


@pytest.fixture(scope="module")
def password_server() -> Iterator[ThrowawayPostgres]:
    """A throwaway server where every role but postgres logs in with a password (SCRAM)."""
    hba_dir = tempfile.mkdtemp(prefix="pgpool-hba-")
    os.chmod(hba_dir, 0o755)  # the server may run as another (unprivileged) user
    hba = os.path.join(hba_dir, "pg_hba.conf")
    with open(hba, "w") as f:
        f.write("host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    os.chmod(hba, 0o644)
    server = ThrowawayPostgres(settings={"hba_file": hba})
    server.start()
    try:
        run_sql(server.dsn, "CREATE ROLE alice LOGIN PASSWORD 'right-password'")
        yield server
    finally:
        server.destroy()
        os.remove(hba)
        os.rmdir(hba_dir)


def test_bad_or_missing_password_is_permanent(password_server: ThrowawayPostgres) -> None:
    good = with_params(password_server.dsn, user="alice", password="right-password")
    psycopg2.connect(good).close()  # the set-up works: the right password gets in
    wrong = connect_error(with_params(good, password="wrong-password"))
    assert 'password authentication failed for user "alice"' in str(wrong)
    assert "wrong-password" not in str(wrong)
    assert is_permanent_connect_error(wrong)
    missing = connect_error(with_params(password_server.dsn, user="alice"))
    assert is_permanent_connect_error(missing)
