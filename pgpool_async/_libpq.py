"""The libpq psycopg2 loaded, reached through ``ctypes``, and what the pool does with it.

Why: psycopg2's ``connection.cancel()`` runs libpq's ``PQcancel`` while holding
the GIL, and ``PQcancel`` blocks in ``connect()`` for as long as the kernel
retries SYNs (up to ~2 min) when the server is unreachable: every thread of the
process stops, the event loop included. A ``ctypes`` call releases the GIL,
and libpq 17's ``PQcancelCreate``/``PQcancelPoll`` let the request carry a
deadline of its own. When a worker still does not come back, the pool shuts
its connection's socket down (``shutdown_socket``): the blocked libpq call fails
at once and the connection is discarded.

:func:`libpq` finds the library psycopg2 actually uses (psycopg2-binary bundles
its own in ``psycopg2_binary.libs``) by reading ``/proc/self/maps`` after
importing ``psycopg2._psycopg``; elsewhere (no ``/proc``) it returns None and
the cancel falls back to psycopg2's own, in a daemon thread. Other modules may
add prototypes here: keep the loader under this name.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import math
import os
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import psycopg2._psycopg
import psycopg2.errors
import psycopg2.extensions
from psycopg2.extensions import connection as PGConnection

__all__ = [
    "CANCEL_GRACE",
    "libpq_gil",
    "libpq_path",
    "unavailable_reason",
    "CANCEL_TIMEOUT",
    "CancelGate",
    "PendingCancel",
    "cancel",
    "cancel_in_background",
    "libpq",
    "shutdown_later",
    "shutdown_socket",
    "send_cancel_then",
    "shutdown_sockets",
    "was_shut_down",
    "with_network_defaults",
]

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_INTRANS = psycopg2.extensions.TRANSACTION_STATUS_INTRANS

# How long a cancel request may take (connect + send), and how long the caller
# waits for its worker after asking before the socket is shut down.
CANCEL_TIMEOUT = 2.0
CANCEL_GRACE = 1.0
# A cancel is sent this long after it is asked for: a statement that ends
# meanwhile (most do) needs none, and its connection no clean-up.
CANCEL_DELAY = 0.01

# PostgresPollingStatusType and ConnStatusType (libpq-fe.h).
_POLLING_FAILED, _POLLING_READING, _POLLING_WRITING, _POLLING_OK = 0, 1, 2, 3
_CONNECTION_OK = 0
# ExecStatusType, and PG_DIAG_SQLSTATE.
_PGRES_TUPLES_OK, _PGRES_FATAL_ERROR = 2, 7
_DIAG_SQLSTATE = ord("C")
_QUERY_CANCELED = b"57014"


def _loaded_libpq_path() -> str | None:
    """The file of the libpq mapped into this process (psycopg2 is imported)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                name = path.rsplit("/", 1)[-1]
                if path.startswith("/") and name.startswith("libpq") and ".so" in name:
                    return path
    except OSError:
        return None
    return None


@functools.cache
def libpq() -> ctypes.CDLL | None:
    """The libpq psycopg2 uses, with prototypes set; None where it can't be found.

    Loading the already-mapped file returns the same library (``dlopen`` shares
    the handle), so pointers from ``connection.pgconn_ptr`` are valid for it.
    """
    assert psycopg2._psycopg  # the extension (and its libpq) is loaded
    # The file psycopg2's own module resolves PQsendQuery in (libpq_path), else
    # the first libpq mapped (with psycopg 3's wheel loaded too, maybe the wrong one).
    path = libpq_path() or _loaded_libpq_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    vp, i, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    _proto(lib, "PQlibVersion", i)
    _proto(lib, "PQsocket", i, vp)
    _proto(lib, "PQgetCancel", vp, vp)
    _proto(lib, "PQcancel", i, vp, cp, i)
    _proto(lib, "PQfreeCancel", None, vp)
    _proto(lib, "PQexec", vp, vp, cp)
    _proto(lib, "PQresultStatus", i, vp)
    _proto(lib, "PQresultErrorField", cp, vp, i)
    _proto(lib, "PQclear", None, vp)
    # libpq >= 17: a cancel request that can be polled, hence bounded.
    if hasattr(lib, "PQcancelCreate"):
        _proto(lib, "PQcancelCreate", vp, vp)
        _proto(lib, "PQcancelStart", i, vp)
        _proto(lib, "PQcancelPoll", i, vp)
        _proto(lib, "PQcancelStatus", i, vp)
        _proto(lib, "PQcancelSocket", i, vp)
        _proto(lib, "PQcancelFinish", None, vp)
    return lib


