"""FastAPI glue: a pool per app run, a connection per request, committed *before* the response.

::

    from pgpool_async.fastapi import AppPool, Connection, Pool, install_error_handlers

    db = AppPool(1, 10, dsn, timeout=5)         # no I/O: a pool is built at each startup
    app = FastAPI(lifespan=db.lifespan)
    install_error_handlers(app)                 # PoolTimeout & co. -> 503 with Retry-After
    Conn = Connection(db)                       # or Connection(db, autocommit=True)
    DB = Pool(db)                               # the running pool, for one-hop calls

    @app.post("/items/{name}")
    async def add(name: str, conn: Conn) -> int:
        return await conn.fetchval("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,))

    @app.get("/items/{item_id}")
    async def get(item_id: int, pool: DB) -> str | None:
        return await pool.fetchval("SELECT name FROM items WHERE id = %s", (item_id,))

Why "before the response" matters: FastAPI runs the code after ``yield`` in a
dependency *after the response was sent*, unless the dependency is declared
with ``Depends(..., scope="function")`` (FastAPI >= 0.121). A COMMIT that fails
there (a deferred foreign key, a serialization failure, the server going away)
would leave the client holding a 2xx for a write that does not exist, and a
read the client sends right after its 2xx may not see the write yet.
:func:`Connection` always declares ``scope="function"``: the COMMIT runs when
the endpoint returns, before the response is built, and a failed COMMIT is an
error response (500, or whatever your exception handlers say), never a 2xx.

Per request: a connection is lent when the endpoint is called (waiting up to
the pool's ``timeout``; past it :class:`~pgpool_async.PoolTimeout`, a 503 with
:func:`install_error_handlers`), committed if the endpoint returns, rolled back
if it raises (an ``HTTPException`` too), and returned to the pool either way,
also when the client disconnects mid-request.

The pool runs every database call in its own worker threads, never in the
thread pool FastAPI's sync (``def``) endpoints share, so a burst of blocked
sync endpoints cannot starve the async ones. Sync endpoints that need psycopg2
code get a raw connection from the same pool with :func:`SyncConnection`,
under a limit of their own.

Endpoints whose database work is one-hop pool calls (``await pool.fetchval(...)``,
``pool.execute``: each borrows, runs, commits and returns a connection before it
returns, so before the response) or their own ``async with pool.connection()``
block take the running pool with :func:`Pool`: a plain ``async def``
dependency, none of FastAPI's machinery for generator dependencies, so the
cheapest way in.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import anyio
import anyio.lowlevel
import psycopg2
from psycopg2.extensions import connection as PGConnection

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError(
        "pgpool_async.fastapi needs FastAPI, an optional extra: pip install 'pgpool_async[fastapi]'"
    ) from exc

from .connection import AsyncConnection
from .errors import CommitOutcomeUnknown, PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .pool import AsyncConnectionPool

_log = logging.getLogger("pgpool_async")

__all__ = [
    "AppPool",
    "Connection",
    "Pool",
    "SyncConnection",
    "connection_dependency",
    "health_router",
    "install_error_handlers",
    "pool_dependency",
    "pool_lifespan",
]

_NOT_STARTED = (
    "the app's pool is not running: use the app inside its lifespan (FastAPI(lifespan=db.lifespan))"
)


class AppPool:
    """An :class:`~pgpool_async.AsyncConnectionPool` rebuilt at each app startup.

    ``AppPool(*args, **kwargs)`` takes :class:`~pgpool_async.AsyncConnectionPool`'s
    arguments and does no I/O (arguments are checked at once: a bad one raises
    :class:`~pgpool_async.PoolConfigError` here). ``app = FastAPI(lifespan=db.lifespan)``
    builds and opens a new pool at startup and closes it at shutdown, so the same
    app can start again, e.g. in a second ``with TestClient(app)`` in a test suite
    (a closed pool cannot be reopened: its threads, limiters and waiters belonged
    to the event loop of the previous run).

    ``db.pool`` is the running pool (for ``await db.pool.fetchval(...)``);
    outside the lifespan it raises :class:`~pgpool_async.PoolClosed`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._build: Callable[[], AsyncConnectionPool] = lambda: AsyncConnectionPool(*args, **kwargs)
        self._pool: AsyncConnectionPool | None = None
        # Build one to check the arguments now, not at the first startup. No I/O.
        self._build()

    @classmethod
    def over(cls, engine: Any, **options: Any) -> AppPool:
        """One engine (a ``ThreadedConnectionPool`` the app's threads share), a new
        async face at each app startup (:meth:`AsyncConnectionPool.over
        <pgpool_async.AsyncConnectionPool.over>` and its ``options``), closed at
        shutdown; the engine stays open (its owner closes it).

        :raises PoolConfigError: not a ``ThreadedConnectionPool``, or bad options.
        """
        app_pool = cls.__new__(cls)
        app_pool._build = lambda: AsyncConnectionPool.over(engine, **options)
        app_pool._pool = None
        app_pool._build()  # checks the engine and options now; no I/O
        return app_pool

    @property
    def pool(self) -> AsyncConnectionPool:
        """The pool of the running app.

        :raises PoolClosed: the app is not started (or has shut down).
        """
        if self._pool is None:
            raise PoolClosed(_NOT_STARTED)
        return self._pool

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """FastAPI's ``lifespan``: build and open a pool, serve, close it.

        :raises PoolTimeout: ``minconn`` connections could not be opened within
            the pool's ``timeout`` (the app does not start).
        :raises PoolError: the app is already running (one pool per ``AppPool``).
        """
        if self._pool is not None:
            raise PoolError("this AppPool is already running: give each app (or app run) its own AppPool")
        pool = self._build()
        async with pool:
            self._pool = pool
            try:
                yield
            finally:
                self._pool = None

    def __repr__(self) -> str:
        return f"<AppPool {'running ' + repr(self._pool) if self._pool else 'stopped'}>"


