"""The realistic workloads' data: schema, seed, statements, values, and the check
that every contender returns the same Python values.

- ``row_by_key``: one row by primary key from :data:`ITEMS` (8 columns: int8, text,
  timestamptz, numeric, uuid, jsonb, bool, float8; :data:`ROWS` rows seeded once),
  the key drawn at random per operation;
- ``rows_100``: :data:`RANGE_ROWS` such rows, a range of keys (``BETWEEN``, ordered);
- ``write_tx``: a transaction of ``INSERT ... RETURNING id`` into :data:`WRITES`
  (same columns) then ``UPDATE ... WHERE id = <returned id>``, then COMMIT.

Statements are written with ``%s`` placeholders (psycopg2, psycopg 3, aiopg,
pgpool_async); :func:`numbered` gives asyncpg's ``$n`` form. Every contender uses
its library's default type conversions, except asyncpg, which gets a
``json.loads`` codec for jsonb (as psycopg2 and psycopg 3 decode it): see
:func:`asyncpg_init`. psycopg2 returns uuid as ``str`` (no ``register_uuid``),
the others ``uuid.UUID``: :func:`normalise_row` compares them as text.

This module imports no contender (the contenders import it).
"""

from __future__ import annotations

import datetime
import decimal
import json
import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COLUMNS",
    "EXPECTED_TYPES",
    "INSERT_ROW",
    "ITEMS",
    "RANGE_ROWS",
    "READS",
    "ROWS",
    "ROWS_RANGE",
    "ROW_BY_KEY",
    "SAMPLE_KEY",
    "UPDATE_ROW",
    "WORKLOADS",
    "WRITES",
    "Mismatch",
    "NewRow",
    "asyncpg_init",
    "check_sample",
    "compare_samples",
    "drop",
    "new_row",
    "normalise_row",
    "numbered",
    "random_first",
    "random_key",
    "seed",
]

WORKLOADS = ("row_by_key", "rows_100", "write_tx")
READS = frozenset(("row_by_key", "rows_100"))
ALL = frozenset(WORKLOADS)

ITEMS = "pgpool_bench_items"
WRITES = "pgpool_bench_writes"
ROWS = 10_000
RANGE_ROWS = 100
SAMPLE_KEY = 4242  # the check's key (and first key of its range)

COLUMNS = ("id", "name", "created", "amount", "ref", "payload", "active", "score")
#: Python type of each column after :func:`normalise_row` (uuid compared as text).
EXPECTED_TYPES = ("int", "str", "datetime", "Decimal", "str", "dict", "bool", "float")
_SELECT = ", ".join(COLUMNS)

ROW_BY_KEY = f"SELECT {_SELECT} FROM {ITEMS} WHERE id = %s"
ROWS_RANGE = f"SELECT {_SELECT} FROM {ITEMS} WHERE id BETWEEN %s AND %s ORDER BY id"
INSERT_ROW = (
    f"INSERT INTO {WRITES} (name, created, amount, ref, payload, active, score) "
    "VALUES (%s, %s, %s, %s::uuid, %s, %s, %s) RETURNING id"
)
UPDATE_ROW = f"UPDATE {WRITES} SET score = score + 1, active = NOT active WHERE id = %s"

_TABLE_COLUMNS = """
    name text NOT NULL,
    created timestamptz NOT NULL,
    amount numeric(12, 2) NOT NULL,
    ref uuid NOT NULL,
    payload jsonb NOT NULL,
    active bool NOT NULL,
    score float8 NOT NULL
"""
SCHEMA = f"""
DROP TABLE IF EXISTS {ITEMS}, {WRITES};
CREATE TABLE {ITEMS} (id int8 PRIMARY KEY, {_TABLE_COLUMNS});
CREATE TABLE {WRITES} (id int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY, {_TABLE_COLUMNS});
INSERT INTO {ITEMS}
SELECT i,
       'item ' || i,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '17 minutes 3.25 seconds',
       round((i * 7.31)::numeric % 10000, 2),
       md5(i::text)::uuid,
       jsonb_build_object(
           'sku', 'SKU-' || lpad(i::text, 6, '0'),
           'qty', i % 50,
           'price', (i % 1000) / 4.0,
           'tags', jsonb_build_array('t' || (i % 7), 't' || (i % 11)),
           'dims', jsonb_build_object('w', i % 30, 'h', i % 20, 'unit', 'cm')
       ),
       i % 3 <> 0,
       i * 0.5 + 0.25
FROM generate_series(1, {ROWS}) AS i;
"""


def numbered(sql: str) -> str:
    """``%s`` placeholders as ``$1, $2, ...`` (asyncpg)."""
    count = iter(range(1, sql.count("%s") + 1))
    return re.sub(r"%s", lambda _: f"${next(count)}", sql)


