"""Shared fixtures: a real PostgreSQL, and guards that fail any blocking call on the loop.

- ``dsn``: ``$PGPOOL_TEST_DSN`` when set, else one throwaway server per session.
- A psycopg2 wait callback is installed for the whole session: it records (and
  raises) any libpq network wait made on a thread that runs an event loop, which
  Python-level tools cannot see. Every test then asserts none happened.
- ``blockbuster`` fails Python-level blocking calls made on the asyncio loop
  during async tests.
- ``pool_io``: every test runs twice, once with the pools' default ``io`` set to
  ``"loop"`` and once to ``"thread"`` (ids end in ``-loop`` / ``-thread``),
  unless it is marked ``single_io`` (see :func:`pytest_configure`);
  ``PGPOOL_TEST_IO=loop`` runs one io only.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest

from pgpool_async import _config
from pgpool_async.testing.throwaway import ThrowawayPostgres, run_sql

# -- both ways of running statements ------------------------------------------------

#: The values of AsyncConnectionPool(io=...) the whole suite runs with (issue 11);
#: ``PGPOOL_TEST_IO=loop`` (or ``thread``) runs one of them, for a quicker local run.
IO_PATHS = tuple(os.environ.get("PGPOOL_TEST_IO", "loop,thread").replace(" ", "").split(","))


def pytest_configure(config: pytest.Config) -> None:
    if not IO_PATHS or not set(IO_PATHS) <= {"loop", "thread", "auto"}:
        raise pytest.UsageError(f"PGPOOL_TEST_IO must list loop, thread or auto, got {IO_PATHS}")
    config.addinivalue_line(
        "markers",
        "single_io(reason): run once, with the pools' default io, not once per io in IO_PATHS "
        "(the test builds no pool, passes io= itself, or is a slow fault suite run with the default)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pool_io" in metafunc.fixturenames and metafunc.definition.get_closest_marker("single_io") is None:
        # Module scope: a module's tests run for one io, then for the other, so a
        # module-scoped fixture that asks for pool_io (a server process) starts once per io.
        metafunc.parametrize("pool_io", IO_PATHS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def pool_io(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The pools' default io for this test (``_config.DEFAULT_IO``), or None for a
    ``single_io`` test (the package default is left alone)."""
    io: str | None = getattr(request, "param", None)
    if io is None:
        yield None
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_config, "DEFAULT_IO", io)
        yield io


_BOOT = """\
import os, runpy, sys
import pgpool_async._config
pgpool_async._config.DEFAULT_IO = sys.argv[1]
del sys.argv[:2]
if sys.argv[0] == "-m":
    del sys.argv[0]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def python_args(args: list[str], io: str | None) -> list[str]:
    """Arguments for the interpreter that run ``python *args`` (a script, or ``-m
    module ...``) with the pools' default io set to ``io`` (None: unchanged): how the
    examples and servers run in a subprocess follow ``pool_io``."""
    return list(args) if io is None else ["-c", _BOOT, io, *args]


# -- the server --------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayPostgres | None]:
    """The throwaway server, or None when ``PGPOOL_TEST_DSN`` points elsewhere."""
    if os.environ.get("PGPOOL_TEST_DSN"):
        yield None
        return
    server = ThrowawayPostgres(settings={"max_connections": "300"})
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def dsn(pg_server: ThrowawayPostgres | None) -> str:
    """A DSN of a real PostgreSQL server where tests may create tables."""
    return os.environ.get("PGPOOL_TEST_DSN") or pg_server.dsn  # type: ignore[union-attr]


@pytest.fixture
def app_name() -> str:
    """A unique application_name: lets a test find its own backends on the server."""
    return f"pgpool-test-{uuid.uuid4().hex[:12]}"


def server_query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one query on a fresh, separate connection (off any pool), autocommit."""
    with _loop_guard_off():
        return run_sql(dsn, sql, params)


def backends(dsn: str, app_name: str) -> list[tuple[str, str]]:
    """(state, query) of every server backend with this application_name."""
    return [
        (r[0], r[1])
        for r in server_query(
            dsn,
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )
    ]


def wait_backends_gone(dsn: str, app_name: str, timeout: float = 10.0) -> None:
    """A closed connection's backend leaves pg_stat_activity shortly after: poll for it."""
    deadline = time.monotonic() + timeout
    while backends(dsn, app_name):
        assert time.monotonic() < deadline, f"backends still there: {backends(dsn, app_name)}"
        time.sleep(0.01)


# -- no blocking on the event loop -----------------------------------------------

_violations: list[str] = []
_guard = threading.local()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    try:
        import trio.lowlevel

        return trio.lowlevel.in_trio_run()
    except ImportError:
        return False


def _wait_off_loop(conn: Any) -> None:
    """psycopg2 calls this for every libpq network wait (connect, query, commit)."""
    if not getattr(_guard, "off", False) and _on_event_loop():
        stack = "".join(traceback.format_stack(limit=12))
        _violations.append(stack)
        raise AssertionError(f"libpq network wait on the event loop thread:\n{stack}")
    psycopg2.extras.wait_select(conn)


class _loop_guard_off:
    """Let this thread block (helpers that query the server from a test body)."""

    def __enter__(self) -> None:
        self._was = getattr(_guard, "off", False)
        _guard.off = True

    def __exit__(self, *exc: object) -> None:
        _guard.off = self._was


@pytest.fixture(scope="session", autouse=True)
def _libpq_wait_guard() -> Iterator[None]:
    psycopg2.extensions.set_wait_callback(_wait_off_loop)
    try:
        yield
    finally:
        psycopg2.extensions.set_wait_callback(None)


@pytest.fixture(autouse=True)
def _no_libpq_wait_on_loop() -> Iterator[None]:
    _violations.clear()
    yield
    assert not _violations, f"{len(_violations)} libpq wait(s) on the event loop:\n{_violations[0]}"


@pytest.fixture
def no_wait_callback() -> Iterator[None]:
    """COPY cannot run with a wait callback set: tests of COPY switch it off."""
    psycopg2.extensions.set_wait_callback(None)
    try:
        yield
    finally:
        psycopg2.extensions.set_wait_callback(_wait_off_loop)


@pytest.fixture(autouse=True)
def _blockbuster(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail Python-level blocking calls on the asyncio loop, in async tests only."""
    if not (request.node.get_closest_marker("asyncio") or request.node.get_closest_marker("anyio")):
        yield
        return
    from blockbuster import blockbuster_ctx

    # The fault proxy and the throwaway server are test tools that block on purpose.
    with blockbuster_ctx(
        scanned_modules=["pgpool_async"],
        excluded_modules=["pgpool_async.testing.faultproxy", "pgpool_async.testing.throwaway"],
    ) as bb:
        # Reading modules or test files at import time is not what we test.
        for name in ("io.TextIOWrapper.read", "io.BufferedReader.read", "os.stat"):
            if name in bb.functions:
                bb.functions[name].deactivate()
        yield


# -- async backends ------------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Tests marked ``anyio`` run on asyncio and on trio (a module may narrow it).

    The guards above apply to them too: the libpq wait guard on both backends,
    blockbuster (which only knows asyncio) on asyncio.
    """
    return str(request.param)
