"""A load generator for one process, run several times side by side behind a pooler.

``python -m pgpool_async.testing.load --dsn DSN --seconds 2 --tasks 8 --readonly-share 0.1
[--transaction-pooling]`` runs ``tasks`` tasks on one :class:`~pgpool_async.AsyncConnectionPool`
for ``seconds`` and prints one JSON object of counts. Each loan is either

- *read-only* (``readonly_share`` of them): ``set_session(readonly=True,
  isolation_level="SERIALIZABLE")`` then one query reading both settings back;
  ``ro_not_applied`` counts loans where the server did not run them so,
  ``ro_refused`` those refused (autocommit with ``transaction_pooling``);
- a *write*: one ``INSERT`` into ``scale_load`` (created by :func:`prepare`) that
  reads back ``transaction_read_only`` and ``transaction_isolation``.
  ``foreign`` counts writes that failed with ``ReadOnlySqlTransaction`` or ran
  with a setting the writer never asked for: another client's session leaking.

Other errors are counted by type name in ``errors``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from typing import Any

import anyio
import psycopg2.errors

from ..errors import TransactionPoolingError
from ..pool import AsyncConnectionPool

__all__ = ["prepare", "run_load"]

_TABLE = "scale_load"


def prepare(dsn: str) -> None:
    """Create the table the writes go to (blocking; run once before the processes)."""
    from .throwaway import run_sql

    run_sql(dsn, f"CREATE TABLE IF NOT EXISTS {_TABLE} (id bigserial PRIMARY KEY, v int)")


async def run_load(
    dsn: str,
    *,
    seconds: float,
    tasks: int,
    readonly_share: float,
    transaction_pooling: bool,
    maxconn: int = 4,
    autocommit: bool = False,
) -> dict[str, Any]:
    """Run the mixed load; the counts (see the module doc)."""
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()

    async def read_only(pool: AsyncConnectionPool) -> None:
        async with pool.connection() as conn:
            try:
                await conn.set_session(readonly=True, isolation_level="SERIALIZABLE")
            except TransactionPoolingError:
                counts["ro_refused"] += 1  # autocommit behind a transaction pooler
                return
            row = await conn.fetchone(
                "SELECT current_setting('transaction_read_only'), current_setting('transaction_isolation')"
            )
        counts["ro"] += 1
        if tuple(row) != ("on", "serializable"):
            counts["ro_not_applied"] += 1

    async def write(pool: AsyncConnectionPool) -> None:
        try:
            row = await pool.fetchone(
                f"INSERT INTO {_TABLE} (v) VALUES (1) RETURNING "
                "current_setting('transaction_read_only'), current_setting('transaction_isolation')"
            )
        except psycopg2.errors.ReadOnlySqlTransaction:
            counts["foreign"] += 1
            return
        counts["writes"] += 1
        if tuple(row) != ("off", "read committed"):
            counts["foreign"] += 1

    async def worker(pool: AsyncConnectionPool, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                if random.random() < readonly_share:
                    await read_only(pool)
                else:
                    await write(pool)
            except Exception as exc:
                errors[type(exc).__name__] += 1

    async with AsyncConnectionPool(
        1,
        maxconn,
        dsn,
        timeout=10,
        autocommit=autocommit,
        transaction_pooling=transaction_pooling,
    ) as pool:
        started = time.monotonic()
        deadline = started + seconds
        async with anyio.create_task_group() as group:
            for _ in range(tasks):
                group.start_soon(worker, pool, deadline)
        elapsed = time.monotonic() - started
    return {**counts, "errors": dict(errors), "elapsed": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--maxconn", type=int, default=4)
    parser.add_argument("--readonly-share", type=float, default=0.1)
    parser.add_argument("--transaction-pooling", action="store_true")
    parser.add_argument("--autocommit", action="store_true")
    args = parser.parse_args()
    result = anyio.run(
        lambda: run_load(
            args.dsn,
            seconds=args.seconds,
            tasks=args.tasks,
            readonly_share=args.readonly_share,
            transaction_pooling=args.transaction_pooling,
            maxconn=args.maxconn,
            autocommit=args.autocommit,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
