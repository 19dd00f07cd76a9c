"""What the pool's parts may use of each other: declarations for type checkers.

:class:`~pgpool_async.AsyncConnectionPool` is assembled from mixins, each in a
module of its own (:mod:`~pgpool_async.growth`, :mod:`~pgpool_async.upkeep`);
they share the pool's state, declared once here. At run time the class is empty.
"""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from psycopg2.extensions import connection as PGConnection

if TYPE_CHECKING:
    from .._thread.background import BackgroundTasks
    from .._thread.offload import Offloader
    from ..connection import AsyncConnection
    from ..sync import ThreadedConnectionPool
    from .health import ConnInfo, Health
    from .stats import PoolStats
    from .waiting import WaitQueue

__all__ = ["PoolInternals"]


class PoolInternals:
    """The pool's state and the methods its mixins call on each other."""

    if TYPE_CHECKING:  # set and defined by AsyncConnectionPool and its mixins
        name: str
        autocommit: bool
        reconnect_timeout: float
        leak_threshold: float | None
        _engine: ThreadedConnectionPool
        _offload: Offloader
        _tasks: BackgroundTasks
        _waiting: WaitQueue
        _health: Health
        _stats: PoolStats
        _info: dict[int, ConnInfo]
        _lent: dict[int, weakref.ref[AsyncConnection]]
        _orphans: list[tuple[PGConnection, traceback.StackSummary | None]]
        _generation: int
        _growing: int
        _filling: int
        _opened: bool
        _last_error: BaseException | None
        _reconnect_failed: Callable[[Any], Any] | None
        _sweep_target: float
        _sweep_wake: Any
        _target: str

        @property
        def closed(self) -> bool: ...
        @property
        def minconn(self) -> int: ...
        @property
        def maxconn(self) -> int: ...
        def _dispatch(self, trusted: PGConnection | None = None) -> None: ...
        def _forget_info(self, raw: PGConnection) -> None: ...
        def _retired(self, raw: PGConnection) -> bool: ...
        def _ensure_min(self) -> None: ...
        async def _return_raw(self, raw: PGConnection, close: bool = False) -> None: ...
        async def _close_evicted(self, conns: list[PGConnection]) -> None: ...