PoolSource = AsyncConnectionPool | AppPool


def _current(source: PoolSource) -> AsyncConnectionPool:
    return source.pool if isinstance(source, AppPool) else source


def pool_lifespan(
    source: PoolSource,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan`` that opens the pool at startup and closes it at shutdown.

    With an :class:`AppPool`, the same as ``db.lifespan`` (the app may start
    again). With an :class:`~pgpool_async.AsyncConnectionPool`, the app can
    start once: a second startup raises :class:`~pgpool_async.PoolClosed`
    (use :class:`AppPool` when a test suite starts the app more than once).

    :raises PoolTimeout: ``minconn`` connections could not be opened in time.
    """
    if isinstance(source, AppPool):
        return source.lifespan

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with source:
            yield

    return lifespan


# -- async endpoints -------------------------------------------------------------------------


def connection_dependency(
    source: PoolSource, timeout: float | None = None, *, autocommit: bool = False
) -> Callable[[], AsyncIterator[AsyncConnection]]:
    """The dependency behind :func:`Connection`, for custom wiring. Declare it with
    ``scope="function"``::

        Conn = Annotated[AsyncConnection, Depends(connection_dependency(pool), scope="function")]

    Without ``scope="function"`` FastAPI commits after the response has been
    sent: a COMMIT that fails then is never reported to the client, which got
    a 2xx (see the module doc). :func:`Connection` declares it for you.

    ``timeout``: how long a request waits for a connection (default: the
    pool's); past it the endpoint is not run and :class:`~pgpool_async.PoolTimeout`
    propagates (a 503 with :func:`install_error_handlers`). ``autocommit``: lend
    the connection in autocommit mode (each statement commits on its own: one
    round trip per query, no COMMIT at the end); it goes back to the pool in the
    pool's own mode.
    """

    async def connection() -> AsyncIterator[AsyncConnection]:
        pool = _current(source)
        async with pool.connection(timeout=timeout) as conn:
            if autocommit and not pool.autocommit:
                loan = conn.loan
                # psycopg2 sends nothing here (we are outside a transaction): no I/O
                # on the loop, no thread hop. Restored below, before the connection goes back.
                loan.raw.autocommit = True
                try:
                    yield conn
                finally:
                    await loan.turn.wait_idle()  # a call cancelled mid-way may still run
                    if not conn.released and not conn.closed:
                        try:
                            loan.raw.autocommit = False
                        except psycopg2.Error:  # in a transaction: the pool rolls back, then resets
                            loan.session_changed = True
            else:
                yield conn

    return connection


def Connection(  # CapWords like FastAPI's Depends, Query, Path
    source: PoolSource, *, autocommit: bool = False, timeout: float | None = None
) -> Any:
    """``Conn = Connection(pool)``: the annotation for an endpoint parameter that
    gets a pooled :class:`~pgpool_async.AsyncConnection`, committed before the
    response (a failed COMMIT is a 5xx, never a 2xx), rolled back if the endpoint
    raises, returned either way.

    ``Annotated[AsyncConnection, Depends(connection_dependency(...), scope="function")]``
    under the hood: type checkers that reject a call in an annotation (mypy)
    accept that spelled-out form. See :func:`connection_dependency` for
    ``autocommit`` and ``timeout``.
    """
    dep = connection_dependency(source, timeout, autocommit=autocommit)
    return Annotated[AsyncConnection, Depends(dep, scope="function")]


def pool_dependency(source: PoolSource) -> Callable[[], Awaitable[AsyncConnectionPool]]:
    """The dependency behind :func:`Pool`, for custom wiring::

        DB = Annotated[AsyncConnectionPool, Depends(pool_dependency(db))]

    A plain ``async def`` (no ``yield``): FastAPI calls it and awaits it, with
    none of the exit-stack machinery a generator dependency costs, and nothing
    runs after the endpoint, so no ``scope`` is needed. It lends nothing: the
    endpoint's own pool calls borrow and return connections.

    With an :class:`AppPool` it returns ``db.pool``, the pool of the running
    app; outside the app's lifespan (the app not started, or shut down) it
    raises :class:`~pgpool_async.PoolClosed` and the endpoint is not run (a 503
    with ``Retry-After`` with :func:`install_error_handlers`, else a 500). With
    an :class:`~pgpool_async.AsyncConnectionPool` it returns that pool as is;
    its calls then raise :class:`~pgpool_async.PoolClosed` once it is closed
    (:class:`~pgpool_async.PoolError` before it was opened).
    """

    async def pool() -> AsyncConnectionPool:
        return _current(source)

    return pool


def Pool(source: PoolSource) -> Any:  # CapWords, like Connection
    """``DB = Pool(db)``: the annotation for an endpoint parameter that gets the
    running :class:`~pgpool_async.AsyncConnectionPool`, for endpoints whose
    database work is one-hop pool calls (``await pool.fetchone(...)``,
    ``pool.fetchval``, ``pool.execute``, ``pool.run_sync``: each borrows a
    connection, runs, commits and returns it before it returns, so before the
    response) or their own ``async with pool.connection()`` block (committed
    when the block exits, inside the endpoint).

    The cheapest way in: a plain ``async def`` dependency, where
    :func:`Connection` is a generator dependency that FastAPI wraps in an exit
    stack per request. Use :func:`Connection` when the endpoint should get one
    transaction committed for it before the response.

    Outside the app's lifespan, :class:`~pgpool_async.PoolClosed` (a 503 with
    :func:`install_error_handlers`); see :func:`pool_dependency`.
    ``Annotated[AsyncConnectionPool, Depends(pool_dependency(source))]`` under
    the hood: mypy, which rejects a call in an annotation, accepts that
    spelled-out form.
    """
    return Annotated[AsyncConnectionPool, Depends(pool_dependency(source))]


# -- sync endpoints --------------------------------------------------------------------------


class _SyncLimit:
    """At most ``limit`` connections lent to sync endpoints at once, per event loop run."""

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._limiter: anyio.CapacityLimiter | None = None
        self._token: object = None

    def get(self, pool: AsyncConnectionPool) -> anyio.CapacityLimiter:
        # A limiter belongs to the event loop that created it: make a new one when
        # the app runs on a new loop (a second TestClient).
        token = anyio.lowlevel.current_token()
        if self._limiter is None or self._token != token:
            limit = self._limit if self._limit is not None else max(1, math.ceil(pool.maxconn / 2))
            self._limiter = anyio.CapacityLimiter(limit)
            self._token = token
        return self._limiter


def sync_connection_dependency(
    source: PoolSource, limit: int | None = None, timeout: float | None = None
) -> Callable[[], AsyncIterator[PGConnection]]:
    """The dependency behind :func:`SyncConnection`; declare it with ``scope="function"``."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 (connections for sync endpoints), got {limit!r}")
    limits = _SyncLimit(limit)

    async def connection() -> AsyncIterator[PGConnection]:
        pool = _current(source)
        # Waiting (for the limit, then for a connection) happens here, on the
        # loop: a sync endpoint holds no thread of FastAPI's pool while it waits.
        async with limits.get(pool), pool.connection(timeout=timeout) as conn:
            yield conn.raw

    return connection


