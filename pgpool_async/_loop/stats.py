"""Pool statistics, named as psycopg_pool names them.

Counters grow until :meth:`PoolStats.reset` (``pool.pop_stats()``); gauges
(``pool_min``, ``pool_max``, ``pool_size``, ``pool_available``,
``requests_waiting``) are read from the pool when asked.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PoolStats"]


@dataclasses.dataclass(slots=True)
class PoolStats:
    """The counters of one pool; plain ints updated on the event loop."""

    requests_num: int = 0  # connections requested
    requests_queued: int = 0  # requests that had to wait
    requests_wait_ms: int = 0  # total time spent waiting
    requests_errors: int = 0  # requests ended in an error (timeout, queue full, closed)
    usage_ms: int = 0  # total time connections spent lent out
    returns_bad: int = 0  # connections returned broken, or that failed their reset
    connections_num: int = 0  # connection attempts
    connections_ms: int = 0  # total time spent connecting
    connections_errors: int = 0  # failed connection attempts
    connections_lost: int = 0  # idle connections found broken and discarded
    connections_leaked: int = 0  # lent past leak_threshold, or dropped without a return
    statements_on_loop: int = 0  # statements run on the event loop (the loop-native path)
    statements_in_threads: int = 0  # statements run in worker threads (psycopg2's own path)

    def reset(self) -> None:
        """Set every counter back to zero."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict, zeros left out as psycopg_pool does."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v}
