"""The background host (:mod:`pgpool_async._thread.background`), with no server: a
failing task is logged and the others go on; a stopped host takes no new task."""

from __future__ import annotations

import logging

import anyio
import pytest

from pgpool_async._thread.background import BackgroundTasks
from pgpool_async.errors import PoolClosed

pytestmark = pytest.mark.single_io("the background host alone: no statements on a pool")


@pytest.mark.anyio
async def test_background_task_failure_is_logged_and_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("unit-bg")
    await tasks.start()
    ticks: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(1)
            await anyio.sleep(0.01)

    async def broken() -> None:
        raise RuntimeError("boom in maintenance")

    with caplog.at_level(logging.ERROR, logger="pgpool_async"):
        tasks.spawn(ticker)
        tasks.spawn(broken)
        await anyio.sleep(0.1)
        before = len(ticks)
        await anyio.sleep(0.1)
    assert len(ticks) > before  # the ticker outlived the failing task
    assert "boom in maintenance" in caplog.text and "background task broken failed" in caplog.text
    tasks.spawn(ticker)  # spawning still works on a running host
    tasks.stop()
    await tasks.wait_stopped()
    with pytest.raises(PoolClosed):
        tasks.spawn(ticker)
