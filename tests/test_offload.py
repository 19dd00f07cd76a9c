"""The offloader (:mod:`pgpool_async._thread.offload`), with no server: its own threads,
and a cancelled call waited for. (The caller's context in its threads: test_context.py.)"""

from __future__ import annotations

import threading

import anyio
import pytest

from pgpool_async._thread.offload import Offloader

pytestmark = pytest.mark.single_io("the offloader alone: no statements on a pool")


@pytest.mark.anyio
async def test_offloader_runs_in_its_own_threads_and_waits_for_cancelled_calls() -> None:
    offload = Offloader(2, "unit-offload")
    thread = await offload.run(threading.current_thread)
    assert thread is not threading.current_thread()
    release = threading.Event()
    finished: list[bool] = []
    cancels: list[bool] = []

    def slow() -> None:
        release.wait(5)
        finished.append(True)

    with anyio.move_on_after(0.05) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 0.1)
            tg.start_soon(lambda: _release_later(release))
            await offload.run(slow, on_cancel=lambda: cancels.append(True))
    # Cancelled, yet the call ran to its end before the cancellation was delivered.
    assert scope.cancelled_caught and finished == [True] and cancels == [True]
    offload.shutdown()


async def _release_later(event: threading.Event) -> None:
    with anyio.CancelScope(shield=True):
        await anyio.sleep(0.2)
    event.set()
