"""FastAPI glue: open the pool with the app, lend a connection per request.

::

    pool = AsyncConnectionPool(1, 10, dsn)
    app = FastAPI(lifespan=pool_lifespan(pool))
    Conn = Annotated[AsyncConnection, Depends(connection_dependency(pool))]

    @app.post("/items")
    async def add(item: Item, conn: Conn) -> int:
        return await conn.fetchval("INSERT INTO items (name) VALUES (%s) RETURNING id", (item.name,))

The request's connection is committed after the endpoint returns, rolled back if
it raises (FastAPI re-raises into dependencies with ``yield``), and returned to
the pool either way. The pool runs its database calls in its own worker threads,
never in the thread pool FastAPI's sync endpoints share, so a burst of sync
endpoints cannot starve it. FastAPI itself is not imported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from .connection import AsyncConnection
from .pool import AsyncConnectionPool

__all__ = ["connection_dependency", "pool_lifespan"]


def pool_lifespan(
    pool: AsyncConnectionPool,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan``: opens ``pool`` at startup, closes it at shutdown.

    Startup fails (the app does not start) with :class:`~pgpool_async.PoolTimeout`
    if ``minconn`` connections cannot be opened within the pool's timeout.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with pool:
            yield

    return lifespan


def connection_dependency(
    pool: AsyncConnectionPool, timeout: float | None = None
) -> Callable[[], AsyncIterator[AsyncConnection]]:
    """A FastAPI dependency lending one connection per request (see the module doc).

    ``timeout``: how long a request waits for a connection (default: the pool's);
    past it the endpoint is not run and :class:`~pgpool_async.PoolTimeout` propagates
    (map it to a 503 with an exception handler).
    """

    async def connection() -> AsyncIterator[AsyncConnection]:
        async with pool.connection(timeout=timeout) as conn:
            yield conn

    return connection
