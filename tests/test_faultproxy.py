"""Tests for :mod:`pgpool_async.testing.faultproxy` with real sockets (no mocks).

Byte-level behaviour is checked against a tiny threaded echo server on
127.0.0.1; one group of tests runs psycopg2 against a real PostgreSQL through
the proxy.  That server comes from ``$PGPOOL_TEST_DSN`` when set, else from a
throwaway cluster (:class:`pgpool_async.testing.throwaway.ThrowawayPostgres`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg2
import psycopg2.extensions
import pytest

from pgpool_async.testing.faultproxy import FaultProxy

pytestmark = pytest.mark.single_io("the fault proxy test tool itself: no pool")

LOCALHOST = "127.0.0.1"


# --------------------------------------------------------------------------- helpers


class EchoServer:
    """Threaded TCP server on 127.0.0.1 that echoes, or (``sink=True``) never reads."""

    def __init__(self, *, sink: bool = False) -> None:
        self._sink = sink
        self._listener = socket.create_server((LOCALHOST, 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="echo-accept")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                if not self._sink:
                    thread = threading.Thread(target=self._echo, args=(conn,), name="echo-conn")
                    self._threads.append(thread)
                    thread.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join()
        for conn in conns:
            conn.close()


def connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return recv_exact(sock, len(data))


def assert_cut(sock: socket.socket) -> None:
    """The connection was cut: the client sees a reset or EOF (not a timeout)."""
    sock.settimeout(2.0)
    try:
        data = sock.recv(1024)
    except ConnectionResetError:
        return
    assert data == b""


def assert_silent(sock: socket.socket, timeout: float = 0.3) -> None:
    """Nothing arrives (and the connection is not closed) within *timeout*."""
    sock.settimeout(timeout)
    with pytest.raises(TimeoutError):
        sock.recv(1024)


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("FaultProxy")]


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(LOCALHOST, echo.port) as p:
        yield p


# --------------------------------------------------------------------------- byte level


def test_passthrough_large_payload(proxy: FaultProxy) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    with connect(proxy, timeout=10) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        received = recv_exact(sock, len(payload))
        sender.join()
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        assert proxy.connections_accepted == 1
        assert proxy.active_connections == 1
    wait_until(lambda: proxy.active_connections == 0)
    assert proxy.pending_bytes == 0


def test_backpressure_bounds_proxy_buffers() -> None:
    limit = 256 * 1024
    sink = EchoServer(sink=True)
    try:
        with FaultProxy(LOCALHOST, sink.port, buffer_limit=limit) as proxy, connect(proxy) as sock:
            sock.settimeout(0.3)
            chunk = b"x" * (256 * 1024)
            sent, cap = 0, 256 * 1024 * 1024
            with pytest.raises(TimeoutError):
                while sent < cap:
                    sent += sock.send(chunk)
            # The sender stalled: only kernel buffers plus the bounded proxy buffer hold data.
            assert sent < cap
            assert 0 < proxy.pending_bytes <= limit + 64 * 1024
    finally:
        sink.close()


def test_delay_connect(proxy: FaultProxy) -> None:
    proxy.delay(connect=0.2)
    started = time.monotonic()
    with connect(proxy) as sock:
        assert roundtrip(sock, b"ping") == b"ping"
    assert time.monotonic() - started >= 0.2


def test_delay_each_way_keeps_order(proxy: FaultProxy) -> None:
    proxy.delay(each_way=0.1)
    messages = [f"message-{i:03d};".encode() for i in range(50)]
    expected = b"".join(messages)
    with connect(proxy) as sock:
        started = time.monotonic()
        for message in messages:
            sock.sendall(message)
        assert recv_exact(sock, len(expected)) == expected
        assert time.monotonic() - started >= 0.2  # 0.1 s each way
    proxy.passthrough()
    with connect(proxy) as sock:
        assert roundtrip(sock, b"fast again") == b"fast again"


def test_refuse(proxy: FaultProxy) -> None:
    port = proxy.port
    with connect(proxy) as existing:
        assert roundtrip(existing, b"before") == b"before"
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            connect(proxy).close()
        assert roundtrip(existing, b"still works") == b"still works"
        proxy.passthrough()
        assert proxy.port == port
        with connect(proxy) as fresh:
            assert roundtrip(fresh, b"back") == b"back"


def test_refuse_before_start(echo: EchoServer) -> None:
    proxy = FaultProxy(LOCALHOST, echo.port)
    proxy.refuse()
    with proxy:
        assert proxy.mode == "refuse"
        with pytest.raises(ConnectionRefusedError):
            connect(proxy).close()
        proxy.passthrough()
        with connect(proxy) as sock:
            assert roundtrip(sock, b"ok") == b"ok"


def test_reset(proxy: FaultProxy) -> None:
    with connect(proxy) as established:
        assert roundtrip(established, b"hello") == b"hello"
        proxy.reset()
        assert_cut(established)
    # The TCP handshake completes, then the proxy resets the connection right
    # after accepting it: depending on timing the client sees it in connect().
    try:
        fresh = connect(proxy)
    except ConnectionResetError:
        pass
    else:
        with fresh:
            assert_cut(fresh)
    wait_until(lambda: proxy.active_connections == 0)
    assert proxy.connections_accepted == 2
    proxy.passthrough()
    with connect(proxy) as sock:
        assert roundtrip(sock, b"recovered") == b"recovered"


def test_blackhole(proxy: FaultProxy) -> None:
    with connect(proxy) as established:
        assert roundtrip(established, b"hello") == b"hello"
        proxy.blackhole()
        established.sendall(b"swallowed")
        with connect(proxy) as fresh:  # connect still succeeds
            fresh.sendall(b"also swallowed")
            assert_silent(established)
            assert_silent(fresh)
            assert proxy.active_connections == 2
            proxy.passthrough()
            # Forwarding resumes for new bytes; swallowed bytes stay lost.
            established.settimeout(2.0)
            fresh.settimeout(2.0)
            assert roundtrip(established, b"again") == b"again"
            assert roundtrip(fresh, b"now connected") == b"now connected"


def test_sever(proxy: FaultProxy) -> None:
    with connect(proxy) as first, connect(proxy) as second:
        assert roundtrip(first, b"1") == b"1"
        assert roundtrip(second, b"2") == b"2"
        proxy.sever()
        assert_cut(first)
        assert_cut(second)
    assert proxy.mode == "passthrough"
    with connect(proxy) as third:
        assert roundtrip(third, b"3") == b"3"
    assert proxy.connections_accepted == 3


def test_asyncio_client_is_not_blocked(proxy: FaultProxy) -> None:
    async def main() -> None:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            writer.write(b"async")
            assert await asyncio.wait_for(reader.readexactly(5), 2) == b"async"
            proxy.sever()
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(10), 2) == b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()

    asyncio.run(main())


def test_close_frees_port_and_thread(echo: EchoServer) -> None:
    proxy = FaultProxy(LOCALHOST, echo.port).start()
    port = proxy.port
    with connect(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        assert proxy_threads()
        proxy.close()
        proxy.close()  # idempotent
        assert_cut(sock)
    assert proxy_threads() == []
    with pytest.raises(ConnectionRefusedError):
        connect(proxy).close()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((LOCALHOST, port))
        probe.listen()
    with pytest.raises(RuntimeError):
        proxy.start()


def test_loopback_only() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            FaultProxy(LOCALHOST, 5432, listen_host=host)
        with pytest.raises(ValueError, match="loopback"):
            FaultProxy(host, 5432)
    with pytest.raises(ValueError):
        FaultProxy(LOCALHOST, 0)
    with pytest.raises(ValueError):
        FaultProxy(LOCALHOST, 5432, listen_port=70000)
    FaultProxy("::1", 5432, listen_host="::1")  # no I/O in the constructor
    FaultProxy("localhost", 5432, listen_host="127.0.0.2")
    with pytest.raises(ValueError):
        FaultProxy(LOCALHOST, 5432).delay(connect=-1)


def test_dsn_rewrites_address() -> None:
    proxy = FaultProxy(LOCALHOST, 5432, listen_port=6543)
    parse = psycopg2.extensions.parse_dsn
    base = (
        "host=db.internal hostaddr=10.0.0.5 port = 5432 user=postgres "
        r"dbname='my db' password='it\'s \\ secret' application_name=x"
    )
    assert parse(proxy.dsn(base)) == {
        "host": LOCALHOST,
        "port": "6543",
        "user": "postgres",
        "dbname": "my db",
        "password": "it's \\ secret",
        "application_name": "x",
    }
    assert parse(proxy.dsn("")) == {"host": LOCALHOST, "port": "6543"}
    uri = "postgresql://u:p%40ss@db:5432,db2:5433/postgres?sslmode=disable&port=1"
    assert parse(proxy.dsn(uri)) == {
        "host": LOCALHOST,
        "port": "6543",
        "user": "u",
        "password": "p@ss",
        "dbname": "postgres",
        "sslmode": "disable",
    }
    with pytest.raises(RuntimeError):
        _ = FaultProxy(LOCALHOST, 5432).port  # ephemeral port not chosen yet


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_through_proxy(dsn: str) -> None:
    params = psycopg2.extensions.parse_dsn(dsn)
    host = params.get("host", LOCALHOST)
    assert not host.startswith("/"), "PGPOOL_TEST_DSN must use TCP: the proxy forwards TCP"
    with FaultProxy(host, int(params.get("port", 5432))) as proxy:
        dsn = proxy.dsn(dsn)
        conn = psycopg2.connect(dsn, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
                cur.execute("SELECT repeat('x', 3000000)")  # several proxy chunks
                row = cur.fetchone()
                assert row is not None and len(row[0]) == 3_000_000
            proxy.sever()
            with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()

        proxy.refuse()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(dsn, connect_timeout=5).close()

        proxy.passthrough()
        conn = psycopg2.connect(dsn, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 2")
                assert cur.fetchone() == (2,)
        finally:
            conn.close()
    assert proxy_threads() == []
