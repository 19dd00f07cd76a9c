"""examples/mixed_sync_async.py runs against the real server, so it never rots."""

from __future__ import annotations

from .test_examples_and_demo import run


def test_mixed_sync_async_example(dsn: str, pool_io: str | None) -> None:
    out = run(["examples/mixed_sync_async.py"], dsn, pool_io)
    assert "thread jobs: 100, task jobs: 200" in out
    assert "never above maxconn: True" in out
    assert "engine_used=0" in out