def SyncConnection(  # CapWords, like Connection
    source: PoolSource, *, limit: int | None = None, timeout: float | None = None
) -> Any:
    """``Raw = SyncConnection(pool)``: for sync ``def`` endpoints running psycopg2
    code, a raw ``psycopg2`` connection from the same pool.

    The endpoint runs in FastAPI's thread pool and uses the connection there
    (cursors must not outlive the endpoint); when it returns, the transaction
    is committed (before the response, in the pool's own thread) or, if it
    raised, rolled back; then the connection goes back to the pool.

    Sync endpoints hold their connection while they block, so at most ``limit``
    of them (default: half of ``maxconn``, rounded up) hold one at once; the
    others wait on the event loop, not in a thread. The rest of the pool stays
    for the async endpoints. The limit belongs to this ``SyncConnection(...)``: make one
    and use it on every sync endpoint. Using the connection after the endpoint returned,
    or from another thread at the same time, is undefined: don't.
    """
    dep = sync_connection_dependency(source, limit, timeout)
    return Annotated[PGConnection, Depends(dep, scope="function")]


# -- errors and health -----------------------------------------------------------------------


def install_error_handlers(app: FastAPI, retry_after: float = 1.0, *, database_errors: bool = True) -> None:
    """Answer the pool's and the database's errors with a status code, in one call.

    - :class:`~pgpool_async.PoolTimeout`, :class:`~pgpool_async.TooManyRequests`,
      :class:`~pgpool_async.PoolClosed`: ``503`` with ``Retry-After`` (``retry_after``
      seconds, rounded up), body ``{"detail": <the message>}`` (the pool's
      messages never contain a password).
    - with ``database_errors`` (default), psycopg2 errors that no endpoint
      handled, a failed COMMIT included: ``503`` with ``Retry-After`` for those
      worth retrying (serialization failure, deadlock, lost connection,
      ``OperationalError``), else ``500`` (:class:`~pgpool_async.CommitOutcomeUnknown`
      too: the COMMIT may have happened, a blind retry could apply it twice); body
      ``{"detail": "database error",
      "sqlstate": ...}`` (no SQL, no data), the error logged (logger
      ``pgpool_async``). Without this handler FastAPI answers 500 too, but
      uvicorn then closes the client's keep-alive connection.

    :raises ValueError: ``retry_after`` is negative.
    """
    if retry_after < 0:
        raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
    seconds = str(math.ceil(retry_after))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": seconds})

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        sqlstate = getattr(exc, "pgcode", None)
        # The COMMIT may have happened: a retry could apply the request twice.
        unknown = isinstance(exc, CommitOutcomeUnknown)
        retry = not unknown and (isinstance(exc, psycopg2.OperationalError) or sqlstate in _RETRYABLE)
        _log.error(
            "%s %s: database error (SQLSTATE %s)", request.method, request.url.path, sqlstate, exc_info=exc
        )
        detail = (
            "commit outcome unknown: the connection was lost during COMMIT" if unknown else "database error"
        )
        body = {"detail": detail, "sqlstate": sqlstate}
        if retry:
            return JSONResponse(body, status_code=503, headers={"Retry-After": seconds})
        return JSONResponse(body, status_code=500)

    for error in (PoolTimeout, TooManyRequests, PoolClosed):
        app.add_exception_handler(error, unavailable)
    if database_errors:
        # PoolError subclasses psycopg2.Error: the more specific handlers above win.
        app.add_exception_handler(psycopg2.Error, database_error)


# serialization_failure, deadlock_detected, and the connection_exception class
_RETRYABLE = frozenset({"40001", "40P01", "08000", "08003", "08006", "08001", "08004"})


def health_router(source: PoolSource, path: str = "/health", probe: float | None = 1.0) -> APIRouter:
    """``app.include_router(health_router(db))``: ``GET /health`` answers
    ``200 {"status": "ok", "pool": {stats}}`` when the pool is open and, with
    ``probe`` (seconds), a ``SELECT 1`` on a pooled connection succeeds within
    that time; else ``503 {"status": "unavailable", "error": ...}``.
    ``probe=None`` reports the stats without touching the database.
    """
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    async def health() -> JSONResponse:
        try:
            pool = _current(source)
            if pool.closed:
                raise PoolClosed("the pool is closed")
            if probe is not None:
                with anyio.fail_after(probe):
                    await pool.fetchval("SELECT 1", timeout=probe)
        except Exception as exc:  # whatever failed, the answer is "unavailable"
            return JSONResponse(
                {"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}, status_code=503
            )
        return JSONResponse({"status": "ok", "pool": pool.get_stats()})

    return router
