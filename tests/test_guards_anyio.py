"""The loop guards also cover tests marked ``anyio`` (conftest's anyio_backend)."""

from __future__ import annotations

import asyncio
import os

import anyio.lowlevel
import psycopg2
import pytest

import pgpool_async

from . import conftest

pytestmark = [pytest.mark.anyio, pytest.mark.single_io("the guards themselves: no pool")]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_blockbuster_watches_anyio_tests_on_asyncio(anyio_backend: str) -> None:
    """A blocking call made from the package's code on the loop is caught
    (blockbuster scans by file name: this probe claims to live in the package)."""
    from blockbuster import BlockingError

    probe = compile(
        "import time\ntime.sleep(0.001)\n", os.path.join(pgpool_async.__path__[0], "_probe.py"), "exec"
    )
    with pytest.raises(BlockingError):
        exec(probe, {})


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_libpq_wait_guard_watches_trio(anyio_backend: str, dsn: str) -> None:
    """blockbuster knows only asyncio; on trio the libpq wait guard still trips."""
    with pytest.raises(AssertionError, match="libpq network wait on the event loop"):
        psycopg2.connect(dsn)
    assert conftest._violations
    conftest._violations.clear()  # this test wanted exactly that


async def test_both_backends_run(anyio_backend: str) -> None:
    """The default anyio_backend fixture runs each anyio test on asyncio and trio."""
    # sniffio is not a dependency (anyio dropped it): the running loop says which backend.
    loop = anyio.lowlevel.current_token().native_token
    assert ("asyncio" if isinstance(loop, asyncio.AbstractEventLoop) else "trio") == anyio_backend
