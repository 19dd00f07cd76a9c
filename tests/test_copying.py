"""COPY through a lent connection: streamed both ways, sync and async files, errors, cancellation.

psycopg2 refuses COPY while a wait callback is installed, so these tests switch
the session's libpq guard off (``no_wait_callback``); blockbuster still watches
the loop.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import psycopg2
import psycopg2.errors
import pytest

from pgpool_async import AsyncConnection, AsyncConnectionPool, PoolError, TransactionFailed

from .conftest import backends, server_query

pytestmark = pytest.mark.usefixtures("no_wait_callback")

# ~64 MB of COPY text: "<g>\t<200 x>\n" per row.
BIG_ROWS = 320_000
BIG_SELECT = f"SELECT g, repeat('x', 200) FROM generate_series(1, {BIG_ROWS}) g"
BIG_BYTES = sum(len(str(g)) for g in range(1, BIG_ROWS + 1)) + BIG_ROWS * (1 + 200 + 1)
# A streamed COPY may grow the process by a few buffers, never by the data.
MAX_GROWTH = 8 * 2**20


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in f
            if line.startswith(("VmHWM", "VmRSS"))
        }


class PeakRSS:
    """Peak resident memory growth of this process across a block (Linux: resets VmHWM)."""

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.base = _status()["VmRSS"]
        self.growth = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status()["VmHWM"] - self.base


@pytest.fixture(autouse=True)
def _needs_proc() -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-RSS measurement needs Linux /proc")


class CountingAsyncWriter:
    """An async file that counts what it receives and checks calls never overlap."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.max_chunk = 0
        self.busy = False
        self.head = b""
        self.tail = b""

    async def write(self, data: bytes) -> int:
        assert not self.busy, "two chunks in flight"
        self.busy = True
        try:
            await anyio.lowlevel.checkpoint()
            self.calls += 1
            self.bytes += len(data)
            self.max_chunk = max(self.max_chunk, len(data))
            if len(self.head) < 100:
                self.head += data[:100]
            self.tail = (self.tail + data)[-300:]
            return len(data)
        finally:
            self.busy = False


def _big_rows() -> Iterator[bytes]:
    for g in range(1, BIG_ROWS + 1):
        yield b"%d\t%s\n" % (g, b"y" * 200)


class LazySyncReader:
    """A sync file producing the big table on demand."""

    def __init__(self) -> None:
        self._rows = _big_rows()
        self._buf = b""
        self.max_request = 0

    def read(self, size: int = -1) -> bytes:
        self.max_request = max(self.max_request, size)
        while len(self._buf) < size:
            row = next(self._rows, None)
            if row is None:
                break
            self._buf += row
        out, self._buf = self._buf[:size], self._buf[size:]
        return out