def _proto(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
    func = getattr(lib, name)
    func.restype = restype
    func.argtypes = list(argtypes)


def _has_poll_cancel(lib: ctypes.CDLL) -> bool:
    return hasattr(lib, "PQcancelCreate")


# -- cancelling -------------------------------------------------------------------


class _Request:
    """A cancel request prepared without I/O (on any thread), sent by :meth:`send`.

    Preparing copies what libpq needs from the connection, so sending stays safe
    even if the connection is closed meanwhile.
    """

    def __init__(self, raw: PGConnection) -> None:
        self.raw: PGConnection | None = None
        self._lib = libpq()
        self._handle: int | None = None
        if self._lib is None:
            self.raw = raw  # psycopg2's cancel, the fallback
            return
        ptr = raw.pgconn_ptr
        if ptr is None:
            return
        if _has_poll_cancel(self._lib):
            self._handle = self._lib.PQcancelCreate(ptr)
        else:
            self._handle = self._lib.PQgetCancel(ptr)

    def send(self, timeout: float) -> bool:
        """Send the request, for at most ``timeout`` seconds; True if it was delivered.

        Never raises; frees the request. The GIL is released while libpq works.
        """
        lib, handle = self._lib, self._handle
        self._handle = None
        if lib is None:
            return _psycopg2_cancel(self.raw, timeout) if self.raw is not None else False
        if not handle:
            return False
        if _has_poll_cancel(lib):
            try:
                return _poll_cancel(lib, handle, time.monotonic() + timeout)
            finally:
                lib.PQcancelFinish(handle)
        return _blocking_cancel(lib, handle, timeout)

    def discard(self) -> None:
        """Free the request unsent."""
        lib, handle = self._lib, self._handle
        self._handle = None
        if lib is not None and handle:
            if _has_poll_cancel(lib):
                lib.PQcancelFinish(handle)
            else:
                lib.PQfreeCancel(handle)


def _poll_cancel(lib: ctypes.CDLL, handle: int, deadline: float) -> bool:
    if not lib.PQcancelStart(handle):
        return False
    status = _POLLING_WRITING  # libpq's rule: wait for writable first
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        fd = lib.PQcancelSocket(handle)
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN if status == _POLLING_READING else select.POLLOUT)
        if not poller.poll(math.ceil(remaining * 1000)):
            return False
        status = lib.PQcancelPoll(handle)
        if status == _POLLING_OK:
            return bool(lib.PQcancelStatus(handle) == _CONNECTION_OK)
        if status == _POLLING_FAILED:
            return False


def _blocking_cancel(lib: ctypes.CDLL, handle: int, timeout: float) -> bool:
    """libpq < 17: ``PQcancel`` has no timeout; run it in a daemon thread of its
    own and stop waiting at the deadline (the thread frees the request)."""
    outcome: list[bool] = []

    def run() -> None:
        errbuf = ctypes.create_string_buffer(256)
        try:
            outcome.append(bool(lib.PQcancel(handle, errbuf, len(errbuf))))
        finally:
            lib.PQfreeCancel(handle)

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(run,), name="pgpool-cancel-send", daemon=True
    )
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def _psycopg2_cancel(raw: PGConnection, timeout: float) -> bool:
    """No libpq found: psycopg2's cancel (it holds the GIL while it connects)."""
    outcome: list[bool] = []

    def run() -> None:
        with contextlib.suppress(Exception):
            raw.cancel()
            outcome.append(True)

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(run,), name="pgpool-cancel-send", daemon=True
    )
    thread.start()
    thread.join(timeout)
    return bool(outcome)


