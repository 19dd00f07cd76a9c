"""The pool's figures for ``prometheus_client``, without OpenTelemetry.

One line per pool::

    from pgpool_async.prometheus import register
    register(pool)  # into prometheus_client's default REGISTRY

then serve the registry as usual (``prometheus_client.start_http_server``,
``make_asgi_app()``). The names follow OpenTelemetry's database client
conventions as its Prometheus exporter spells them, labelled with
``db_client_connection_pool_name``:

- gauges ``db_client_connection_count`` (label ``db_client_connection_state``:
  ``idle``/``used``), ``db_client_connection_max``,
  ``db_client_connection_idle_max``, ``db_client_connection_idle_min``,
  ``db_client_connection_pending_requests``;
- counter ``db_client_connection_timeouts_total``;
- summaries (``_count`` and ``_sum``, in seconds) ``db_client_connection_create_time_seconds``,
  ``db_client_connection_wait_time_seconds``, ``db_client_connection_use_time_seconds``;
- counter ``pgpool_statements_total`` (label ``path``: ``loop``/``threads``), from
  :meth:`~pgpool_async.AsyncConnectionPool.get_stats`, so ``pop_stats()`` resets it
  (Prometheus reads that as a counter reset).

Statement durations (``db.client.operation.duration``) are OpenTelemetry's only:
timing each statement is left to an SDK the app sets up. A pool registered with
``telemetry=False`` is exported all the same (it is the app's explicit choice).
Needs the ``prometheus`` extra (``prometheus_client``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # an optional extra: say which
    raise ImportError(
        "pgpool_async.prometheus needs prometheus_client: pip install 'pgpool_async[prometheus]'"
    ) from exc

from .pool import AsyncConnectionPool

__all__ = ["PoolCollector", "register"]

_POOL = "db_client_connection_pool_name"
_LABELS = [_POOL]


class PoolCollector(Collector):
    """A ``prometheus_client`` collector of any number of pools (held weakly: a
    pool that is closed or collected is no longer exported). Thread-safe to
    :meth:`add` to; collected from whatever thread serves the metrics (it reads
    plain counters: no I/O, no wait)."""

    def __init__(self, *pools: AsyncConnectionPool) -> None:
        self._lock = threading.Lock()
        self._pools: weakref.WeakValueDictionary[str, AsyncConnectionPool] = weakref.WeakValueDictionary()
        for pool in pools:
            self.add(pool)

    def add(self, pool: AsyncConnectionPool) -> None:
        """Export ``pool`` too (and time its checkouts and loans from now on).

        :raises TypeError: ``pool`` is not an :class:`~pgpool_async.AsyncConnectionPool`.
        :raises ValueError: another pool of the same name is exported already
            (name pools with ``AsyncConnectionPool(..., name=...)``).
        """
        if not isinstance(pool, AsyncConnectionPool):
            raise TypeError(f"expected an AsyncConnectionPool, got {pool!r}")
        with self._lock:
            other = self._pools.get(pool.name)
            if other is not None and other is not pool:
                raise ValueError(f"a pool named {pool.name!r} is exported already: give each pool a name")
            self._pools[pool.name] = pool
        pool._telemetry.exported = True

    def describe(self) -> list[Metric]:
        """Nothing: the pools registered vary, so nothing is checked at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The figures of every registered pool not closed, read now."""
        with self._lock:
            pools = [p for p in self._pools.values() if not p.closed]
        count = GaugeMetricFamily(
            "db_client_connection_count",
            "Connections currently in the state described.",
            labels=[_POOL, "db_client_connection_state"],
        )
        gauges = {
            "max": GaugeMetricFamily(
                "db_client_connection_max", "The maximum number of open connections allowed.", labels=[_POOL]
            ),
            "idle_max": GaugeMetricFamily(
                "db_client_connection_idle_max",
                "The maximum number of idle open connections.",
                labels=[_POOL],
            ),
            "idle_min": GaugeMetricFamily(
                "db_client_connection_idle_min",
                "The minimum number of idle open connections.",
                labels=[_POOL],
            ),
            "pending": GaugeMetricFamily(
                "db_client_connection_pending_requests",
                "The number of current pending requests for an open connection.",
                labels=[_POOL],
            ),
        }
        timeouts = CounterMetricFamily(
            "db_client_connection_timeouts",
            "Connection requests that timed out waiting for a connection.",
            labels=[_POOL],
        )
        summaries = {
            which: SummaryMetricFamily(f"db_client_connection_{which}_time_seconds", help, labels=[_POOL])
            for which, help in (
                ("create", "The time it took to create a new connection."),
                ("wait", "The time it took to obtain an open connection from the pool."),
                ("use", "The time between borrowing a connection and returning it to the pool."),
            )
        }
        statements = CounterMetricFamily(
            "pgpool_statements",
            "Statements run, by path (the event loop or worker threads).",
            labels=[_POOL, "path"],
        )
        for pool in pools:
            telemetry = pool._telemetry
            values = telemetry.gauges()
            if values is None:
                continue
            name = [pool.name]
            count.add_metric([*name, "idle"], values["idle"])
            count.add_metric([*name, "used"], values["used"])
            for key, family in gauges.items():
                family.add_metric(name, values[key])
            timeouts.add_metric(name, telemetry.timeouts)
            summaries["create"].add_metric(name, telemetry.create_count, telemetry.create_seconds)
            summaries["wait"].add_metric(name, telemetry.wait_count, telemetry.wait_seconds)
            summaries["use"].add_metric(name, telemetry.use_count, telemetry.use_seconds)
            stats = pool.get_stats()
            statements.add_metric([*name, "loop"], stats.get("statements_on_loop", 0))
            statements.add_metric([*name, "threads"], stats.get("statements_in_threads", 0))
        yield count
        yield from gauges.values()
        yield timeouts
        yield from summaries.values()
        yield statements


_collectors: weakref.WeakKeyDictionary[Any, PoolCollector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def register(pool: AsyncConnectionPool, registry: CollectorRegistry = REGISTRY) -> PoolCollector:
    """Export ``pool`` through ``registry`` (default: ``prometheus_client``'s
    ``REGISTRY``); one :class:`PoolCollector` per registry serves every pool
    registered into it. Safe to call before or after the pool opens; create
    times are counted from then on.

    :raises ValueError: another pool of the same name is registered there.
    """
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = PoolCollector()
            registry.register(collector)
    collector.add(pool)
    return collector
