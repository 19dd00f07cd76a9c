"""Offloading: every blocking call the async pool makes runs here, in a worker thread.

The pool owns its threads instead of sharing anyio's default limiter (40
threads, also used by FastAPI's sync endpoints):

- ``run`` (connects, queries, commits) uses the pool's own workers, at most
  one call per connection slot;
- ``run_return`` (rollbacks and closes of returned connections) has a limiter
  of its own, sized like the pool, so giving a connection back never queues
  behind busy queries.

On asyncio, ``run`` hands the call to the pool's own thread pool and waits on a
future that cannot be cancelled: a cancelled caller still waits for the call
to finish and then gets the cancellation, exactly like anyio's
``to_thread.run_sync``, at about half its cost per call (measured in
``benchmarks/``; a thread hop is the price of every database call here). On
other event loops (trio) ``run`` is anyio's ``to_thread.run_sync``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import sniffio

__all__ = ["Offloader"]

T = TypeVar("T")


class _Uncancellable(asyncio.Future[Any]):
    """A future whose ``cancel()`` is refused: asyncio then delivers the task's
    cancellation only once the result is in, so a thread's work is never
    abandoned half-seen."""

    def cancel(self, msg: Any = None) -> bool:
        return False


def _settle(fut: _Uncancellable, result: Any, error: BaseException | None) -> None:
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _call_and_post(
    loop: asyncio.AbstractEventLoop, fut: _Uncancellable, func: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    """In a worker thread: run the call, then post its outcome to the loop."""
    try:
        result = func(*args)
    except BaseException as exc:
        loop.call_soon_threadsafe(_settle, fut, None, exc)
    else:
        loop.call_soon_threadsafe(_settle, fut, result, None)


class Offloader:
    """The pool's worker threads, ``tokens`` at a time for each kind of work.

    Limiters and the thread pool are created on first use, inside the event loop.
    """

    def __init__(self, tokens: int, name: str = "pgpool") -> None:
        self._tokens = tokens
        self._name = name
        self._work: anyio.CapacityLimiter | None = None
        self._returns: anyio.CapacityLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def work_limiter(self) -> anyio.CapacityLimiter:
        """The limiter for connects (and, off asyncio, queries and commits)."""
        if self._work is None:
            self._work = anyio.CapacityLimiter(self._tokens)
        return self._work

    @property
    def returns_limiter(self) -> anyio.CapacityLimiter:
        """The limiter for rollbacks and closes; never shared with ``work``."""
        if self._returns is None:
            self._returns = anyio.CapacityLimiter(self._tokens)
        return self._returns

    def resize(self, tokens: int) -> None:
        """Follow the pool's new ``maxconn``."""
        self._tokens = tokens
        for limiter in (self._work, self._returns):
            if limiter is not None:
                limiter.total_tokens = tokens
        if self._threads is not None:
            # ThreadPoolExecutor only reads it when deciding to start a thread.
            self._threads._max_workers = tokens

    def _asyncio_loop(self) -> asyncio.AbstractEventLoop | None:
        if self._loop is None and sniffio.current_async_library() == "asyncio":
            self._loop = asyncio.get_running_loop()
            self._threads = concurrent.futures.ThreadPoolExecutor(
                self._tokens, thread_name_prefix=f"{self._name}-worker"
            )
        return self._loop

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(*args)`` in a worker thread.

        A thread cannot be stopped: if the caller is cancelled meanwhile, this
        waits for ``func`` to finish and then raises the cancellation. Nothing
        ``func`` did is lost: the connection is in a known state.
        """
        loop = self._asyncio_loop()
        if loop is None:
            return await anyio.to_thread.run_sync(func, *args, limiter=self.work_limiter)
        assert self._threads is not None
        fut = _Uncancellable(loop=loop)
        self._threads.submit(_call_and_post, loop, fut, func, args)
        result: T = await fut
        return result

    async def run_anyio(self, func: Callable[..., T], *args: Any) -> T:
        """Like :meth:`run`, in an anyio worker thread: ``func`` may call back into
        the event loop with ``anyio.from_thread``, and those calls are cancelled
        with the caller. For user code; the pool's own calls use :meth:`run`."""
        return await anyio.to_thread.run_sync(func, *args, limiter=self.work_limiter)

    async def run_abandoning(self, func: Callable[..., T], *args: Any) -> T:
        """Like :meth:`run`, but a cancelled caller stops waiting at once.

        Only for ``func`` that cleans up after itself when nobody waits (a connect
        that may hang on an unresponsive server).
        """
        return await anyio.to_thread.run_sync(func, *args, limiter=self.work_limiter, abandon_on_cancel=True)

    async def run_return(self, func: Callable[..., T], *args: Any) -> T:
        """Run a return-path call (rollback, close): shielded from cancellation,
        under the ``returns`` limiter, so a connection is never half returned."""
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(func, *args, limiter=self.returns_limiter)
        return result

    def shutdown(self) -> None:
        """Let the worker threads end once idle (the pool is closed)."""
        if self._threads is not None:
            self._threads.shutdown(wait=False)