def cancel(raw: PGConnection, timeout: float = CANCEL_TIMEOUT) -> bool:
    """Ask the server to cancel ``raw``'s running statement; blocks up to ``timeout``.

    For worker threads (never the event loop). True if the request was
    delivered (the statement may have ended anyway); False if it could not be
    sent in time or the connection is closed. Never raises.
    """
    if raw.closed:
        return False
    try:
        request = _Request(raw)
    except Exception:
        return False
    return request.send(timeout)


def cancel_in_background(raw: PGConnection, timeout: float = CANCEL_TIMEOUT) -> PendingCancel | None:
    """Send a cancel for ``raw`` from a daemon thread; returns at once (no I/O here).

    For the event loop: a caller cancelled while its worker runs a statement.
    Returns the request in flight (None if the connection is closed already):
    calling it shuts the connection's socket down, for the caller to do if the
    worker is still busy :data:`CANCEL_GRACE` seconds later; its ``wait`` lets
    the worker hold the connection until the request is settled (see
    :class:`CancelGate`).
    """
    if raw.closed:
        return None
    request: _Request | None = None
    # The first cancel of the process finds the library (reads /proc/self/maps):
    # that is file I/O, so it happens in the thread, with the request.
    if libpq.cache_info().currsize:
        try:
            request = _Request(raw)
        except Exception:
            return None
    pending = PendingCancel(raw)
    threading.Thread(
        target=contextvars.copy_context().run,
        args=(pending._send, request, timeout),
        name="pgpool-cancel",
        daemon=True,
    ).start()
    return pending


def send_cancel_then(
    raw: PGConnection, done: Callable[[bool], object], timeout: float = CANCEL_TIMEOUT
) -> bool:
    """Ask the server to cancel ``raw``'s running statement from a daemon thread,
    then call ``done(delivered)`` in that thread; no I/O here (libpq must be
    loaded). The request is bounded by ``timeout`` where libpq has
    ``PQcancelPoll`` (17+), and sent with the GIL released either way.
    False (nothing started) if the connection is closed or libpq is not loaded."""
    if raw.closed or not libpq.cache_info().currsize:
        return False
    try:
        request = _Request(raw)
    except Exception:
        return False

    def run() -> None:
        delivered = False
        try:
            delivered = request.send(timeout)
        finally:
            done(delivered)

    threading.Thread(
        target=contextvars.copy_context().run, args=(run,), name="pgpool-native-cancel", daemon=True
    ).start()
    return True


def _cancelled_by_request(error: BaseException | None) -> bool:
    """The statement ended cancelled by a cancel request (ours: the interrupt is
    consumed). Cancelled by ``statement_timeout`` or a lock timeout instead, our
    request may still land on the next statement. The server's words are read; in
    another language the answer is False, the cautious one."""
    if not isinstance(error, psycopg2.errors.QueryCanceled):
        return False
    primary = error.diag.message_primary or ""
    return "user request" in primary


def _consume_interrupt(raw: PGConnection) -> bool:
    """In the worker: run ``SELECT 1`` through libpq (no psycopg2 transaction
    handling), after a cancel request was delivered. The backend handled the
    cancel's signal before it could read this query: either the interrupt was
    ignored (idle) and this succeeds, or it is pending and cancels this instead
    of the next caller's statement. True if nothing can be pending any more.
    Only for an idle connection or one in a good transaction."""
    lib = libpq()
    if lib is None or raw.closed:
        return False
    if raw.get_transaction_status() not in (_STATUS_IDLE, _STATUS_INTRANS):
        return False
    ptr = raw.pgconn_ptr
    if ptr is None:
        return False
    result = lib.PQexec(ptr, b"SELECT 1")
    if not result:
        return False
    try:
        status = lib.PQresultStatus(result)
        if status == _PGRES_TUPLES_OK:
            return True
        sqlstate: bytes | None = lib.PQresultErrorField(result, _DIAG_SQLSTATE)
        return status == _PGRES_FATAL_ERROR and sqlstate == _QUERY_CANCELED
    finally:
        lib.PQclear(result)


