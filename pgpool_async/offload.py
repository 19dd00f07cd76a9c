"""Offloading: every blocking call the async pool makes runs here, in a worker thread.

The pool owns two thread limiters instead of sharing anyio's default one (40
threads, also used by FastAPI's sync endpoints):

- ``work`` runs connects, queries, commits: at most one call per connection slot;
- ``returns`` runs rollbacks and closes of returned connections, sized like the
  pool, so giving a connection back never queues behind busy queries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

__all__ = ["Offloader"]

T = TypeVar("T")


class Offloader:
    """The pool's worker threads, limited to ``tokens`` at a time for each kind of work.

    Limiters are created on first use, inside the event loop.
    """

    def __init__(self, tokens: int) -> None:
        self._tokens = tokens
        self._work: anyio.CapacityLimiter | None = None
        self._returns: anyio.CapacityLimiter | None = None

    @property
    def work_limiter(self) -> anyio.CapacityLimiter:
        """The limiter for connects, queries and commits."""
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

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Run ``func(*args)`` in a worker thread.

        A thread cannot be stopped: if the caller is cancelled meanwhile, this
        waits for ``func`` to finish, returns its result, and the cancellation is
        delivered at the caller's next checkpoint. Nothing ``func`` produced is lost.
        """
        return await anyio.to_thread.run_sync(func, *args, limiter=self.work_limiter)

    async def run_abandoning(self, func: Callable[..., T], *args: object) -> T:
        """Like :meth:`run`, but a cancelled caller stops waiting at once.

        Only for ``func`` that cleans up after itself when nobody waits (a connect
        that may hang on an unresponsive server).
        """
        return await anyio.to_thread.run_sync(func, *args, limiter=self.work_limiter, abandon_on_cancel=True)

    async def run_return(self, func: Callable[..., T], *args: object) -> T:
        """Run a return-path call (rollback, close): shielded from cancellation,
        under the ``returns`` limiter, so a connection is never half returned."""
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(func, *args, limiter=self.returns_limiter)
        return result
