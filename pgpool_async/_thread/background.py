"""The pool's background tasks, without asking the user for a task group.

``await pool.open()`` must work outside ``async with``, yet anyio only runs tasks
inside a task group that its opener enters and exits. So the group lives in a
task of its own: a daemon thread asks the event loop, through anyio's public
``from_thread.run``, to run the host coroutine, and waits for it. Works the same
on asyncio and trio.

A task that raises is logged with its traceback and the others keep running
(psycopg_pool's workers do the same): one failing maintenance step must never
stop the deadlines of waiting requests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from ..errors import PoolClosed

__all__ = ["BackgroundTasks"]

logger = logging.getLogger("pgpool_async")


class BackgroundTasks:
    """A task group owned by a pool, alive from :meth:`start` to :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._group: anyio.abc.TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._done: anyio.Event | None = None
        self._token: Any = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._group is not None and self._stop is not None and not self._stop.is_set()

    async def start(self) -> None:
        """Start the host task; returns once :meth:`spawn` can be used."""
        token = self._token = anyio.lowlevel.current_token()
        started = anyio.Event()
        self._stop = anyio.Event()
        self._done = anyio.Event()

        def host() -> None:
            # Ends with the loop too (RunFinishedError, cancellation): nothing to do then.
            with contextlib.suppress(BaseException):
                anyio.from_thread.run(self._host, started, token=token)

        self._thread = threading.Thread(target=host, name=f"{self._name}-tasks", daemon=True)
        self._thread.start()
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
        If it raises, the error is logged and the other tasks go on.

        The task runs in a copy of the caller's :mod:`contextvars` context, not
        the host's: asyncio's ``create_task`` and trio's ``start_soon``, which
        anyio's task group calls, copy the current one. So the connects and
        returns a request starts here carry its tracing context into their
        worker threads (which copy it again, see ``offload.py``).

        :raises PoolClosed: the tasks were never started or are stopped.
        """
        if self._group is None or self._stop is None or self._stop.is_set():
            raise PoolClosed(f"pool {self._name!r} is closed: its background tasks are stopped")
        self._group.start_soon(self._logged, func, args, name=f"{self._name}:{func.__name__}")

    async def _logged(
        self, func: Callable[..., Coroutine[Any, Any, object]], args: tuple[object, ...]
    ) -> None:
        try:
            await func(*args)
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # a hook's BaseException too: it must not stop the other tasks
            logger.exception("pool %r: background task %s failed; carrying on", self._name, func.__name__)

    def stop(self) -> None:
        """Cancel every task (call from the event loop); safe twice."""
        if self._stop is not None:
            self._stop.set()

    async def wait_stopped(self) -> None:
        """Wait until the tasks are gone (after :meth:`stop`)."""
        if self._done is not None:
            with anyio.CancelScope(shield=True):
                await self._done.wait()

    def stop_from_any_thread(self) -> None:
        """:meth:`stop` from a thread that may not be the loop's (a finalizer):
        asks the loop to stop the tasks, without blocking the caller."""
        token, stop = self._token, self._stop
        if token is None or stop is None or stop.is_set():
            return

        def ask() -> None:
            with contextlib.suppress(BaseException):  # the loop may be gone
                anyio.from_thread.run_sync(stop.set, token=token)

        threading.Thread(target=ask, name=f"{self._name}-stop", daemon=True).start()
