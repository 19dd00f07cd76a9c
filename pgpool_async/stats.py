"""Pool statistics, named as psycopg_pool names them.

Counters grow until :meth:`PoolStats.pop` resets them; gauges (``pool_min``,
``pool_max``, ``pool_size``, ``pool_available``, ``requests_waiting``) are read
from the pool when asked.
"""

from __future__ import annotations

__all__ = ["COUNTERS", "GAUGES", "PoolStats"]

GAUGES = ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting")
COUNTERS = (
    "requests_num",  # connections requested
    "requests_queued",  # requests that had to wait
    "requests_wait_ms",  # total time spent waiting
    "requests_errors",  # requests that ended in an error (timeout, queue full, closed)
    "usage_ms",  # total time connections spent lent out
    "returns_bad",  # connections returned broken, or that failed their reset
    "connections_num",  # connection attempts
    "connections_ms",  # total time spent connecting
    "connections_errors",  # failed connection attempts
    "connections_lost",  # idle connections found broken and discarded
)


class PoolStats:
    """The counters of one pool; plain ints updated on the event loop."""

    __slots__ = COUNTERS

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every counter back to zero."""
        for name in COUNTERS:
            setattr(self, name, 0)

    def add(self, name: str, value: int = 1) -> None:
        """Add ``value`` to the counter ``name``."""
        setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict, zeros left out as psycopg_pool does."""
        return {name: value for name in COUNTERS if (value := getattr(self, name))}
