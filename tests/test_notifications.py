"""LISTEN/NOTIFY: notifications awaited on the event loop, no thread, no busy loop."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import psycopg2
import psycopg2.extensions
import pytest

from pgpool_async import AsyncConnection, AsyncConnectionPool, PoolClosed, PoolError

from .conftest import backends, server_query


class CountingConnection(psycopg2.extensions.connection):
    """Counts poll() calls: a busy loop would call it thousands of times."""

    polls = 0

    def poll(self) -> int:
        self.polls += 1
        return super().poll()


async def _collect(conn: AsyncConnection, into: list[Any], **kwargs: Any) -> None:
    async for n in conn.notifies(**kwargs):
        into.append(n)


@pytest.mark.anyio
async def test_notification_from_another_pool(dsn: str) -> None:
    async with (
        AsyncConnectionPool(1, 1, dsn, autocommit=True) as listeners,
        AsyncConnectionPool(1, 1, dsn) as senders,
    ):
        async with listeners.connection() as conn:
            await conn.listen("jobs")
            received: list[psycopg2.extensions.Notify] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(conn, received, stop_after=1, timeout=10))
                await anyio.sleep(0.1)  # the listener is waiting on the socket now
                async with senders.connection() as sender:
                    await sender.notify("jobs", "job 42")
                    sender_pid = sender.raw.get_backend_pid()
            [n] = received
            assert (n.channel, n.payload, n.pid) == ("jobs", "job 42", sender_pid)
            await conn.unlisten()


@pytest.mark.anyio
async def test_many_in_order_on_a_non_autocommit_connection(dsn: str, app_name: str) -> None:
    channel = 'odd "name"; DROP TABLE x'  # quoted as an identifier: no injection
    async with AsyncConnectionPool(2, 2, dsn, application_name=app_name) as pool:
        listener = await pool.getconn()
        sender = await pool.getconn()
        try:
            assert not listener.autocommit
            await listener.listen(channel)  # committed, so it is in effect now
            assert backends(dsn, app_name)[0][0] == "idle"
            for i in range(5):  # five transactions
                await sender.notify(channel, f"p{i}")
            async with sender.transaction():  # one transaction, three more, sent at commit
                for i in range(5, 8):
                    await sender.notify(channel, f"p{i}")
            got = [(n.channel, n.payload) async for n in listener.notifies(stop_after=8, timeout=5)]
            assert got == [(channel, f"p{i}") for i in range(8)]

            # The body may query the connection between notifications.
            await sender.notify(channel, "a")
            await sender.notify(channel, "b")
            async for n in listener.notifies(stop_after=2, timeout=5):
                assert await listener.fetchval("SELECT %s::text", (n.payload,)) == n.payload
                await listener.commit()  # waiting again inside the transaction would raise
            await listener.unlisten(channel)
            await sender.notify(channel, "gone")
            assert [n async for n in listener.notifies(timeout=0.3)] == []
        finally:
            await pool.putconn(listener)
            await pool.putconn(sender)


@pytest.mark.anyio
async def test_timeout_stop_after_and_misuse(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn) as pool, pool.connection() as conn:
        await conn.listen("quiet")
        started = time.monotonic()
        assert [n async for n in conn.notifies(timeout=0.3)] == []
        assert 0.3 <= time.monotonic() - started < 3
        assert [n async for n in conn.notifies(stop_after=0)] == []
        with pytest.raises(ValueError, match="timeout"):
            conn.notifies(timeout=0)
        with pytest.raises(ValueError, match="stop_after"):
            conn.notifies(stop_after=-1)
        with pytest.raises(TypeError, match="channel"):
            await conn.listen(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            await conn.notify("", "x")
        # Inside a transaction nothing would ever arrive: refused instead of hanging.
        await conn.execute("SELECT 1")
        with pytest.raises(PoolError, match="between transactions"):
            async for _ in conn.notifies(timeout=5):
                pass
        await conn.rollback()
        # Already received notifications come first, whatever the state.
        await conn.notify("quiet", "self")
        assert [n.payload async for n in conn.notifies(stop_after=1, timeout=5)] == ["self"]
        await conn.unlisten("quiet")


@pytest.mark.anyio
async def test_cancelled_wait_leaves_the_connection_usable(dsn: str, app_name: str) -> None:
    async with AsyncConnectionPool(1, 2, dsn, autocommit=True, application_name=app_name) as pool:
        async with pool.connection() as conn:
            await conn.listen("c")
            with anyio.move_on_after(0.2) as scope:
                async for _ in conn.notifies():
                    pytest.fail("no notification was sent")
            assert scope.cancelled_caught
            assert await conn.fetchval("SELECT 7") == 7
            # A notification sent while nobody waited is not lost.
            await pool.execute("NOTIFY c, 'later'")
            [n] = [n async for n in conn.notifies(stop_after=1, timeout=5)]
            assert n.payload == "later"

            # Other calls wait while the iterator holds the connection, then run.
            order: list[Any] = []

            async def query() -> None:
                order.append(f"query {await conn.fetchval('SELECT 1')}")

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(conn, order, stop_after=1, timeout=5))
                await anyio.sleep(0.1)
                tg.start_soon(query)
                await anyio.sleep(0.2)
                assert order == []  # the query waits for the notification
                await pool.execute("NOTIFY c, 'now'")
            assert order[1] == "query 1" and order[0].payload == "now"
            await conn.unlisten()
        assert {s for s, _ in backends(dsn, app_name)} == {"idle"}


@pytest.mark.anyio
async def test_server_closing_the_connection_ends_the_wait(dsn: str) -> None:
    async with AsyncConnectionPool(1, 1, dsn, autocommit=True) as pool:
        with pytest.RaisesGroup(psycopg2.OperationalError):
            async with pool.connection() as conn:
                await conn.listen("dying")
                pid = conn.raw.get_backend_pid()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: _collect(conn, [], timeout=10))
                    await anyio.sleep(0.1)
                    server_query(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        assert await pool.fetchval("SELECT 1") == 1  # replaced


@pytest.mark.anyio
async def test_no_busy_loop_and_no_thread(dsn: str) -> None:
    async with AsyncConnectionPool(
        2, 2, dsn, autocommit=True, io="auto", connection_factory=CountingConnection
    ) as pool:  # (a class of its own runs in threads: io="loop" would refuse it)
        async with pool.connection() as conn:
            raw = conn.raw
            assert isinstance(raw, CountingConnection)
            await conn.listen("idle_chan")
            threads_before = threading.active_count()
            raw.polls = 0
            thread_counts: list[int] = []

            async def sample() -> None:
                for _ in range(8):
                    await anyio.sleep(0.05)
                    thread_counts.append(threading.active_count())

            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                assert [n async for n in conn.notifies(timeout=0.5)] == []
            assert raw.polls <= 2, raw.polls  # once on entry, then it sleeps (measured: 1)
            assert max(thread_counts) <= threads_before

            # Woken once per notification: a poll on entry and one on wake-up.
            raw.polls = 0
            received: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(conn, received, stop_after=3, timeout=5))
                for i in range(3):
                    await anyio.sleep(0.1)
                    await pool.execute("SELECT pg_notify('idle_chan', %s)", (str(i),))
            assert [n.payload for n in received] == ["0", "1", "2"]
            assert raw.polls <= 3 * 3, raw.polls  # (measured: 6)
            await conn.unlisten()


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.mark.anyio
async def test_notifications_on_trio(dsn: str) -> None:
    import trio.lowlevel

    assert trio.lowlevel.in_trio_run()
    async with AsyncConnectionPool(2, 2, dsn, autocommit=True) as pool:
        async with pool.connection() as conn:
            await conn.listen("trio_chan")
            received: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(conn, received, stop_after=2, timeout=5))
                await anyio.sleep(0.1)
                await pool.execute("NOTIFY trio_chan, 'one'")
                await pool.execute("NOTIFY trio_chan, 'two'")
            assert [n.payload for n in received] == ["one", "two"]
            with anyio.move_on_after(0.1):
                async for _ in conn.notifies():
                    pytest.fail("nothing sent")
            assert await conn.fetchval("SELECT 3") == 3
            assert [n async for n in conn.notifies(timeout=0.1)] == []
            await conn.unlisten()


@pytest.mark.anyio
async def test_returned_listener_is_unlistened(dsn: str) -> None:
    """LISTEN does not outlive the loan: the next borrower gets no stale notifications."""
    async with AsyncConnectionPool(1, 1, dsn, autocommit=True) as pool:
        async with pool.connection() as conn:
            await conn.listen("stale_chan")
            raw = conn.raw
        await pool.execute("NOTIFY stale_chan, 'late'")
        async with pool.connection() as conn:
            assert conn.raw is raw
            assert [n async for n in conn.notifies(timeout=0.2)] == []
            assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0


@pytest.mark.anyio
async def test_close_wakes_a_waiting_listener(dsn: str) -> None:
    pool = AsyncConnectionPool(1, 1, dsn, autocommit=True)
    await pool.open()
    conn = await pool.getconn()
    await conn.listen("closing_chan")
    errors: list[BaseException] = []

    async def listen_forever() -> None:
        try:
            async for _ in conn.notifies():
                pass
        except PoolClosed as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen_forever)
            await anyio.sleep(0.1)
            await pool.closeall()
    assert len(errors) == 1
