"""The pool's background tasks, without asking the user for a task group.

``await pool.open()`` must work outside ``async with``, yet anyio only runs tasks
inside a task group that its opener enters and exits. So the group lives in a
task of its own: a daemon thread asks the event loop, through anyio's public
``from_thread.run``, to run the host coroutine, and waits for it. Works the same
on asyncio and trio. Tasks are started with :meth:`BackgroundTasks.spawn` from
the event loop thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from ..errors import PoolClosed

__all__ = ["BackgroundTasks"]


class BackgroundTasks:
    """A task group owned by a pool, alive from :meth:`start` to :meth:`aclose`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._group: anyio.abc.TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._done: anyio.Event | None = None

    async def start(self) -> None:
        """Start the host task; returns once :meth:`spawn` can be used."""
        token = anyio.lowlevel.current_token()
        started = anyio.Event()
        self._stop = anyio.Event()
        self._done = anyio.Event()

        def host() -> None:
            # Ends with the loop too (RunFinishedError, cancellation): nothing to do then.
            with contextlib.suppress(BaseException):
                anyio.from_thread.run(self._host, started, token=token)

        threading.Thread(target=host, name=f"{self._name}-tasks", daemon=True).start()
        await started.wait()

    async def _host(self, started: anyio.Event) -> None:
        assert self._stop is not None and self._done is not None
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                started.set()
                await self._stop.wait()
                group.cancel_scope.cancel()
        finally:
            self._group = None
            self._done.set()

    def spawn(self, func: Callable[..., Coroutine[Any, Any, object]], *args: object) -> None:
        """Start ``func(*args)`` as a background task (call from the event loop).

        :raises PoolClosed: the tasks were never started or are stopped.
        """
        if self._group is None:
            raise PoolClosed("connection pool is closed")
        self._group.start_soon(func, *args)

    async def aclose(self) -> None:
        """Cancel every task and wait for them to finish; safe twice."""
        if self._stop is None or self._done is None:
            return
        self._stop.set()
        with anyio.CancelScope(shield=True):
            await self._done.wait()
