"""Pools for PgBouncer, a multi-host DSN with failover, and read replicas (docs/scaling.md).

Creating a pool does no I/O, so this prints what each pool is; point the DSNs at your
servers to use them. Run: ``python examples/scaling.py``.
"""

from __future__ import annotations

from pgpool_async import AsyncConnectionPool

# --8<-- [start:txpooling]
pool = AsyncConnectionPool(1, 4, "host=pgbouncer port=6432 dbname=app", transaction_pooling=True)
# --8<-- [end:txpooling]
print(pool)


# --8<-- [start:session]
def discard_all(raw):
    # The pool runs reset outside any transaction, as DISCARD ALL requires.
    with raw.cursor() as cur:
        cur.execute("DISCARD ALL")


pool = AsyncConnectionPool(1, 4, "host=pgbouncer port=6432 dbname=app", reset=discard_all)
# --8<-- [end:session]
print(pool)

# --8<-- [start:failover]
pool = AsyncConnectionPool(
    2,
    10,
    "host=db1,db2 port=5432,5432 dbname=app target_session_attrs=read-write",
    timeout=5,
)
# --8<-- [end:failover]
print(pool)

# --8<-- [start:replicas]
reads = AsyncConnectionPool(
    2,
    10,
    "host=db1,db2,db3 dbname=app target_session_attrs=prefer-standby",
    autocommit=True,
)
# --8<-- [end:replicas]
print(reads)
