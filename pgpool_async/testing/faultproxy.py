"""A small loopback-only TCP fault-injection proxy for tests and benchmarks.

:class:`FaultProxy` sits between a PostgreSQL client and server (or any TCP
client and server) on the loopback interface and can, at any moment and from
any thread, switch between behaviours:

* ``passthrough`` -- forward bytes untouched (the default);
* ``delay`` -- hold new connections before connecting upstream and/or delay
  every forwarded chunk by a fixed amount (ordering is preserved);
* ``refuse`` -- new connection attempts get ``ECONNREFUSED``; established
  connections keep working;
* ``reset`` -- every connection is cut with a TCP RST, and new ones are reset
  right after being accepted;
* ``blackhole`` -- connections are accepted and read from, but nothing is
  forwarded nor answered in either direction (bytes are swallowed);
* ``sever`` -- one shot: reset every established connection, keep the mode.

All socket work happens in one background thread running a
:mod:`selectors` loop over non-blocking sockets, so the proxy can be used from
synchronous code and next to any event loop (asyncio, trio) without blocking
it.  Only :meth:`FaultProxy.start` and :meth:`FaultProxy.close` do blocking
work in the caller's thread; the mode-switching methods hand the change to the
loop thread and return as soon as it has been applied (one loop iteration,
which never blocks on I/O), so that e.g. a connection attempted right after
:meth:`FaultProxy.refuse` returns is guaranteed to be refused.

Each direction of each connection has a bounded buffer: when the bytes queued
for one side exceed ``buffer_limit`` the proxy stops reading from the other
side, so the kernel's flow control pushes back on the sender instead of the
proxy's memory growing without bound (think ``COPY`` streams).

Example::

    with FaultProxy("127.0.0.1", 5432) as proxy:
        conn = psycopg2.connect(proxy.dsn("host=127.0.0.1 port=5432 user=postgres"))
        proxy.sever()          # the next query on ``conn`` fails
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import math
import selectors
import socket
import struct
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["FaultProxy"]

_READ_SIZE = 64 * 1024
_DEFAULT_BUFFER_LIMIT = 1024 * 1024
_ACCEPT_BATCH = 64
_BACKLOG = 128
_LINGER_RST = struct.pack("ii", 1, 0)
_CONNECT_IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})


class _Mode(enum.Enum):
    PASSTHROUGH = "passthrough"
    REFUSE = "refuse"
    RESET = "reset"
    BLACKHOLE = "blackhole"


class _Marker(enum.Enum):
    """Selector ``data`` for the non-connection sockets."""

    LISTENER = "listener"
    WAKE = "wake"


def _loopback_address(host: str, what: str) -> tuple[str, socket.AddressFamily]:
    """Validate that *host* is a loopback address; return it with its family.

    Only IP literals and ``localhost`` (mapped to ``127.0.0.1``, so no name
    resolution ever happens) are accepted.
    """
    if host.lower() == "localhost":
        return "127.0.0.1", socket.AF_INET
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{what} {host!r} is not an IP address literal: FaultProxy only works on "
            "loopback and does not resolve names; use e.g. '127.0.0.1' or '::1'"
        ) from None
    if not ip.is_loopback:
        raise ValueError(
            f"{what} {host!r} is not a loopback address: FaultProxy only operates "
            "on loopback (127.0.0.0/8 or ::1) so it can never expose or disturb "
            "anything beyond this machine"
        )
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return host, family


def _check_port(port: int, what: str, *, allow_zero: bool) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{what} must be an int, got {type(port).__name__}")
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} must be in [{low}, 65535], got {port}")
    return port


def _check_seconds(value: float, what: str) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return seconds


def _parse_conninfo(conninfo: str) -> list[tuple[str, str]]:
    """Parse a libpq ``key=value`` connection string (libpq quoting rules)."""
    params: list[tuple[str, str]] = []
    i, n = 0, len(conninfo)
    while True:
        while i < n and conninfo[i].isspace():
            i += 1
        if i >= n:
            return params
        start = i
        while i < n and conninfo[i] != "=" and not conninfo[i].isspace():
            i += 1
        key = conninfo[start:i]
        while i < n and conninfo[i].isspace():
            i += 1
        if not key or i >= n or conninfo[i] != "=":
            raise ValueError(f"invalid connection string: missing '=' after {key!r}")
        i += 1
        while i < n and conninfo[i].isspace():
            i += 1
        chars: list[str] = []
        if i < n and conninfo[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError("invalid connection string: unterminated quoted value")
                char = conninfo[i]
                if char == "\\" and i + 1 < n:
                    chars.append(conninfo[i + 1])
                    i += 2
                elif char == "'":
                    i += 1
                    break
                else:
                    chars.append(char)
                    i += 1
        else:
            while i < n and not conninfo[i].isspace():
                char = conninfo[i]
                if char == "\\" and i + 1 < n:
                    chars.append(conninfo[i + 1])
                    i += 2
                else:
                    chars.append(char)
                    i += 1
        params.append((key, "".join(chars)))


def _quote_conninfo_value(value: str) -> str:
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_ADDRESS_KEYS = frozenset({"host", "hostaddr", "port"})


def _replace_conninfo_address(conninfo: str, host: str, port: int) -> str:
    params = _parse_conninfo(conninfo)
    out: list[tuple[str, str]] = []
    placed = False
    for key, value in params:
        if key in _ADDRESS_KEYS:
            if not placed:
                out.extend([("host", host), ("port", str(port))])
                placed = True
            continue
        out.append((key, value))
    if not placed:
        out = [("host", host), ("port", str(port)), *out]
    return " ".join(f"{key}={_quote_conninfo_value(value)}" for key, value in out)


def _replace_uri_address(uri: str, host: str, port: int) -> str:
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    userinfo = netloc.rpartition("@")[0] if "@" in netloc else ""
    host_part = f"[{host}]" if ":" in host else host
    new_netloc = f"{userinfo}@{host_part}:{port}" if userinfo else f"{host_part}:{port}"
    query = [
        (key, value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if key not in _ADDRESS_KEYS
    ]
    new_query = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit((parts.scheme, new_netloc, parts.path, new_query, parts.fragment))


class _Direction:
    """Bytes read from one side, waiting (possibly until a due time) for the other."""

    __slots__ = ("chunks", "last_due", "offset", "pending")

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.pending = 0
        self.offset = 0
        self.last_due = 0.0

    def push(self, data: bytes, due: float) -> None:
        # Never let a later chunk overtake an earlier one (each_way may shrink).
        due = max(due, self.last_due)
        self.last_due = due
        self.chunks.append((due, data))
        self.pending += len(data)

    def clear(self) -> int:
        dropped = self.pending
        self.chunks.clear()
        self.pending = 0
        self.offset = 0
        return dropped

    def head_due(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None


class _Pair:
    """One proxied connection: the accepted client socket and its upstream."""

    __slots__ = (
        "c2u",
        "client",
        "client_eof",
        "closed",
        "connect_at",
        "connected",
        "u2c",
        "upstream",
        "upstream_eof",
    )

    def __init__(self, client: socket.socket, connect_at: float) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connected = False
        self.connect_at = connect_at
        self.c2u = _Direction()
        self.u2c = _Direction()
        self.client_eof = False
        self.upstream_eof = False
        self.closed = False


@dataclass(eq=False)
class _Command:
    """A mode change handed from a caller thread to the loop thread."""

    mode: _Mode | None
    connect_delay: float | None = None
    each_way: float | None = None
    sever: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class FaultProxy:
    """Loopback-only TCP proxy with switchable fault injection.

    Construct it with the upstream (target) address, call :meth:`start` (or
    use it as a context manager) and point clients at :attr:`host` /
    :attr:`port` (or use :meth:`dsn`).  Mode-switching methods may be called
    at any time from any thread; when they return, the new mode is in effect.
    Mode switches made before :meth:`start` are remembered and apply from the
    start.

    Args:
        target_host: upstream IP literal (or ``localhost``); must be loopback.
        target_port: upstream TCP port.
        listen_host: address to listen on; must be loopback.
        listen_port: port to listen on; ``0`` picks a free ephemeral port.
        buffer_limit: per connection and direction, stop reading from the
            sending side once this many bytes are queued for the receiving side.

    Raises:
        ValueError: if either address is not a loopback IP literal / ``localhost``
            or a port is out of range.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        buffer_limit: int = _DEFAULT_BUFFER_LIMIT,
    ) -> None:
        self._target_host, self._target_family = _loopback_address(target_host, "target host")
        self._target_port = _check_port(target_port, "target_port", allow_zero=False)
        self._listen_host, self._listen_family = _loopback_address(listen_host, "listen host")
        self._listen_port = _check_port(listen_port, "listen_port", allow_zero=True)
        if isinstance(buffer_limit, bool) or not isinstance(buffer_limit, int) or buffer_limit < 1:
            raise ValueError(f"buffer_limit must be a positive int, got {buffer_limit!r}")
        self._buffer_limit = buffer_limit

        # Guards the fields shared between caller threads and the loop thread.
        self._lock = threading.Lock()
        self._started = False
        self._running = False
        self._closed = False
        self._loop_error: BaseException | None = None
        self._commands: list[_Command] = []
        self._thread: threading.Thread | None = None
        self._wake_w: socket.socket | None = None
        self._bound_port: int | None = None

        # Mode state: written by the loop thread while it runs, else by callers.
        self._mode = _Mode.PASSTHROUGH
        self._connect_delay = 0.0
        self._each_way = 0.0

        # Loop-thread-only state.
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._listening = False
        self._wake_r: socket.socket | None = None
        self._interest: dict[socket.socket, int] = {}
        self._pairs: set[_Pair] = set()
        self._timed: dict[_Pair, float] = {}

        # Counters (ints: reads from other threads are atomic).
        self._accepted = 0
        self._active = 0
        self._pending_bytes = 0

    # ------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind and listen, then start the proxy thread.  Returns ``self``.

        Raises:
            RuntimeError: if already started or closed.
            OSError: if the listening address cannot be bound.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("FaultProxy is closed")
            if self._started:
                raise RuntimeError("FaultProxy already started")
            self._started = True
            mode = self._mode
        listener: socket.socket | None = None
        selector: selectors.BaseSelector | None = None
        wake_r: socket.socket | None = None
        wake_w: socket.socket | None = None
        try:
            listen = mode is not _Mode.REFUSE
            listener = self._make_listener(self._listen_port, listen=listen)
            port = int(listener.getsockname()[1])
            selector = selectors.DefaultSelector()
            wake_r, wake_w = socket.socketpair()
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            selector.register(wake_r, selectors.EVENT_READ, _Marker.WAKE)
            if listen:
                selector.register(listener, selectors.EVENT_READ, _Marker.LISTENER)
            thread = threading.Thread(
                target=self._loop,
                name=f"FaultProxy[{self._listen_host}:{port}->{self._target_host}:{self._target_port}]",
                daemon=True,
            )
        except BaseException:
            for sock in (listener, wake_r, wake_w):
                if sock is not None:
                    sock.close()
            if selector is not None:
                selector.close()
            with self._lock:
                self._started = False
            raise
        self._listener = listener
        self._listening = listen
        self._selector = selector
        self._wake_r = wake_r
        with self._lock:
            self._bound_port = port
            self._wake_w = wake_w
            self._thread = thread
            self._running = True
        thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and close every socket (connections get a RST).

        Safe to call more than once, and before :meth:`start`.  Joins the
        proxy thread, so when it returns no proxy thread remains and the
        listening port is free.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._wake()
        thread.join()
        with self._lock:
            wake_w, self._wake_w = self._wake_w, None
        if wake_w is not None:
            wake_w.close()

    def __enter__(self) -> FaultProxy:
        """Start the proxy (unless already started) and return it."""
        with self._lock:
            started = self._started
        if not started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the proxy."""
        self.close()

    @property
    def host(self) -> str:
        """The address the proxy listens on."""
        return self._listen_host

    @property
    def port(self) -> int:
        """The port the proxy listens on (the chosen one once started).

        Raises:
            RuntimeError: if ``listen_port`` was 0 and the proxy is not started.
        """
        bound = self._bound_port
        if bound is not None:
            return bound
        if self._listen_port:
            return self._listen_port
        raise RuntimeError("FaultProxy not started: no port chosen yet")

    @property
    def target(self) -> tuple[str, int]:
        """The upstream ``(host, port)``."""
        return self._target_host, self._target_port

    @property
    def mode(self) -> str:
        """The current mode: passthrough, refuse, reset or blackhole."""
        return self._mode.value

    @property
    def connections_accepted(self) -> int:
        """Number of client connections accepted since start (including reset ones)."""
        return self._accepted

    @property
    def active_connections(self) -> int:
        """Number of client connections currently held open by the proxy."""
        return self._active

    @property
    def pending_bytes(self) -> int:
        """Bytes currently buffered inside the proxy, all connections and directions."""
        return self._pending_bytes

    def dsn(self, base_dsn: str) -> str:
        """Return *base_dsn* with its address replaced by the proxy's.

        Accepts a libpq ``key=value`` string (``host``, ``hostaddr`` and
        ``port`` are removed and the proxy's ``host``/``port`` put in their
        place; everything else is kept) or a ``postgresql://`` URI.
        """
        if base_dsn.startswith(("postgresql://", "postgres://")):
            return _replace_uri_address(base_dsn, self.host, self.port)
        return _replace_conninfo_address(base_dsn, self.host, self.port)

    def passthrough(self) -> None:
        """Forward normally, without delays (the default mode)."""
        self._submit(_Command(_Mode.PASSTHROUGH, connect_delay=0.0, each_way=0.0))

    def delay(self, connect: float = 0.0, each_way: float = 0.0) -> None:
        """Forward with delays (this also leaves refuse/reset/blackhole).

        Args:
            connect: seconds a new client connection is held before the
                upstream connection is made (client bytes are buffered).
            each_way: seconds every forwarded chunk is held, in both
                directions; ordering is preserved.
        """
        connect_s = _check_seconds(connect, "connect")
        each_way_s = _check_seconds(each_way, "each_way")
        self._submit(_Command(_Mode.PASSTHROUGH, connect_delay=connect_s, each_way=each_way_s))

    def refuse(self) -> None:
        """Refuse new connections (``ECONNREFUSED``); existing ones keep working.

        The listening socket is closed, but the port stays bound (without
        listening) so it can be resumed by switching to another mode.
        """
        self._submit(_Command(_Mode.REFUSE))

    def reset(self) -> None:
        """Reset every existing connection and every new one right after accept.

        A new client's TCP handshake completes before the reset, so it may see
        ``ECONNRESET`` already from ``connect()`` (the proxy is that fast on
        loopback) or only on its first read/write.
        """
        self._submit(_Command(_Mode.RESET))

    def blackhole(self) -> None:
        """Accept and read, but never forward nor answer; bytes are swallowed.

        Applies to existing connections too (bytes already buffered in the
        proxy are dropped).  New connections are not connected upstream until
        the mode changes.  Leaving blackhole resumes forwarding of new bytes.
        """
        self._submit(_Command(_Mode.BLACKHOLE))

    def sever(self) -> None:
        """Reset every existing connection once; the mode is unchanged."""
        self._submit(_Command(None, sever=True))

    # ------------------------------------------------------------------
    # caller side plumbing
    # ------------------------------------------------------------------

    def _submit(self, command: _Command) -> None:
        with self._lock:
            if self._loop_error is not None:
                raise RuntimeError("FaultProxy loop thread died") from self._loop_error
            if not self._running:
                # Not started (or closed): only remember the settings.
                if command.mode is not None:
                    self._mode = command.mode
                if command.connect_delay is not None:
                    self._connect_delay = command.connect_delay
                if command.each_way is not None:
                    self._each_way = command.each_way
                return
            if threading.current_thread() is self._thread:  # pragma: no cover - defensive
                raise RuntimeError("FaultProxy methods must not be called from its own thread")
            self._commands.append(command)
        self._wake()
        command.done.wait()
        if command.error is not None:
            raise command.error

    def _wake(self) -> None:
        with self._lock:
            wake_w = self._wake_w
            if wake_w is None:
                return
            # OSError: buffer full, so a wake-up is already pending.
            with contextlib.suppress(OSError):
                wake_w.send(b"\0")

    # ------------------------------------------------------------------
    # loop thread
    # ------------------------------------------------------------------

    def _make_listener(self, port: int, *, listen: bool) -> socket.socket:
        sock = socket.socket(self._listen_family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._listen_host, port))
            if listen:
                sock.listen(_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _loop(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while True:
                events = selector.select(self._next_timeout())
                now = time.monotonic()
                for key, mask in events:
                    data = key.data
                    if data is _Marker.WAKE:
                        self._drain_wake()
                    elif data is _Marker.LISTENER:
                        if self._listening:
                            self._accept(now)
                    else:
                        pair, is_client = data
                        if not pair.closed:
                            self._on_event(pair, is_client, mask, now)
                if self._process_commands():
                    return
                self._run_timers(time.monotonic())
        except BaseException as exc:  # pragma: no cover - bug guard
            with self._lock:
                self._loop_error = exc
        finally:
            self._shutdown()

    def _next_timeout(self) -> float | None:
        if not self._timed:
            return None
        return max(0.0, min(self._timed.values()) - time.monotonic())

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _process_commands(self) -> bool:
        """Apply queued mode changes; return True if the loop must stop."""
        with self._lock:
            commands, self._commands = self._commands, []
            closing = self._closed
        for command in commands:
            try:
                self._apply(command)
            except Exception as exc:  # reported to the caller
                command.error = exc
            finally:
                command.done.set()
        return closing

    def _apply(self, command: _Command) -> None:
        if command.sever:
            self._abort_all()
        if command.mode is None:
            return
        old, new = self._mode, command.mode
        if new is not old:
            if old is _Mode.REFUSE:
                self._start_listening()  # may raise: then stay in refuse mode
            if new is _Mode.REFUSE:
                self._stop_listening()
        if command.connect_delay is not None:
            self._connect_delay = command.connect_delay
        if command.each_way is not None:
            self._each_way = command.each_way
        self._mode = new
        if new is old:
            return
        if new is _Mode.RESET:
            self._abort_all()
        elif new is _Mode.BLACKHOLE:
            for pair in self._pairs:
                self._pending_bytes -= pair.c2u.clear() + pair.u2c.clear()
        now = time.monotonic()
        for pair in list(self._pairs):
            self._update(pair, now)

    def _start_listening(self) -> None:
        assert self._selector is not None
        if self._listening:
            return
        if self._listener is None:
            self._listener = self._make_listener(self.port, listen=True)
        else:
            self._listener.listen(_BACKLOG)
        self._selector.register(self._listener, selectors.EVENT_READ, _Marker.LISTENER)
        self._listening = True

    def _stop_listening(self) -> None:
        assert self._selector is not None
        if self._listener is not None:
            if self._listening:
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        self._listening = False
        # Keep the port reserved with a bound, non-listening socket: SYNs to it
        # are answered with RST (ECONNREFUSED) and nobody else can take it.
        try:
            self._listener = self._make_listener(self.port, listen=False)
        except OSError:
            self._listener = None

    def _accept(self, now: float) -> None:
        assert self._listener is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE or ECONNABORTED: try again on the next event
            self._accepted += 1
            conn.setblocking(False)
            if self._mode is _Mode.RESET:
                self._discard(conn, abort=True)
                continue
            _set_nodelay(conn)
            pair = _Pair(conn, connect_at=now + self._connect_delay)
            self._pairs.add(pair)
            self._active += 1
            self._update(pair, now)

    def _on_event(self, pair: _Pair, is_client: bool, mask: int, now: float) -> None:
        if is_client:
            sock = pair.client
        else:
            if pair.upstream is None:
                return
            sock = pair.upstream
            if not pair.connected:
                if mask & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._close_pair(pair, abort=True)
                        return
                    pair.connected = True
                mask &= ~selectors.EVENT_READ
        if mask & selectors.EVENT_READ:
            self._read(pair, sock, is_client, now)
        if not pair.closed:
            self._flush(pair, now)
        if not pair.closed:
            self._update(pair, now)

    def _read(self, pair: _Pair, sock: socket.socket, is_client: bool, now: float) -> None:
        try:
            data = sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_pair(pair, abort=True)
            return
        if not data:
            if is_client:
                pair.client_eof = True
            else:
                pair.upstream_eof = True
            return
        if self._mode is _Mode.BLACKHOLE:
            return  # swallowed
        direction = pair.c2u if is_client else pair.u2c
        direction.push(data, now + self._each_way)
        self._pending_bytes += len(data)

    def _flush(self, pair: _Pair, now: float) -> None:
        if self._mode is _Mode.BLACKHOLE:
            return
        if pair.upstream is not None and pair.connected and not self._send(pair.upstream, pair.c2u, now):
            self._close_pair(pair, abort=True)
            return
        if not self._send(pair.client, pair.u2c, now):
            self._close_pair(pair, abort=True)

    def _send(self, sock: socket.socket, direction: _Direction, now: float) -> bool:
        """Send every due chunk until the socket would block; False on error."""
        chunks = direction.chunks
        while chunks:
            due, chunk = chunks[0]
            if due > now:
                break
            try:
                sent = sock.send(memoryview(chunk)[direction.offset :])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return False
            direction.offset += sent
            direction.pending -= sent
            self._pending_bytes -= sent
            if direction.offset < len(chunk):
                break  # partial write: the kernel buffer is full
            chunks.popleft()
            direction.offset = 0
        return True

    def _update(self, pair: _Pair, now: float) -> None:
        """Re-evaluate a pair: finish it, connect it, set interest and timers."""
        if pair.closed:
            return
        blackhole = self._mode is _Mode.BLACKHOLE
        upstream_usable = pair.upstream is not None and pair.connected and not blackhole
        if pair.client_eof and (not upstream_usable or not pair.c2u.chunks):
            self._close_pair(pair, abort=False)
            return
        if pair.upstream_eof:
            if blackhole:
                # Keep the client hanging; close the dead upstream side only.
                if pair.upstream is not None:
                    self._discard(pair.upstream, abort=False)
                    pair.upstream = None
                    pair.connected = False
            elif not pair.u2c.chunks:
                self._close_pair(pair, abort=False)
                return
        if (
            pair.upstream is None
            and not pair.upstream_eof
            and not blackhole
            and pair.connect_at <= now
            and not self._connect_upstream(pair)
        ):
            return

        limit = self._buffer_limit
        wake_at: float | None = None

        client_events = 0
        if not pair.client_eof and (blackhole or pair.c2u.pending < limit):
            client_events |= selectors.EVENT_READ
        if not blackhole:
            due = pair.u2c.head_due()
            if due is not None:
                if due <= now:
                    client_events |= selectors.EVENT_WRITE
                else:
                    wake_at = due
        self._set_interest(pair.client, client_events, (pair, True))

        if pair.upstream is not None:
            upstream_events = 0
            if not pair.connected:
                upstream_events = selectors.EVENT_WRITE
            else:
                if not pair.upstream_eof and (blackhole or pair.u2c.pending < limit):
                    upstream_events |= selectors.EVENT_READ
                if not blackhole:
                    due = pair.c2u.head_due()
                    if due is not None:
                        if due <= now:
                            upstream_events |= selectors.EVENT_WRITE
                        else:
                            wake_at = due if wake_at is None else min(wake_at, due)
            self._set_interest(pair.upstream, upstream_events, (pair, False))
        elif not pair.upstream_eof and not blackhole:
            wake_at = pair.connect_at if wake_at is None else min(wake_at, pair.connect_at)

        if wake_at is None:
            self._timed.pop(pair, None)
        else:
            self._timed[pair] = wake_at

    def _connect_upstream(self, pair: _Pair) -> bool:
        sock = socket.socket(self._target_family, socket.SOCK_STREAM)
        sock.setblocking(False)
        _set_nodelay(sock)
        err = sock.connect_ex((self._target_host, self._target_port))
        if err not in _CONNECT_IN_PROGRESS:
            sock.close()
            self._close_pair(pair, abort=True)
            return False
        pair.upstream = sock
        pair.connected = err == 0
        return True

    def _run_timers(self, now: float) -> None:
        due = [pair for pair, when in self._timed.items() if when <= now]
        for pair in due:
            if not pair.closed:
                self._flush(pair, now)
            self._update(pair, now)

    def _set_interest(self, sock: socket.socket, events: int, data: object) -> None:
        assert self._selector is not None
        current = self._interest.get(sock, 0)
        if events == current:
            return
        if not events:
            self._selector.unregister(sock)
            del self._interest[sock]
        elif not current:
            self._selector.register(sock, events, data)
            self._interest[sock] = events
        else:
            self._selector.modify(sock, events, data)
            self._interest[sock] = events

    def _discard(self, sock: socket.socket, *, abort: bool) -> None:
        if self._interest.pop(sock, 0):
            assert self._selector is not None
            self._selector.unregister(sock)
        if abort:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.close()

    def _close_pair(self, pair: _Pair, *, abort: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._discard(pair.client, abort=abort)
        if pair.upstream is not None:
            self._discard(pair.upstream, abort=abort)
            pair.upstream = None
        self._pending_bytes -= pair.c2u.clear() + pair.u2c.clear()
        self._pairs.discard(pair)
        self._timed.pop(pair, None)
        self._active -= 1

    def _abort_all(self) -> None:
        for pair in list(self._pairs):
            self._close_pair(pair, abort=True)

    def _shutdown(self) -> None:
        """Loop exit: close everything the loop owns and release waiters."""
        try:
            self._abort_all()
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._listening = False
            if self._wake_r is not None:
                self._wake_r.close()
                self._wake_r = None
            if self._selector is not None:
                self._selector.close()
                self._selector = None
            with self._lock:
                self._running = False
                commands, self._commands = self._commands, []
                error = self._loop_error
            for command in commands:
                if error is not None:
                    command.error = RuntimeError("FaultProxy loop thread died")
                command.done.set()


def _set_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
