"""Run an ASGI app in a real uvicorn process, for tests that speak real HTTP to it."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serving(
    python: str, args: Sequence[str], dsn: str, *, ready_path: str = "/health", timeout: float = 60.0
) -> Iterator[tuple[str, list[str]]]:
    """Start ``python *args`` with ``PORT`` and ``PGPOOL_DSN`` set; yield (base URL, output lines
    so far, read at the end) once ``ready_path`` answers 200; stop it (SIGTERM, then SIGKILL)."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "PGPOOL_DSN": dsn}
    # A file, not a pipe: a server that logs a lot must never block on a full pipe.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [python, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    output: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(base + ready_path, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        yield base, output
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        output.extend(log.read().splitlines())
        log.close()