class PendingCancel:
    """A cancel request sent from its own thread, :data:`CANCEL_DELAY` seconds
    after it was asked for unless withdrawn meanwhile (the statement ended)."""

    def __init__(self, raw: PGConnection) -> None:
        self.raw = raw
        self._settled = threading.Event()
        self._withdrawn = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def _send(self, request: _Request | None, timeout: float) -> None:
        try:
            self._withdrawn.wait(CANCEL_DELAY)
            with self._lock:
                if self._withdrawn.is_set():
                    if request is not None:
                        request.discard()
                    return
                self._started = True
            if request is None:
                request = _Request(self.raw)
            request.send(timeout)
        except Exception:
            pass  # a cancel is best effort: the grace period and the shutdown still bound the wait
        finally:
            self._settled.set()

    def withdraw(self) -> bool:
        """Stop the request if it is not being sent yet; True if it never will be."""
        with self._lock:
            if self._started:
                return False
            self._withdrawn.set()
            return True

    def wait(self, timeout: float) -> bool:
        """Block until the request was delivered or given up; False at ``timeout``."""
        return self._settled.wait(timeout)

    def __call__(self) -> None:
        """The worker is still busy after the grace period: shut its socket down.

        The connection is then never reused, so a cancel landing late can hurt
        no other statement: nobody needs to wait for the request any more."""
        shutdown_socket(self.raw)
        self._settled.set()


class CancelGate:
    """Pairs one worker call with the cancel its caller may ask for.

    A cancel that reaches the server after the statement ended would cancel the
    connection's *next* statement (another caller's): the backend notes the
    interrupt and, if the next query is already waiting on its socket, runs it
    and cancels it. So a call already over is never cancelled; a call that was
    asked to cancel keeps its connection until the request is settled (sent, or
    given up at its deadline); and unless the statement did end cancelled (the
    interrupt consumed), the connection's socket is shut down, so it is
    discarded and never reused. psycopg2's own cancel narrowed that window by
    holding the GIL; this holds only a lock, for a few attribute reads.
    """

    __slots__ = ("_done", "_lock", "_pending")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._pending: object = None

    def ask(self, on_cancel: Callable[[], object]) -> object:
        """On the loop: ``on_cancel()`` unless the call is over; returns its result."""
        with self._lock:
            if self._done:
                return None
            self._pending = on_cancel()
            return self._pending

    def finish(self, error: BaseException | None) -> None:
        """In the worker, once the call returned or raised ``error``: settle a cancel
        in flight, and give the connection up unless the statement ended cancelled."""
        with self._lock:
            self._done = True
            pending = self._pending
        # Unless the statement ended cancelled, the cancel may have reached the
        # server after it ended: its interrupt may still be pending. Consume it, or give up.
        if (
            isinstance(pending, PendingCancel)
            and not _cancelled_by_request(error)
            and not pending.withdraw()
            and not (pending.wait(CANCEL_TIMEOUT) and _consume_interrupt(pending.raw))
        ):
            pending()

    def abandon(self) -> None:
        """On the loop, once the call is known to be over or never to run (anyio
        skips a thread call cancelled before it started): if a cancel was asked and
        no statement consumed it, give the connection up. No-op after :meth:`finish`."""
        with self._lock:
            if self._done:
                return
            self._done = True
            pending = self._pending
        if isinstance(pending, PendingCancel) and not pending.withdraw():
            pending()  # its interrupt would land on the connection's next statement


def shutdown_later(raw: PGConnection) -> Callable[[], None]:
    """The call :func:`shutdown_socket` ``(raw)``, to make later (no I/O now)."""
    return functools.partial(shutdown_socket, raw)


# -- shutting sockets down --------------------------------------------------------

_shut: weakref.WeakSet[PGConnection] = weakref.WeakSet()
_shut_any = False  # shutdown_socket was ever called


def shutdown_socket(raw: PGConnection) -> None:
    """``shutdown(SHUT_RDWR)`` on ``raw``'s socket: a worker blocked on it fails at
    once (libpq sees the connection lost) and the connection is closed once the
    worker gives it back. The fd stays open (libpq closes it). Never raises.
    """
    if raw.closed:
        return
    try:
        fd = raw.fileno()
    except Exception:
        return
    global _shut_any
    _shut.add(raw)
    _shut_any = True
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more: nothing to wake
    finally:
        sock.detach()


