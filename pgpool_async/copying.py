"""COPY on a lent connection, streamed between the server and a sync or async file.

psycopg2 runs a COPY as one blocking call that reads from, or writes to, a
file-like object. Here that call runs in one of the pool's worker threads
(through :meth:`Loan.call_user <pgpool_async._loan.Loan.call_user>`, so it is the connection's one
operation in progress), and psycopg2 is handed an adapter:

- a **sync file** (``read``/``write`` return data: ``io.BytesIO``, an open
  file, a pipe) is called directly in the worker thread. A sync file that
  blocks (a slow disk, a pipe) only blocks that thread, never the event loop;
- an **async file** (``read``/``write`` are coroutine functions: ``anyio.open_file``,
  ``trio.open_file``, your own class) or an anyio byte stream (``receive`` /
  ``send``) is called back on the event loop with :func:`anyio.from_thread.run`,
  one chunk at a time.

Memory stays bounded whatever the table size: COPY FROM reads ``size`` bytes
(or characters) per call; COPY TO writes rows to a sync file as psycopg2
produces them, and to an async file in chunks of about ``size`` (rows are
gathered up to ``size``, then handed over in one call; the next chunk is only
gathered once that call returned).

Text or bytes: COPY TO gives ``str`` to a text file (an ``io.TextIOBase``, or
an async file wrapping one, as ``anyio.open_file(path, "w")`` does) and
``bytes`` to anything else; COPY FROM accepts either from ``read``.

Errors: bad data raises psycopg2's error (e.g. ``InvalidTextRepresentation``)
and leaves the transaction failed, as psycopg2 does; the pool rolls it back
when the connection is returned. An exception raised by the file itself
propagates as itself (psycopg2 would turn a failed ``read`` into
``QueryCanceled``; that error is its ``__cause__``), after the COPY was
aborted on the server, so the connection is never left mid-COPY. Cancelling
the caller aborts a COPY with an async file at its next chunk; a COPY with a
sync file runs to its end first (a worker thread cannot be interrupted).

psycopg2 refuses COPY while a wait callback is installed
(``psycopg2.extensions.set_wait_callback``, used by green-thread libraries):
every function here then raises :class:`~pgpool_async.errors.PoolError`
before touching the connection.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import anyio
import anyio.from_thread
import anyio.lowlevel
import psycopg2
import psycopg2.extensions
from psycopg2.extensions import connection as PGConnection
from psycopg2.extensions import cursor as PGCursor
from psycopg2.sql import Composable

from . import _libpq
from ._loan import Loan
from .errors import PoolError


class _PoolTasks(Protocol):
    def spawn(self, func: Callable[..., Coroutine[Any, Any, object]], *args: object) -> None: ...


class _Pool(Protocol):
    """What :func:`copy_out_stream` needs of an AsyncConnectionPool (no import: no cycle)."""

    @property
    def _tasks(self) -> _PoolTasks: ...

    def connection(self, timeout: float | None = None) -> AbstractAsyncContextManager[Any]: ...


__all__ = ["DEFAULT_SIZE", "copy_expert", "copy_from", "copy_out_stream", "copy_to"]

DEFAULT_SIZE = 8192
"""Bytes (or characters) per read for COPY FROM, and per chunk written to an async file."""

_STATUS_ACTIVE = psycopg2.extensions.TRANSACTION_STATUS_ACTIVE


async def copy_expert(conn: Loan, sql: str | Composable, file: object, size: int = DEFAULT_SIZE) -> int:
    """Run ``COPY ... FROM STDIN`` or ``COPY ... TO STDOUT`` with ``file``; returns the row count.

    The direction comes from ``sql``: ``file`` needs ``read`` (or ``receive``)
    for FROM STDIN, ``write`` (or ``send``) for TO STDOUT.

    :raises PoolError: a psycopg2 wait callback is set (nothing was sent).
    :raises TypeError: ``file`` can be neither read nor written.
    :raises ValueError: ``size`` is not a positive int.
    :raises psycopg2.Error: the server refused the COPY or the data.
    """
    adapter = _adapter(file, size, need_read=False, need_write=False)
    return await _run(conn, adapter, lambda cur: cur.copy_expert(sql, adapter, size), sql)


async def copy_from(
    conn: Loan,
    file: object,
    table: str,
    sep: str = "\t",
    null: str = "\\N",
    size: int = DEFAULT_SIZE,
    columns: Iterable[str] | None = None,
) -> int:
    """psycopg2's ``copy_from``: load ``table`` from ``file`` (text format); returns the row count.

    ``table`` and ``columns`` are quoted as identifiers (psycopg2 2.9): for a
    schema-qualified table use :func:`copy_expert`.

    :raises PoolError: a psycopg2 wait callback is set (nothing was sent).
    :raises TypeError: ``file`` has no ``read`` (nor ``receive``).
    :raises ValueError: ``size`` is not a positive int.
    :raises psycopg2.Error: the server refused the COPY or the data.
    """
    adapter = _adapter(file, size, need_read=True, need_write=False)
    cols = None if columns is None else list(columns)
    return await _run(
        conn,
        adapter,
        lambda cur: cur.copy_from(adapter, table, sep, null, size, cols),
        f"COPY {table} FROM STDIN",
    )


async def copy_to(
    conn: Loan,
    file: object,
    table: str,
    sep: str = "\t",
    null: str = "\\N",
    columns: Iterable[str] | None = None,
    size: int = DEFAULT_SIZE,
) -> int:
    """psycopg2's ``copy_to``: write ``table`` to ``file`` (text format); returns the row count.

    ``size`` is the chunk size for an async file. ``table`` and ``columns`` are
    quoted as identifiers (psycopg2 2.9): for a query, use :func:`copy_expert`
    with ``COPY (SELECT ...) TO STDOUT``.

    :raises PoolError: a psycopg2 wait callback is set (nothing was sent).
    :raises TypeError: ``file`` has no ``write`` (nor ``send``).
    :raises ValueError: ``size`` is not a positive int.
    :raises psycopg2.Error: the server refused the COPY.
    """
    adapter = _adapter(file, size, need_read=False, need_write=True)
    cols = None if columns is None else list(columns)
    return await _run(
        conn, adapter, lambda cur: cur.copy_to(adapter, table, sep, null, cols), f"COPY {table} TO STDOUT"
    )


def copy_out_stream(
    pool: _Pool,
    sql: str | Composable,
    size: int = DEFAULT_SIZE,
    timeout: float | None = None,
) -> AsyncIterator[bytes]:
    """``COPY ... TO STDOUT`` as an async iterator of byte chunks (about ``size`` bytes each),
    e.g. the body of a FastAPI/Starlette ``StreamingResponse``::

        return StreamingResponse(copy_out_stream(pool, "COPY items TO STDOUT (FORMAT csv)"))

    The COPY runs on a connection of its own, borrowed from ``pool`` (waiting up
    to ``timeout``, default the pool's) when iteration starts, by a task of the
    pool: the stream outlives the endpoint that returned it. Chunks are handed
    over one at a time, so memory stays bounded however slow the reader is.

    Closing the iterator early (``aclose()``, ``break``, a cancelled reader, an
    HTTP client that disconnects) aborts the COPY at its next chunk; the
    connection is cleaned (the rest of the COPY is dropped, the transaction
    rolled back) and goes back to the pool. An error (bad SQL, ``PoolTimeout``,
    the pool closing: ``PoolClosed``) is raised by the iterator; in an HTTP
    response already started, that ends the body abruptly, never cleanly.

    :raises ValueError: ``size`` is not a positive int (at once).
    :raises PoolError: a psycopg2 wait callback is set (at once; nothing was sent).
    """
    _adapter(io.BytesIO(), size, need_read=False, need_write=True)  # checks size; no I/O
    _check_no_wait_callback()
    return _copy_out_chunks(pool, sql, size, timeout)


async def _copy_out_chunks(
    pool: _Pool, sql: str | Composable, size: int, timeout: float | None
) -> AsyncIterator[bytes]:
    send, receive = anyio.create_memory_object_stream[bytes](1)
    failure: list[BaseException] = []

    async def produce() -> None:
        # A task of the pool's group: it must never raise (that would stop the
        # group), except the cancellation of a closing pool.
        with send:  # closing it ends the reader's iteration
            try:
                async with pool.connection(timeout=timeout) as conn:
                    await conn.copy_expert(sql, send, size)
            except anyio.BrokenResourceError:
                pass  # the reader went away: the COPY was aborted, the connection rolled back
            except anyio.get_cancelled_exc_class():
                failure.append(PoolError("the COPY stream was stopped: its pool is closing"))
                raise
            except Exception as exc:
                failure.append(exc)

    pool._tasks.spawn(produce)
    with receive:  # closed however the reader leaves (aclose, cancellation, garbage collection)
        async for chunk in receive:
            yield chunk
    if failure:
        raise failure[0]


# -- on the event loop ------------------------------------------------------------


def _check_no_wait_callback() -> None:
    if psycopg2.extensions.get_wait_callback() is not None:
        raise PoolError(
            "COPY cannot run while a psycopg2 wait callback is set "
            "(psycopg2.extensions.set_wait_callback): unset it with "
            "psycopg2.extensions.set_wait_callback(None) before using COPY"
        )


async def _run(conn: Loan, adapter: _CopyFile, call: Callable[[PGCursor], None], statement: Any) -> int:
    _check_no_wait_callback()
    try:
        # A cancellation stops the COPY at its next chunk (anyio alone would not
        # reliably cancel the loop calls of a thread that is between chunks).
        raw = conn.raw

        def on_cancel() -> Callable[[], None]:
            adapter.abort()
            # A COPY blocked on a silent network never reaches its next chunk.
            return _libpq.shutdown_later(raw)

        return await conn.call_user(_copy_in_thread, adapter, call, on_cancel=on_cancel, statement=statement)
    except BaseException as exc:
        error = adapter.error
        if error is None:
            raise
        # The file failed, or a call back to the loop was cancelled (the thread
        # then sees concurrent.futures.CancelledError, a plain Exception):
        # deliver the caller's cancellation if that is what happened, else the
        # file's own exception (psycopg2 turns a failed read into QueryCanceled).
        await anyio.lowlevel.checkpoint_if_cancelled()
        if error is exc:
            raise
        raise error from exc


# -- in the worker thread ---------------------------------------------------------


def _copy_in_thread(raw: PGConnection, adapter: _CopyFile, call: Callable[[PGCursor], None]) -> int:
    with raw.cursor() as cur:
        try:
            call(cur)
            adapter.finish()
        except BaseException:
            _leave_copy_out(raw)
            raise
        rowcount: int = cur.rowcount
        return rowcount


def _leave_copy_out(raw: PGConnection) -> None:
    """psycopg2 leaves a COPY TO whose ``write`` failed half read: stop the
    server sending (cancel) and swallow what is left, so the connection is
    usable (its transaction failed, if one was open)."""
    if raw.closed or raw.get_transaction_status() != _STATUS_ACTIVE:
        return
    try:
        if not _libpq.cancel(raw):  # never psycopg2's cancel: it holds the GIL
            _libpq.shutdown_socket(raw)  # no cancel got through: give the connection up
            return
        with raw.cursor() as cur:
            cur.execute("SELECT 1")  # libpq drops the rest of the COPY data first
    except psycopg2.Error:
        pass  # "canceling statement" or "current transaction is aborted": expected


class CopyAborted(Exception):
    """Raised in the worker thread to stop a COPY whose caller was cancelled;
    the caller sees its cancellation, not this."""


class _CopyFile:
    """What psycopg2 reads from and writes to, in the worker thread.

    ``read`` and ``write`` reach the user's file directly (sync) or through the
    event loop (async); the first exception the file raises is kept in ``error``.
    """

    def __init__(
        self,
        reader: Callable[[int], Any] | None,
        writer: Callable[[Any], object] | None,
        size: int,
        buffered: bool,
        text: bool,
    ) -> None:
        self.error: BaseException | None = None
        # Set on the loop when the caller is cancelled; the next chunk aborts the COPY.
        self.aborted = False
        self._reader = reader
        self._writer = writer
        self._size = size
        self._buffered = buffered
        self._empty: str | bytes = "" if text else b""
        self._pending: list[Any] = []
        self._pending_len = 0

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def read(self, size: int | None = -1, /) -> Any:
        if self._reader is None:
            exc = TypeError("COPY FROM STDIN needs a file with read() (or an anyio byte stream)")
            self._fail(exc)
            raise exc
        try:
            self._check_aborted()
            return self._reader(self._size if size is None or size < 0 else size)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _check_aborted(self) -> None:
        if self.aborted:
            raise CopyAborted("the COPY's caller was cancelled")

    def abort(self) -> None:
        """On the loop: the caller was cancelled; stop at the next chunk."""
        self.aborted = True

    def readline(self, size: int | None = -1, /) -> Any:
        """Only here because psycopg2's ``copy_from`` checks for it; never called."""
        raise io.UnsupportedOperation("readline")

    def write(self, data: Any) -> int:
        if self._writer is None:
            exc = TypeError("COPY TO STDOUT needs a file with write() (or an anyio byte stream)")
            self._fail(exc)
            raise exc
        if not self._buffered:
            self._call_writer(data)
            return len(data)
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= self._size:
            self.finish()
        return len(data)

    def finish(self) -> None:
        """Hand the gathered rows to an async file, as one chunk."""
        if self._pending:
            chunk = self._empty.join(self._pending)
            self._pending.clear()
            self._pending_len = 0
            self._call_writer(chunk)

    def _call_writer(self, data: Any) -> None:
        assert self._writer is not None
        try:
            self._check_aborted()
            self._writer(data)
        except BaseException as exc:
            self._fail(exc)
            raise


class _TextCopyFile(_CopyFile, io.TextIOBase):
    """The same, seen by psycopg2 as a text file: COPY TO hands it ``str`` rows."""


def _adapter(file: object, size: int, *, need_read: bool, need_write: bool) -> _CopyFile:
    """The adapter for ``file``, built on the loop; checks arguments, no I/O."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int (bytes per chunk), got {size!r}")
    reader = _reader(file)
    writer, buffered = _writer(file)
    if (need_read and reader is None) or (need_write and writer is None) or (reader is writer is None):
        wanted = "read()" if need_read else "write()" if need_write else "read() or write()"
        raise TypeError(
            f"COPY needs a file-like object with {wanted} (sync or async) or an anyio byte "
            f"stream, got {type(file).__name__}"
        )
    cls = _TextCopyFile if _is_text(file) else _CopyFile
    return cls(reader, writer, size, buffered, text=cls is _TextCopyFile)


def _is_async(method: object) -> bool:
    return inspect.iscoroutinefunction(method)


def _reader(file: object) -> Callable[[int], Any] | None:
    read = getattr(file, "read", None)
    if callable(read):
        if _is_async(read):
            return lambda n: anyio.from_thread.run(read, n)
        return lambda n: _not_awaitable(read(n), read)
    receive = getattr(file, "receive", None)
    if callable(receive) and _is_async(receive):
        return lambda n: anyio.from_thread.run(_receive, receive, n)
    return None


async def _receive(receive: Callable[[int], Any], n: int) -> Any:
    try:
        return await receive(n)
    except anyio.EndOfStream:
        return b""


def _writer(file: object) -> tuple[Callable[[Any], object] | None, bool]:
    """The write call, and whether rows are gathered into chunks first (async files)."""
    write = getattr(file, "write", None)
    if callable(write):
        if _is_async(write):
            return (lambda data: anyio.from_thread.run(write, data)), True
        return (lambda data: _not_awaitable(write(data), write)), False
    send = getattr(file, "send", None)
    if callable(send) and _is_async(send):
        return (lambda data: anyio.from_thread.run(send, data)), True
    return None, False


def _not_awaitable(result: Any, method: object) -> Any:
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(
            f"{method!r} returned an awaitable but is not an 'async def' function: "
            "COPY can't tell it is async; wrap it in an async def"
        )
    return result


def _is_text(file: object) -> bool:
    """A text file, or an async file (anyio's ``wrapped``) or tempfile wrapper around one."""
    return any(
        isinstance(candidate, io.TextIOBase)
        for candidate in (file, getattr(file, "wrapped", None), getattr(file, "file", None))
    )
