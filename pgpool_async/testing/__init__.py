"""Real components for tests, demos and benchmarks: nothing here is mocked.

- :mod:`~pgpool_async.testing.netns`: a throwaway server behind a router namespace that drops,
  loses or delays packets (real network faults; root).
- :mod:`~pgpool_async.testing.pgbouncer`: a throwaway PgBouncer in front of a server.
- :mod:`~pgpool_async.testing.standby`: a throwaway primary with a streaming standby,
  and the faults that matter to a pool (crash, promote, fence).

When a component is not installed the fixtures raise :class:`ComponentMissing`;
:func:`skip_or_fail` turns that into ``pytest.skip`` locally and a failure when the
``CI`` environment variable is set (CI must never silently skip).
"""

from __future__ import annotations

import os
from typing import NoReturn

from .throwaway import ThrowawayError

__all__ = ["ComponentMissing", "skip_or_fail"]


class ComponentMissing(ThrowawayError):
    """A program a fixture needs (pgbouncer, pg_basebackup, ...) is not installed.

    The message names the program and how to install it.
    """


def skip_or_fail(reason: str) -> NoReturn:
    """``pytest.skip(reason)`` locally; ``pytest.fail(reason)`` when ``$CI`` is set."""
    import pytest  # only tests call this

    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: a missing component is a failure, not a skip)")
    pytest.skip(reason)