def shutdown_sockets(conns: Any) -> int:
    """:func:`shutdown_socket` on each connection of ``conns``; returns how many were open."""
    count = 0
    for raw in list(conns):
        if not raw.closed:
            count += 1
            shutdown_socket(raw)
    return count


def was_shut_down(raw: PGConnection) -> bool:
    """True if :func:`shutdown_socket` was called on ``raw``: it must not be reused."""
    # (A WeakSet's len() runs Python: the flag spares the lookup until the first shutdown.)
    return _shut_any and raw in _shut


# -- connection parameters ------------------------------------------------------------

KEEPALIVES_IDLE = 10
KEEPALIVES_INTERVAL = 3
KEEPALIVES_COUNT = 3
MIN_TCP_USER_TIMEOUT = 10.0
MAX_TCP_USER_TIMEOUT = 30.0


def with_network_defaults(kwargs: dict[str, Any], params: dict[str, str], timeout: float) -> dict[str, Any]:
    """Bound how long a dead network can hold a connection, unless the user chose.

    Without these, a statement in flight when the network goes silent waits for
    TCP's retransmissions (minutes) and ends long after the network is back.
    Each of ``keepalives=1``, ``keepalives_idle=10``, ``keepalives_interval=3``,
    ``keepalives_count=3`` and ``tcp_user_timeout`` (half the pool ``timeout``,
    kept within 10..30 s, in ms) is added only if absent from the user's
    arguments (``params``: them, parsed). Under 10 s, healthy connections were
    dropped under 30% packet loss. Unix-socket connections ignore them.
    """
    extra: dict[str, Any] = {}
    if "keepalives" not in params:
        extra["keepalives"] = 1
    if params.get("keepalives", "1") != "0":
        for key, value in (
            ("keepalives_idle", KEEPALIVES_IDLE),
            ("keepalives_interval", KEEPALIVES_INTERVAL),
            ("keepalives_count", KEEPALIVES_COUNT),
        ):
            if key not in params:
                extra[key] = value
    # tcp_user_timeout is a libpq 12 keyword: an older libpq would refuse to connect.
    if "tcp_user_timeout" not in params and psycopg2.extensions.libpq_version() >= 120000:
        half = MAX_TCP_USER_TIMEOUT if math.isinf(timeout) else timeout / 2
        seconds = min(MAX_TCP_USER_TIMEOUT, max(MIN_TCP_USER_TIMEOUT, half))
        extra["tcp_user_timeout"] = int(seconds * 1000)
    return {**kwargs, **extra} if extra else kwargs


# -- the loop-native path (pgpool_async._loop.native) -------------------------------------
# Where psycopg2's libpq is, found robustly: ``dlsym`` through psycopg2's own extension
# module resolves ``PQsendQuery`` in the libpq it links to, ``dladdr`` names that file,
# which must be mapped (``/proc/self/maps``) and report psycopg2's ``libpq_version()``.
# ``libpq_gil()`` is a second handle (``ctypes.PyDLL``) on the same file, for the many
# short calls that never wait: it keeps the GIL (releasing it around each would cost more
# than the call, and with busy worker threads could wait a whole switch interval).

_lock = threading.Lock()
_reason: str | None = None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _mapped_files() -> set[str]:
    files = set()
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                files.add(parts[5].rstrip("\n"))
    return files


def _find() -> str:
    """The path of psycopg2's libpq; raises OSError with the reason otherwise."""
    if not sys.platform.startswith("linux"):
        raise OSError(f"the loop-native path is only built for Linux, not {sys.platform}")
    import psycopg2._psycopg as psycopg_ext
    import psycopg2.extensions

    ext = ctypes.CDLL(psycopg_ext.__file__)  # already loaded: the same handle
    try:
        address = ctypes.cast(ext.PQsendQuery, ctypes.c_void_p).value
    except AttributeError as exc:
        raise OSError("psycopg2's module does not resolve libpq's PQsendQuery") from exc
    libc = ctypes.CDLL(None)
    dladdr = libc.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        raise OSError("dladdr could not name the file holding psycopg2's libpq")
    path = os.path.realpath(os.fsdecode(info.dli_fname))
    if path not in {os.path.realpath(f) for f in _mapped_files()}:
        raise OSError(f"{path} (psycopg2's libpq by dladdr) is not in /proc/self/maps")
    lib = ctypes.CDLL(path)
    lib.PQlibVersion.restype = ctypes.c_int
    lib.PQlibVersion.argtypes = []
    found = lib.PQlibVersion()
    wanted = psycopg2.extensions.libpq_version()
    if found != wanted:
        raise OSError(f"{path} is libpq {found}, psycopg2 uses {wanted}")
    return path


