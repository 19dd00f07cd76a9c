"""Offloading: every blocking call the async pool makes runs here, in a worker thread.

The pool owns its threads instead of sharing anyio's default limiter (40
threads, also used by FastAPI's sync endpoints):

- ``run`` (queries, commits, checks) uses the pool's own workers, at most one
  per connection slot;
- ``run_return`` (rollbacks and closes of returned connections) has a limiter
  of its own, sized like the pool, so giving a connection back never queues
  behind busy queries;
- ``run_anyio`` (user code, COPY) and ``run_abandoning`` (connects) use anyio
  worker threads under the pool's own limiter.

On asyncio, ``run`` hands the call to the pool's threads through a queue and
waits on a future that cannot be cancelled: a cancelled caller still waits for
the call to finish and then gets the cancellation, exactly like anyio's
``to_thread.run_sync``, for about half the cost per call (see ``benchmarks/``:
a thread hop is the price of every database call here). On other event loops
(trio) ``run`` uses anyio's worker threads. Either way, a caller cancelled
mid-call triggers ``on_cancel`` (the connection asks the server to cancel the
statement) and gets its cancellation once the thread is done. If ``on_cancel``
returns a callable, it is called when the thread is still busy
``_libpq.CANCEL_GRACE`` seconds later (it shuts the connection's socket down,
so the thread fails at once): a cancelled caller is never held by the network.

Every call runs in a copy of the caller's :mod:`contextvars` context, taken on
the loop when the call is handed over, as ``asyncio.to_thread`` does: tracers
(OpenTelemetry, ddtrace, Sentry) keep the current span there, so a database
span made in a worker thread joins the caller's trace. The pool's own workers
copy it in ``_Workers.submit`` (once per call); anyio's worker threads (trio,
``run_anyio``, ``run_abandoning``, ``run_return``) copy it themselves.
``on_cancel`` runs in the caller's context too.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .._libpq import CANCEL_GRACE, CancelGate

__all__ = ["Offloader"]

T = TypeVar("T")


class _Uncancellable(asyncio.Future[Any]):
    """A future whose ``cancel()`` is refused: asyncio then delivers the task's
    cancellation only once the result is in, so a thread's work is never
    abandoned half-seen. The first refused ``cancel()`` calls ``on_cancel``
    (e.g. asks the server to cancel the running query, so it ends soon), in
    the caller's context (``context``), not the canceller's."""

    on_cancel: Callable[[], object] | None = None
    gate: CancelGate | None = None
    context: contextvars.Context | None = None

    def cancel(self, msg: Any = None) -> bool:
        if self.on_cancel is not None and not self.done():
            on_cancel, self.on_cancel = self.on_cancel, None
            assert self.gate is not None and self.context is not None
            # A copy: the worker thread may be running in ``context`` now (a
            # context is entered by one thread at a time).
            overdue = self.context.copy().run(self.gate.ask, on_cancel)
            if callable(overdue):
                self.get_loop().call_later(CANCEL_GRACE, _if_pending, self, overdue)
        return False


def _if_pending(fut: asyncio.Future[Any], overdue: Callable[[], object]) -> None:
    if not fut.done():
        overdue()


_STOP = None  # tells a worker thread to end


class _Workers:
    """The pool's own worker threads, fed by a ``SimpleQueue``; asyncio only.

    Results come back through one queue, and the loop is woken at most once per
    batch. The thread bookkeeping happens on the loop thread only, so it needs
    no lock: ``busy`` counts calls submitted and not yet settled, and a thread
    is started whenever every started one may be busy. Each call runs in a copy
    of its caller's context (see the module docstring).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int, name: str) -> None:
        self._loop = loop
        self.max_threads = max_threads
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[_Uncancellable, Any, BaseException | None]] = (
            queue.SimpleQueue()
        )
        # Raised by a worker that woke the loop, lowered by the loop's drain.
        self._drain_due = False
        self._started = 0
        self._busy = 0

    def submit(
        self, func: Callable[..., Any], args: tuple[Any, ...], on_cancel: Callable[[], object] | None
    ) -> _Uncancellable:
        """Queue ``func(*args)``, to run in a copy of the current context; the
        returned future settles on the loop."""
        context = contextvars.copy_context()
        fut = _Uncancellable(loop=self._loop)
        if on_cancel is not None:
            fut.on_cancel = on_cancel
            fut.gate = CancelGate()
            fut.context = context
        self._busy += 1
        if self._busy > self._started and self._started < self.max_threads:
            self._started += 1
            threading.Thread(
                target=self._work, name=f"{self._name}-worker-{self._started}", daemon=True
            ).start()
        self._jobs.put((fut, context, func, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            fut, context, func, args = job
            try:
                result = context.run(func, *args)
            except BaseException as exc:
                if fut.gate is not None:
                    fut.gate.finish(exc)
                self._post(fut, None, exc)
            else:
                if fut.gate is not None:
                    fut.gate.finish(None)
                self._post(fut, result, None)
            # An idle thread must not keep the last call's objects alive (a
            # connection wrapper dropped by its user must be collectable).
            job = fut = context = func = args = result = None

    def _post(self, fut: _Uncancellable, result: Any, error: BaseException | None) -> None:
        self._results.put((fut, result, error))
        # Under the GIL either this thread sees the flag down and wakes the
        # loop, or the loop has not lowered it yet and its drain takes this too.
        if not self._drain_due:
            self._drain_due = True
            try:  # noqa: SIM105 (cheaper than contextlib.suppress on this path)
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _drain(self) -> None:
        self._drain_due = False
        while True:
            try:
                fut, result, error = self._results.get_nowait()
            except queue.Empty:
                return
            self._busy -= 1
            fut.on_cancel = None
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    def shutdown(self) -> None:
        """Let every thread end once the calls queued before are done."""
        for _ in range(self._started):
            self._jobs.put(_STOP)
        self._started = 0


class Offloader:
    """The pool's worker threads, ``tokens`` at a time for each kind of work.

    Limiters and threads are created on first use, inside the event loop.
    """

    def __init__(self, tokens: int, name: str = "pgpool") -> None:
        self._tokens = tokens
        self._name = name
        self._work: anyio.CapacityLimiter | None = None
        self._returns: anyio.CapacityLimiter | None = None
        self._workers: _Workers | None = None
        self._backend_known = False

    @property
    def work_limiter(self) -> anyio.CapacityLimiter:
        """The limiter for anyio worker threads (connects, user code; all calls off asyncio)."""
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
        if self._workers is not None:
            self._workers.max_threads = tokens

    def _asyncio_workers(self) -> _Workers | None:
        if not self._backend_known:
            self._backend_known = True
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # trio (or another loop anyio supports)
                return None
            self._workers = _Workers(loop, self._tokens, self._name)
        return self._workers

    async def run(
        self, func: Callable[..., T], *args: Any, on_cancel: Callable[[], object] | None = None
    ) -> T:
        """Run ``func(*args)`` in a worker thread, in a copy of the caller's context.

        A thread cannot be stopped: if the caller is cancelled meanwhile, this
        waits for ``func`` to finish and then raises the cancellation. Nothing
        ``func`` did is lost: the connection is in a known state.
        ``on_cancel()`` is called (on the loop, once) when the cancellation
        arrives, to make ``func`` end sooner. ``func`` must not call back into
        the loop (use :meth:`run_anyio` for that).
        """
        workers = self._asyncio_workers()
        if workers is None:
            return await self._run_anyio_cancelling(func, args, on_cancel)
        result: T = await workers.submit(func, args, on_cancel)
        return result

    async def _run_anyio_cancelling(
        self, func: Callable[..., T], args: tuple[Any, ...], on_cancel: Callable[[], object] | None
    ) -> T:
        """:meth:`run` off asyncio: an anyio worker thread, in a child task so that
        a cancellation is seen at once (to call ``on_cancel()``) while the thread
        is still waited for; then the cancellation is raised."""
        if on_cancel is None:
            return await anyio.to_thread.run_sync(func, *args, limiter=self.work_limiter)
        # (True, result) or (False, exception): a function may return an exception.
        outcome: list[tuple[bool, Any]] = []
        finished = anyio.Event()
        gate = CancelGate()

        def gated() -> T:
            try:
                result = func(*args)
            except BaseException as exc:
                gate.finish(exc)
                raise
            gate.finish(None)
            return result

        async def in_thread() -> None:
            try:
                outcome.append((True, await anyio.to_thread.run_sync(gated, limiter=self.work_limiter)))
            except BaseException as exc:  # handed to the caller below, not to the group
                outcome.append((False, exc))
            finally:
                finished.set()

        try:
            await self._run_gated(in_thread, finished, gate, on_cancel)
        finally:
            gate.abandon()  # the thread call never ran (cancelled before it started)
        ok, value = outcome[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    @staticmethod
    async def _run_gated(
        in_thread: Callable[[], Coroutine[Any, Any, None]],
        finished: anyio.Event,
        gate: CancelGate,
        on_cancel: Callable[[], object],
    ) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(in_thread)
            try:
                await finished.wait()
            except anyio.get_cancelled_exc_class():
                overdue = gate.ask(on_cancel)  # the thread is still running: the group waits for it
                if callable(overdue):
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE):
                        await finished.wait()
                    if not finished.is_set():
                        overdue()
                raise

    async def run_anyio(
        self, func: Callable[..., T], *args: Any, on_cancel: Callable[[], object] | None = None
    ) -> T:
        """Like :meth:`run`, always in an anyio worker thread: ``func`` may call
        back into the event loop with ``anyio.from_thread``. For user code and
        COPY; the pool's own calls use :meth:`run`."""
        return await self._run_anyio_cancelling(func, args, on_cancel)

    async def run_abandoning(self, func: Callable[..., T], *args: Any) -> T:
        """Like :meth:`run`, but a cancelled caller stops waiting at once.

        Only for ``func`` that cleans up after itself when nobody waits (a connect
        that may hang on an unresponsive server).
        """
        return await anyio.to_thread.run_sync(func, *args, limiter=self.work_limiter, abandon_on_cancel=True)

    async def run_return(self, func: Callable[..., T], *args: Any) -> T:
        """Run a return-path call (rollback, reset, close) under the ``returns``
        limiter, so giving back never queues behind busy queries. Shielded from
        anyio cancellation; the pool runs these in its own tasks, which no
        caller's ``task.cancel()`` reaches."""
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(func, *args, limiter=self.returns_limiter)
        return result

    def shutdown(self) -> None:
        """Let the worker threads end once idle (the pool is closed)."""
        if self._workers is not None:
            self._workers.shutdown()
