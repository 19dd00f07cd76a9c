"""pgpool_async.prometheus: the pool's figures in a prometheus_client registry."""

from __future__ import annotations

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pgpool_async import AsyncConnectionPool, PoolTimeout
from pgpool_async.prometheus import PoolCollector, register

pytestmark = pytest.mark.anyio


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels, generate_latest(registry).decode())
    return value


async def test_one_line_exports_the_pool(dsn: str) -> None:
    registry = CollectorRegistry()
    async with AsyncConnectionPool(1, 2, dsn, name="scraped", timeout=5) as pool:
        register(pool, registry)
        pool_label = {"db_client_connection_pool_name": "scraped"}
        assert _sample(registry, "db_client_connection_max", **pool_label) == 2
        assert _sample(registry, "db_client_connection_idle_min", **pool_label) == 1
        assert _sample(registry, "db_client_connection_idle_max", **pool_label) == 2
        idle = {**pool_label, "db_client_connection_state": "idle"}
        used = {**pool_label, "db_client_connection_state": "used"}
        assert _sample(registry, "db_client_connection_count", **idle) == 1
        async with pool.connection() as conn:
            await conn.fetchval("SELECT 1")
            assert _sample(registry, "db_client_connection_count", **used) == 1
            async with pool.connection() as other:
                async with anyio.create_task_group() as group:

                    async def third() -> None:
                        with pytest.raises(PoolTimeout):
                            await pool.getconn(timeout=0.2)

                    group.start_soon(third)
                    while not pool.get_stats().get("requests_waiting"):
                        await anyio.sleep(0.01)
                    assert _sample(registry, "db_client_connection_pending_requests", **pool_label) == 1
                await other.fetchval("SELECT 2")
        assert _sample(registry, "db_client_connection_timeouts_total", **pool_label) == 1
        assert _sample(registry, "db_client_connection_wait_time_seconds_count", **pool_label) >= 2
        assert _sample(registry, "db_client_connection_use_time_seconds_count", **pool_label) == 2
        assert _sample(registry, "db_client_connection_use_time_seconds_sum", **pool_label) > 0
        stats = pool.get_stats()
        on_loop = _sample(registry, "pgpool_statements_total", **pool_label, path="loop")
        in_threads = _sample(registry, "pgpool_statements_total", **pool_label, path="threads")
        assert on_loop == stats.get("statements_on_loop", 0)
        assert in_threads == stats.get("statements_in_threads", 0)
        assert on_loop + in_threads >= 2
        assert b"db_client_connection_count" in generate_latest(registry)
    # A closed pool is no longer exported.
    assert registry.get_sample_value("db_client_connection_max", pool_label) is None


async def test_pools_share_a_registry_by_name(dsn: str) -> None:
    registry = CollectorRegistry()
    async with (
        AsyncConnectionPool(1, 1, dsn, name="one") as one,
        AsyncConnectionPool(1, 3, dsn, name="two", telemetry=False) as two,
    ):
        assert register(one, registry) is register(two, registry)
        assert _sample(registry, "db_client_connection_max", db_client_connection_pool_name="one") == 1
        assert _sample(registry, "db_client_connection_max", db_client_connection_pool_name="two") == 3
        impostor = AsyncConnectionPool(1, 1, dsn, name="one")
        with pytest.raises(ValueError, match="'one' is exported already"):
            register(impostor, registry)
        with pytest.raises(TypeError):
            PoolCollector(object())  # type: ignore[arg-type]