@functools.cache
def libpq_path() -> str | None:
    """The file of the libpq psycopg2 loaded, or None (see :func:`unavailable_reason`)."""
    global _reason
    with _lock:
        try:
            return _find()
        except (OSError, ImportError) as exc:
            _reason = str(exc)
            return None


def unavailable_reason() -> str | None:
    """Why :func:`libpq` is None, or None when it is available."""
    libpq_path()
    return _reason


@functools.cache
def libpq_gil() -> ctypes.PyDLL | None:
    """psycopg2's libpq, each call keeping the GIL: only for calls that never wait."""
    path = libpq_path()
    if path is None:
        return None
    lib = ctypes.PyDLL(path)
    _prototypes(lib)
    return lib


# -- prototypes ---------------------------------------------------------------------
# Pointers travel as c_void_p. PQgetvalue returns c_char_p: values in text format
# never contain a NUL byte, so one call yields the bytes (the hot path of row conversion).

_P = ctypes.c_void_p
_I = ctypes.c_int
_S = ctypes.c_char_p


class PGnotify(ctypes.Structure):
    """libpq's ``PGnotify``: the public head of the struct (libpq's own list
    link follows it; only libpq allocates or frees one)."""

    _fields_ = [("relname", ctypes.c_char_p), ("be_pid", ctypes.c_int), ("extra", ctypes.c_char_p)]


_PROTOTYPES: dict[str, tuple[list[type], type | None]] = {
    # connection
    "PQstatus": ([_P], _I),
    "PQtransactionStatus": ([_P], _I),
    "PQsocket": ([_P], _I),
    "PQerrorMessage": ([_P], _S),
    "PQsetnonblocking": ([_P, _I], _I),
    "PQisnonblocking": ([_P], _I),
    "PQsslInUse": ([_P], _I),
    "PQsslStruct": ([_P, _S], _P),
    "PQgssEncInUse": ([_P], _I),
    "PQlibVersion": ([], _I),
    # sending and receiving
    "PQsendQuery": ([_P, _S], _I),
    "PQflush": ([_P], _I),
    "PQconsumeInput": ([_P], _I),
    "PQisBusy": ([_P], _I),
    "PQgetResult": ([_P], _P),
    "PQputCopyEnd": ([_P, _S], _I),
    "PQgetCopyData": ([_P, ctypes.POINTER(ctypes.c_char_p), _I], _I),
    "PQfreemem": ([_P], None),
    "PQnotifies": ([_P], ctypes.POINTER(PGnotify)),
    # results
    "PQresultStatus": ([_P], _I),
    "PQresultErrorMessage": ([_P], _S),
    "PQresultErrorField": ([_P, _I], _S),
    "PQclear": ([_P], None),
    "PQntuples": ([_P], _I),
    "PQnfields": ([_P], _I),
    "PQfname": ([_P, _I], _S),
    "PQftype": ([_P, _I], ctypes.c_uint),
    "PQfsize": ([_P, _I], _I),
    "PQfmod": ([_P, _I], _I),
    "PQftable": ([_P, _I], ctypes.c_uint),
    "PQftablecol": ([_P, _I], _I),
    "PQgetvalue": ([_P, _I, _I], _S),
    "PQgetisnull": ([_P, _I, _I], _I),
    "PQcmdStatus": ([_P], _S),
    "PQcmdTuples": ([_P], _S),
    "PQoidValue": ([_P], ctypes.c_uint),
    # cancel
    "PQgetCancel": ([_P], _P),
    "PQcancel": ([_P, _P, _I], _I),
    "PQfreeCancel": ([_P], None),
}


def _prototypes(lib: ctypes.CDLL) -> None:
    for name, (argtypes, restype) in _PROTOTYPES.items():
        func = getattr(lib, name)
        func.argtypes = argtypes
        func.restype = restype
