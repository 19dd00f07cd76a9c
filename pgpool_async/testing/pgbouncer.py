"""A throwaway PgBouncer in front of a throwaway (or any) PostgreSQL server.

::

    with ThrowawayPostgres() as pg, ThrowawayPgBouncer(pg.port, pool_mode="transaction") as bouncer:
        conn = psycopg2.connect(bouncer.dsn)

The ``pgbouncer`` program comes from the system (Debian/Ubuntu: ``apt-get install
pgbouncer``), or ``$PGPOOL_PGBOUNCER``. When it is missing the fixture raises
:class:`~pgpool_async.testing.ComponentMissing`.

PgBouncer refuses to run as root: as root it runs as the same unprivileged user as
:class:`~pgpool_async.testing.throwaway.ThrowawayPostgres` (``postgres``, else ``nobody``).
Everything (configuration, log, pid file) lives in a private temporary directory
removed by :meth:`ThrowawayPgBouncer.destroy`. Authentication is ``trust`` for the
one user ``postgres``, who is also the admin: :meth:`ThrowawayPgBouncer.admin` runs
console commands (``PAUSE``, ``RESUME``, ``SHOW POOLS``, ...).

The process runs in the foreground as our child, so :meth:`kill` (SIGKILL),
:meth:`stop` (SIGTERM, immediate shutdown) and :meth:`start` (again, on the same
port) model a crash and a restart of the pooler.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from . import ComponentMissing, throwaway

__all__ = ["ENV_PGBOUNCER", "ThrowawayPgBouncer", "find_pgbouncer"]

ENV_PGBOUNCER = "PGPOOL_PGBOUNCER"
"""Environment variable naming the pgbouncer executable."""
_HOST = "127.0.0.1"
_MODES = frozenset({"session", "transaction", "statement"})


def find_pgbouncer() -> str:
    """Return the path of the ``pgbouncer`` executable.

    Raises:
        ComponentMissing: not found; the message says how to install it.
    """
    explicit = os.environ.get(ENV_PGBOUNCER)
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise ComponentMissing(f"${ENV_PGBOUNCER}={explicit!r} is not an executable file")
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ComponentMissing(
            "pgbouncer is not installed: `apt-get install pgbouncer` (Debian/Ubuntu), "
            f"or set ${ENV_PGBOUNCER} to the executable"
        )
    return found


class ThrowawayPgBouncer:
    """A PgBouncer process in front of ``server_host:server_port``, on a free local port.

    The constructor does no I/O; :meth:`start` writes the configuration and starts
    the process (or restarts it on the same port after :meth:`stop`/:meth:`kill`).
    :meth:`destroy` stops it and deletes its files; safe to call twice.

    Args:
        server_port: the PostgreSQL server's port.
        server_host: its host (default ``127.0.0.1``).
        pool_mode: ``"transaction"`` (default), ``"session"`` or ``"statement"``.
        pool_size: server connections per database/user pair (``default_pool_size``).
        settings: more ``[pgbouncer]`` settings, overriding the defaults
            (``max_client_conn=1000``, ``server_login_retry=0.2``, ``query_wait_timeout=120``...).
    """

    def __init__(
        self,
        server_port: int,
        *,
        server_host: str = _HOST,
        pool_mode: str = "transaction",
        pool_size: int = 20,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if pool_mode not in _MODES:
            raise ValueError(f"pool_mode must be one of {sorted(_MODES)}, not {pool_mode!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, not {pool_size!r}")
        self.server_host = server_host
        self.server_port = int(server_port)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self._settings = {str(k): str(v) for k, v in (settings or {}).items()}
        self._lock = threading.RLock()
        self._dir: str | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: Any = None
        self._destroyed = False
        self._atexit = False

    # -- properties -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port PgBouncer listens on (assigned at the first :meth:`start`)."""
        if self._port is None:
            raise throwaway.ThrowawayError("no port yet: call start() first")
        return self._port

    @property
    def dsn(self) -> str:
        """``host=127.0.0.1 port=N user=postgres dbname=postgres`` through PgBouncer."""
        return f"host={_HOST} port={self.port} user=postgres dbname=postgres"

    @property
    def admin_dsn(self) -> str:
        """The admin console (database ``pgbouncer``)."""
        return f"host={_HOST} port={self.port} user=postgres dbname=pgbouncer"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> str:
        """PgBouncer's log file."""
        if self._dir is None:
            raise throwaway.ThrowawayError("not started yet")
        return os.path.join(self._dir, "pgbouncer.log")

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> ThrowawayPgBouncer:
        """Start PgBouncer (first call: write its files); wait until it accepts connections.

        Raises:
            ComponentMissing: pgbouncer is not installed.
            ThrowawayError: it did not come up within ``timeout`` (message: the log tail).
        """
        with self._lock:
            if self._destroyed:
                raise throwaway.ThrowawayError("this PgBouncer was destroyed; create a new one")
            if self.running:
                return self
            program = find_pgbouncer()
            if self._dir is None:
                self._create_files()
            assert self._dir is not None
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            run_as = self._run_as
            with open(os.path.join(self._dir, "stdout.log"), "ab") as out:
                self._proc = subprocess.Popen(
                    [program, os.path.join(self._dir, "pgbouncer.ini")],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._dir,
                    env=env,
                    user=None if run_as is None else run_as.uid,
                    group=None if run_as is None else run_as.gid,
                    extra_groups=None if run_as is None else [],
                    start_new_session=True,  # a Ctrl-C in the terminal is not for it
                )
            deadline = time.monotonic() + timeout
            while not self._accepting():
                if not self.running or time.monotonic() > deadline:
                    self._terminate(signal.SIGKILL)
                    raise throwaway.ThrowawayError(
                        f"pgbouncer did not start on port {self.port}:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
            return self

    def stop(self, timeout: float = 10.0) -> None:
        """Immediate shutdown (SIGTERM): clients are disconnected. Nothing if not running."""
        with self._lock:
            self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would: sockets close, no goodbye to anyone."""
        with self._lock:
            self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start` on the same port."""
        with self._lock:
            self.stop()
            self.start()

    def destroy(self) -> None:
        """Kill the process and delete every file. Safe to call twice."""
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
            with contextlib.suppress(Exception):
                self._terminate(signal.SIGKILL)
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            if self._atexit:
                atexit.unregister(self.destroy)
                self._atexit = False

    def __enter__(self) -> ThrowawayPgBouncer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Run one admin console command (``PAUSE``, ``RESUME``, ``SHOW POOLS``...);
        its rows. Blocking: from async code call it in a worker thread."""
        import psycopg2

        conn = psycopg2.connect(self.admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(command)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def __repr__(self) -> str:
        target = f"{self.server_host}:{self.server_port}"
        return f"<ThrowawayPgBouncer {self.pool_mode} port={self._port} -> {target}>"

    # -- internals -----------------------------------------------------------------

    def _create_files(self) -> None:
        run_as = throwaway._pick_run_as() if os.geteuid() == 0 else None
        directory = tempfile.mkdtemp(prefix="pgpool-bouncer-")
        self._dir = directory
        if not self._atexit:
            atexit.register(self.destroy)
            self._atexit = True
        self._port = throwaway._free_port()
        settings = {
            "listen_addr": _HOST,
            "listen_port": str(self._port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": os.path.join(directory, "userlist.txt"),
            "admin_users": "postgres",
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "max_client_conn": "1000",
            "max_db_connections": "0",
            "reserve_pool_size": "0",
            # Reconnect to a restarted server soon (the default waits 15 s).
            "server_login_retry": "0.2",
            "query_wait_timeout": "120",
            "logfile": os.path.join(directory, "pgbouncer.log"),
            "pidfile": os.path.join(directory, "pgbouncer.pid"),
            "log_connections": "0",
            "log_disconnections": "0",
        }
        settings.update(self._settings)
        lines = ["[databases]", f"* = host={self.server_host} port={self.server_port}", "", "[pgbouncer]"]
        lines += [f"{k} = {v}" for k, v in settings.items()]
        with open(os.path.join(directory, "pgbouncer.ini"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(directory, "userlist.txt"), "w", encoding="utf-8") as f:
            f.write('"postgres" ""\n')
        if run_as is not None:
            for name in ("", "pgbouncer.ini", "userlist.txt"):
                os.chown(os.path.join(directory, name), run_as.uid, run_as.gid)
        self._run_as = run_as

    def _accepting(self) -> bool:
        try:
            with socket.create_connection((_HOST, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _terminate(self, sig: int, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        self._proc = None

    def _log_tail(self) -> str:
        parts = []
        for name in ("stdout.log", "pgbouncer.log"):
            path = os.path.join(self._dir or "", name)
            with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
                parts.append("\n".join(f.read().splitlines()[-20:]))
        return "\n".join(parts)