class LazyAsyncReader(LazySyncReader):
    """The same data through an async read(), one call at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = False
        self.calls = 0

    async def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        assert not self.busy
        self.busy = True
        try:
            await anyio.lowlevel.checkpoint()
            self.calls += 1
            return LazySyncReader.read(self, size)
        finally:
            self.busy = False


async def _warm_up(conn: AsyncConnection) -> None:
    """First use starts threads and allocates buffers: keep that out of the measurement."""
    await conn.copy_expert("COPY (SELECT 1) TO STDOUT", io.BytesIO())
    await conn.copy_expert("COPY (SELECT 1) TO STDOUT", CountingAsyncWriter())


# -- streaming: memory stays flat ---------------------------------------------------


@pytest.mark.anyio
async def test_copy_to_streams_to_sync_and_async_files(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        await _warm_up(conn)

        # The probe sees a non-streamed copy: everything in one BytesIO.
        buf = io.BytesIO()
        with PeakRSS() as whole:
            assert await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", buf) == BIG_ROWS
        assert len(buf.getvalue()) == BIG_BYTES
        del buf
        assert whole.growth > BIG_BYTES * 0.9

        with tempfile.TemporaryFile() as f, PeakRSS() as to_file:
            assert await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", f) == BIG_ROWS
            assert f.tell() == BIG_BYTES
            f.seek(0)
            assert f.readline() == b"1\t" + b"x" * 200 + b"\n"
        assert to_file.growth < MAX_GROWTH, to_file.growth

        writer = CountingAsyncWriter()
        with PeakRSS() as to_async:
            assert await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", writer, size=65536) == BIG_ROWS
        assert to_async.growth < MAX_GROWTH, to_async.growth
        assert writer.bytes == BIG_BYTES
        assert writer.head.startswith(b"1\txxx")
        assert writer.tail.endswith(b"\n%d\t%s\n" % (BIG_ROWS, b"x" * 200))
        # Chunks of about `size`: one row over at most, and few calls.
        assert 65536 <= writer.max_chunk < 65536 + 256
        assert writer.calls <= BIG_BYTES // 65536 + 2


@pytest.mark.anyio
async def test_copy_from_streams_from_sync_and_async_files(dsn: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS copy_big; CREATE UNLOGGED TABLE copy_big (g int, s text)")
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        await _warm_up(conn)
        sync_reader = LazySyncReader()
        with PeakRSS() as from_sync:
            assert await conn.copy_from(sync_reader, "copy_big", size=32768) == BIG_ROWS
        assert from_sync.growth < MAX_GROWTH, from_sync.growth
        assert sync_reader.max_request == 32768

        async_reader = LazyAsyncReader()
        with PeakRSS() as from_async:
            assert await conn.copy_expert("COPY copy_big FROM STDIN", async_reader, size=32768) == BIG_ROWS
        assert from_async.growth < MAX_GROWTH, from_async.growth
        assert async_reader.max_request == 32768
        assert async_reader.calls == -(-BIG_BYTES // 32768) + 1  # the last read returns b""
        await conn.commit()
    assert server_query(dsn, "SELECT count(*), count(DISTINCT g), sum(length(s)) FROM copy_big") == [
        (2 * BIG_ROWS, BIG_ROWS, 2 * BIG_ROWS * 200)
    ]
    server_query(dsn, "DROP TABLE copy_big")


# -- files of every kind, both directions ------------------------------------------


class MemoryByteStream(anyio.abc.ByteStream):
    """An anyio byte stream over a buffer: what is sent can be received back."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.sends = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if not self.data:
            raise anyio.EndOfStream
        out = bytes(self.data[:max_bytes])
        del self.data[:max_bytes]
        return out

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        self.sends += 1
        self.data += item

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_copy_with_bytesio_anyio_files_and_streams(dsn: str, tmp_path: Path) -> None:
    server_query(
        dsn,
        "DROP TABLE IF EXISTS copy_src, copy_dst; "
        "CREATE TABLE copy_src (a int, b text); CREATE TABLE copy_dst (a int, b text)",
    )
    rows = "".join(f"{i}\tvalue é {i}\n" for i in range(1000)) + "1000\t\\N\n"
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        # sync: BytesIO in, StringIO (text) and BytesIO out
        assert await conn.copy_from(io.BytesIO(rows.encode()), "copy_src") == 1001
        text_out = io.StringIO()
        assert await conn.copy_to(text_out, "copy_src") == 1001
        assert text_out.getvalue() == rows
        bin_out = io.BytesIO()
        assert await conn.copy_to(bin_out, "copy_src", sep="|", null="NULL", columns=["b"]) == 1001
        assert bin_out.getvalue().splitlines()[-2:] == ["value é 999".encode(), b"NULL"]

        # async: anyio files, binary and text, out and back in
        path = tmp_path / "rows.bin"
        async with await anyio.open_file(path, "wb") as f:
            assert await conn.copy_expert("COPY copy_src TO STDOUT", f, size=1000) == 1001
        assert path.read_bytes() == rows.encode()
        async with await anyio.open_file(path, "rb") as f:
            assert await conn.copy_from(f, "copy_dst", size=100) == 1001
        text_path = tmp_path / "rows.txt"
        async with await anyio.open_file(text_path, "w", encoding="utf-8") as f:
            assert await conn.copy_to(f, "copy_src", size=500) == 1001
        assert text_path.read_text(encoding="utf-8") == rows
        async with await anyio.open_file(text_path, encoding="utf-8") as f:
            assert await conn.copy_expert("COPY copy_dst FROM STDIN", f) == 1001

        # async: anyio byte streams
        stream = MemoryByteStream()
        assert await conn.copy_expert("COPY copy_src TO STDOUT", stream, size=4096) == 1001
        assert bytes(stream.data) == rows.encode()
        assert stream.sends == -(-len(rows.encode()) // 4096)  # whole chunks, then the rest
        assert await conn.copy_from(stream, "copy_dst", columns=("a", "b")) == 1001
        assert await conn.fetchval("SELECT count(*) FROM copy_dst") == 3003
        assert await conn.fetchval("SELECT count(*) FROM copy_dst WHERE b IS NULL") == 3


@pytest.mark.anyio
async def test_copy_argument_errors(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        with pytest.raises(TypeError, match=r"read\(\)"):
            await conn.copy_from(object(), "t")
        with pytest.raises(TypeError, match=r"write\(\)"):
            await conn.copy_to(io.BytesIO().read, "t")
        with pytest.raises(ValueError, match="size"):
            await conn.copy_expert("COPY (SELECT 1) TO STDOUT", io.BytesIO(), size=0)
        assert await conn.fetchval("SELECT 1") == 1


# -- errors leave the connection clean -----------------------------------------------


@pytest.mark.anyio
async def test_copy_bad_data_raises_and_returns_clean(dsn: str, app_name: str) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS copy_bad; CREATE TABLE copy_bad (x int)")
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        with pytest.raises(psycopg2.errors.InvalidTextRepresentation, match="xx"):
            async with pool.connection() as conn:
                await conn.copy_from(io.BytesIO(b"1\nxx\n"), "copy_bad")
        assert [s for s, _ in backends(dsn, app_name)] == ["idle"]

        with pytest.raises(psycopg2.errors.BadCopyFileFormat, match="extra data"):
            async with pool.connection() as conn:
                stream = MemoryByteStream(b"1\n2\t2\n")  # two columns into a one-column table
                await conn.copy_expert("COPY copy_bad FROM STDIN", stream)
        assert [s for s, _ in backends(dsn, app_name)] == ["idle"]

        async with pool.connection() as conn:  # the same connection, usable, nothing copied
            assert await conn.fetchval("SELECT count(*) FROM copy_bad") == 0
    server_query(dsn, "DROP TABLE copy_bad")


class FailingAsyncWriter(CountingAsyncWriter):
    async def write(self, data: bytes) -> int:
        if self.calls == 3:
            raise OSError("disk full")
        return await super().write(data)


class FailingAsyncReader:
    async def read(self, size: int = -1) -> bytes:
        raise OSError("read failed")


@pytest.mark.parametrize("autocommit", [False, True])
@pytest.mark.anyio
async def test_file_errors_propagate_and_abort_the_copy(dsn: str, app_name: str, autocommit: bool) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS copy_fail; CREATE TABLE copy_fail (x int)")
    # Without autocommit the block ends normally on the failed transaction: it says so.
    failed_block = (
        pytest.raises(TransactionFailed, match="QueryCanceled")
        if not autocommit
        else contextlib.nullcontext()
    )
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name, autocommit=autocommit) as pool:
        with failed_block:
            async with pool.connection() as conn:
                writer = FailingAsyncWriter()
                with anyio.fail_after(10), pytest.raises(OSError, match="disk full"):
                    await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", writer)
                assert writer.calls == 3  # stopped at the failing chunk
                # Not mid-COPY: the server stopped sending and the rest was dropped.
                assert conn.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_ACTIVE
                if not autocommit:
                    await conn.rollback()
                assert await conn.fetchval("SELECT 42") == 42

                with pytest.raises(OSError, match="read failed") as info:
                    await conn.copy_from(FailingAsyncReader(), "copy_fail")
                assert isinstance(info.value.__cause__, psycopg2.errors.QueryCanceled)
                if not autocommit:
                    await conn.rollback()
                assert await conn.fetchval("SELECT count(*) FROM copy_fail") == 0
                with pytest.raises(OSError, match="read failed"):
                    await conn.copy_from(FailingAsyncReader(), "copy_fail")
        # Returned with the failed transaction (or nothing) open: rolled back.
        assert [s for s, _ in backends(dsn, app_name)] == ["idle"]
        assert await pool.fetchval("SELECT 1") == 1
    server_query(dsn, "DROP TABLE copy_fail")


class SlowAsyncWriter(CountingAsyncWriter):
    async def write(self, data: bytes) -> int:
        await anyio.sleep(0.01)
        return await super().write(data)


@pytest.mark.anyio
async def test_cancelling_a_copy_to_an_async_file(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        writer = SlowAsyncWriter()
        with anyio.move_on_after(0.3) as scope:
            async with pool.connection() as conn:
                await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", writer)
        assert scope.cancelled_caught
        assert 0 < writer.calls < 100  # aborted at the next chunk, not run to the end
        assert [s for s, _ in backends(dsn, app_name)] == ["idle"]
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1


# -- a wait callback makes COPY impossible: refused before anything is sent ----------


@pytest.mark.anyio
async def test_copy_refused_while_a_wait_callback_is_set(dsn: str, app_name: str) -> None:
    def callback(conn: Any) -> None:
        raise AssertionError("not reached: the pool runs everything in threads")

    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        async with pool.connection() as conn:
            psycopg2.extensions.set_wait_callback(callback)
            try:
                with pytest.raises(PoolError, match=r"wait callback.*set_wait_callback\(None\)"):
                    await conn.copy_expert("COPY (SELECT 1) TO STDOUT", io.BytesIO())
                with pytest.raises(PoolError, match="COPY cannot run"):
                    await conn.copy_from(io.BytesIO(b"1\n"), "t")
            finally:
                psycopg2.extensions.set_wait_callback(None)
            assert conn.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
            assert await conn.fetchval("SELECT 1") == 1


# -- trio ---------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.mark.anyio
async def test_copy_on_trio(dsn: str, tmp_path: Path) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS copy_trio; CREATE TABLE copy_trio (a int, b text)")
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        await _warm_up(conn)
        writer = CountingAsyncWriter()
        with PeakRSS() as out:
            assert await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", writer, size=65536) == BIG_ROWS
        assert out.growth < MAX_GROWTH and writer.bytes == BIG_BYTES
        path = tmp_path / "trio.txt"
        path.write_bytes(b"".join(b"%d\tt\n" % i for i in range(5000)))
        async with await anyio.open_file(path, "rb") as f:
            assert await conn.copy_from(f, "copy_trio") == 5000
        with pytest.raises(psycopg2.errors.InvalidTextRepresentation):
            await conn.copy_from(io.BytesIO(b"x\ty\n"), "copy_trio")
        await conn.rollback()
        assert await conn.fetchval("SELECT count(*) FROM copy_trio") == 0  # rolled back with it
        slow = SlowAsyncWriter()
        with anyio.move_on_after(0.3) as scope:
            await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", slow)
        assert scope.cancelled_caught and 0 < slow.calls < 100
        await conn.rollback()
        assert await conn.fetchval("SELECT 1") == 1
    server_query(dsn, "DROP TABLE copy_trio")


@pytest.mark.anyio
async def test_cancelling_a_copy_between_chunks(dsn: str, app_name: str) -> None:
    """A fast async writer: the thread spends most of its time in libpq, between
    calls back to the loop, when the cancellation lands. The COPY still stops."""
    async with AsyncConnectionPool(1, 1, dsn, application_name=app_name) as pool:
        for _ in range(5):
            writer = CountingAsyncWriter()
            with anyio.move_on_after(0.05) as scope:
                async with pool.connection() as conn:
                    await conn.copy_expert(f"COPY ({BIG_SELECT}) TO STDOUT", writer)
            assert scope.cancelled_caught
            assert writer.calls < 4000  # the whole COPY is about 8,000 chunks
        assert [s for s, _ in backends(dsn, app_name)] == ["idle"]
        assert await pool.fetchval("SELECT 1") == 1