async def asyncpg_init(conn: Any) -> None:
    """asyncpg's ``init=``: jsonb through ``json.dumps`` / ``json.loads``, as psycopg2 does."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# -- server side ------------------------------------------------------------------------------


def seed(dsn: str) -> None:
    """(Re)create both tables and fill :data:`ITEMS` (blocking; run it in a thread)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(SCHEMA)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"VACUUM ANALYZE {ITEMS}")
    finally:
        conn.close()


def drop(dsn: str) -> None:
    """Drop both tables (blocking)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {ITEMS}, {WRITES}")
    finally:
        conn.close()


# -- per operation ---------------------------------------------------------------------------------


def random_key() -> int:
    """A key of :data:`ITEMS`, uniformly."""
    return random.randint(1, ROWS)


def random_first() -> int:
    """The first key of a range of :data:`RANGE_ROWS` keys inside :data:`ITEMS`."""
    return random.randint(1, ROWS - RANGE_ROWS + 1)


@dataclass(frozen=True)
class NewRow:
    """The values of one written row, as an application would have them.

    ``ref`` is text (``%s::uuid`` in the statement): psycopg2 adapts no
    ``uuid.UUID`` without ``register_uuid()``. ``payload`` is a dict; each
    contender wraps it the way its library wants (``Json``, ``Jsonb``, asyncpg's codec).
    """

    name: str
    created: datetime.datetime
    amount: decimal.Decimal
    ref: str
    payload: dict[str, Any]
    active: bool
    score: float


def new_row() -> NewRow:
    """Fresh values for ``write_tx``."""
    n = random.randint(1, 1_000_000)
    return NewRow(
        name=f"order {n}",
        created=datetime.datetime.now(datetime.timezone.utc),
        amount=decimal.Decimal(n % 100_000) / 100,
        ref=str(uuid.uuid4()),
        payload={"sku": f"SKU-{n:06d}", "qty": n % 50, "tags": ["new", "web"], "dims": {"w": 3, "h": 4}},
        active=True,
        score=n * 0.5,
    )


# -- the check: the same Python values from every contender ----------------------------------------

Row = tuple[tuple[str, Any], ...]


class Mismatch(Exception):
    """Two contenders returned different values (or not the expected types)."""


def _normalise(value: Any) -> Any:
    if isinstance(value, uuid.UUID):  # asyncpg's and psycopg 3's; psycopg2 gives str
        return str(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise Mismatch(f"naive datetime {value!r} from a timestamptz column")
        return value.astimezone(datetime.timezone.utc)
    return value


def normalise_row(row: Sequence[Any] | None) -> Row:
    """``((type name, value), ...)`` per column: uuid as text, datetimes in UTC,
    everything else as returned (so Decimal vs float, or dict vs str, differ)."""
    if row is None:
        raise Mismatch("no row")
    return tuple((type(value).__name__, value) for value in map(_normalise, row))


def check_sample(key: str, sample: dict[str, Any]) -> None:
    """``sample`` (from one contender) holds rows of the expected shape and types.

    :raises Mismatch: it does not.
    """
    rows: list[Row] = []
    if "row_by_key" in sample:
        rows.append(sample["row_by_key"])
    if "rows_100" in sample:
        if len(sample["rows_100"]) != RANGE_ROWS:
            raise Mismatch(f"{key}: rows_100 returned {len(sample['rows_100'])} rows, not {RANGE_ROWS}")
        rows.extend(sample["rows_100"])
    for row in rows:
        types = tuple(name for name, _ in row)
        if types != EXPECTED_TYPES:
            raise Mismatch(
                f"{key}: column types {dict(zip(COLUMNS, types, strict=False))}, "
                f"expected {dict(zip(COLUMNS, EXPECTED_TYPES, strict=True))}"
            )
    if "write_tx" in sample and sample["write_tx"] != "int":
        raise Mismatch(f"{key}: write_tx returned a {sample['write_tx']}, not an int id")


def compare_samples(ref_key: str, reference: dict[str, Any], key: str, sample: dict[str, Any]) -> None:
    """``sample`` equals ``reference`` in every workload both ran.

    :raises Mismatch: naming the first differing column and both values.
    """
    for work in WORKLOADS:
        if work not in reference or work not in sample:
            continue
        ours, theirs = sample[work], reference[work]
        if ours == theirs:
            continue
        if work == "row_by_key":
            pairs = [(ours, theirs)]
        elif work == "rows_100":
            pairs = list(zip(ours, theirs, strict=True))
        else:
            raise Mismatch(f"write_tx: {key} returned a {ours}, {ref_key} a {theirs}")
        for row, ref_row in pairs:
            for column, got, want in zip(COLUMNS, row, ref_row, strict=True):
                if got != want:
                    raise Mismatch(f"{work}, column {column}: {key} returned {got!r}, {ref_key} {want!r}")
        raise Mismatch(f"{work}: {key} and {ref_key} differ")
