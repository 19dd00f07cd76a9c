"""psycopg2's own view of a connection, kept in step by the loop path.

psycopg2 decides transaction boundaries from a field of its own, the
connection's ``status`` (``STATUS_READY`` / ``STATUS_BEGIN``), not from the
server: it sends ``BEGIN`` before a statement when ``status`` is ready and
autocommit is off, and ``COMMIT``/``ROLLBACK`` only when ``status`` says begun,
whatever SQL ran in between. The loop path sends statements itself, so it keeps
that field true as psycopg2 would: then psycopg2 code run afterwards (in a
thread, ``run_sync``, a named cursor, ``set_session``) finds the connection
exactly as if psycopg2 had run every statement, with no hand-off and nothing
replayed.

Python cannot write ``status`` (it is read-only), so :func:`layout` finds where
the C struct keeps it, on a live connection, from neighbours Python *can* read
(``pgconn_ptr``, ``server_version``, ``protocol_version``, ``async_``,
``status``, ``closed``, ``notices``), and proves the offset by writing a value
and reading it back through psycopg2's own attribute. When any check fails (an
unknown psycopg2 build) :func:`layout` returns None and the loop path is not
used: the pool says why (see ``LoopStatementRunner.refusal``).

The fields (psycopg/connection.h, ``connectionObject``), in order::

    long closed; long mark; int status; xidObject *tpc_xid; long async;
    int protocol; int server_version; PGconn *pgconn; PGcancel *cancel;
    PyObject *async_cursor; int async_status; PGresult *pgres;
    PyObject *notice_list; struct connectionObject_notice *notice_pending; ...
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg2.extensions as ext

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PGConnection

__all__ = ["Layout", "STATUS_BEGIN", "STATUS_READY", "layout", "null_caster", "typecast_layout"]

STATUS_READY: int = ext.STATUS_READY  # 1
STATUS_BEGIN: int = ext.STATUS_BEGIN  # 2
_BROKEN = 2  # psycopg2's closed == 2: "something horrible happened" (the server went away)

_WORD = ctypes.sizeof(ctypes.c_void_p)


class Layout:
    """Where one psycopg2 build keeps the fields the loop path keeps in step
    (offsets from the object's address)."""

    __slots__ = ("closed", "mark", "notice_pending", "status")

    def __init__(self, pgconn: int) -> None:
        self.status = pgconn - 4 * _WORD
        self.mark = pgconn - 5 * _WORD
        self.closed = pgconn - 6 * _WORD
        self.notice_pending = pgconn + 6 * _WORD

    def set_status(self, raw: PGConnection, status: int) -> None:
        """psycopg2's ``status``: READY after a transaction ends, BEGIN once one began."""
        ctypes.c_int.from_address(id(raw) + self.status).value = status

    def ended(self, raw: PGConnection) -> None:
        """What psycopg2's ``commit()``/``rollback()`` do to the connection's
        state once their statement was sent, whatever its outcome: ready, and one
        more transaction ended (``mark``, which named cursors compare)."""
        at = id(raw)
        ctypes.c_int.from_address(at + self.status).value = STATUS_READY
        ctypes.c_long.from_address(at + self.mark).value += 1

    def broken(self, raw: PGConnection) -> None:
        """psycopg2's mark of a connection the server ended (``closed == 2``): it
        is closed for every caller, and ``close()`` still frees it."""
        ctypes.c_long.from_address(id(raw) + self.closed).value = _BROKEN

    def notices_word(self, raw: PGConnection) -> ctypes.c_void_p:
        """psycopg2's list of notices libpq handed it and it has not yet moved into
        ``raw.notices`` (it does so when its own code next runs: ``raw.poll()``):
        its ``value`` is None when there are none. Valid while ``raw`` lives."""
        return ctypes.c_void_p.from_address(id(raw) + self.notice_pending)


_found: Layout | None = None
_checked = False


def layout(raw: PGConnection) -> Layout | None:
    """The layout of psycopg2's connection struct, checked on ``raw`` (an open,
    idle, synchronous connection, ``status`` ready) the first time; None when it
    is not the one described above. Cheap after the first call."""
    global _found, _checked
    if _checked:
        return _found
    if raw.closed or raw.async_ or raw.status != STATUS_READY or raw.pgconn_ptr is None:
        return None  # can't check on this one: try again on another
    _checked = True
    _found = _probe(raw)
    return _found


def _probe(raw: PGConnection) -> Layout | None:
    if ctypes.sizeof(ctypes.c_long) != _WORD or ctypes.sizeof(ctypes.c_int) * 2 != _WORD:
        return None  # (an LP64 platform is assumed below)
    at = id(raw)
    size = type(raw).__basicsize__
    pgconn = raw.pgconn_ptr
    found = [off for off in range(2 * _WORD, size - _WORD + 1, _WORD) if _word(at + off) == pgconn]
    if len(found) != 1:
        return None
    off = found[0]
    if off < 6 * _WORD or off + 7 * _WORD > size:
        return None
    checks = (
        ctypes.c_int.from_address(at + off - 4).value == raw.server_version
        and ctypes.c_int.from_address(at + off - 8).value == raw.protocol_version
        and ctypes.c_long.from_address(at + off - 2 * _WORD).value == 0  # async
        and ctypes.c_int.from_address(at + off - 4 * _WORD).value == raw.status
        and ctypes.c_long.from_address(at + off - 6 * _WORD).value == raw.closed
        and _word(at + off + 5 * _WORD) == id(raw.notices)
    )
    if not checks:
        return None
    found_layout = Layout(off)
    # Prove the status offset through psycopg2's own getter, then put it back.
    found_layout.set_status(raw, STATUS_BEGIN)
    seen = raw.status
    found_layout.set_status(raw, STATUS_READY)
    if seen != STATUS_BEGIN or raw.status != STATUS_READY:
        return None
    return found_layout


def _word(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


# -- typecasters --------------------------------------------------------------------------------
# psycopg2 calls the Python function behind a typecaster made with new_type() with
# None for a NULL cell (its C casters return None themselves); the typecaster object's
# own __call__ returns None for None without calling it. The function is not exposed:
# typecastObject is PyObject_HEAD, then name, values, ccast (a C function), pcast
# (the Python function), bcast.


@functools.cache
def typecast_layout() -> tuple[type, int, int, int] | None:
    """(typecaster type, offsets of ``ccast``, ``pcast`` and ``bcast``), checked on
    a probe made with ``new_type``, an array caster made with ``new_array_type``
    over it, and a builtin caster; None when the layout is not that (NULL cells
    then stay None without calling Python casters, and every cell goes through
    the caster object's Python call)."""

    def probe_function(value: Any, cur: Any) -> Any:
        return value

    probe = ext.new_type((0,), "PGPOOL_PROBE", probe_function)
    base = object.__basicsize__
    at = id(probe)
    ccast, pcast, bcast = base + 2 * _WORD, base + 3 * _WORD, base + 4 * _WORD
    if type(probe).__basicsize__ < base + 5 * _WORD:
        return None
    array = ext.new_array_type((0,), "PGPOOL_PROBE_ARRAY", probe)
    if (
        _word(at + base) != id(probe.name)
        or _word(at + base + _WORD) != id(probe.values)
        or _word(at + ccast) != 0
        or _word(at + pcast) != id(probe_function)
        or type(ext.UNICODE) is not type(probe)
        or _word(id(ext.UNICODE) + ccast) == 0  # a builtin caster has its C function
        or _word(at + bcast) != 0
        or _word(id(ext.UNICODE) + bcast) != 0
        or _word(id(array) + bcast) != id(probe)  # an array caster names its base caster
        or _word(id(array) + ccast) == 0
    ):
        return None
    return type(probe), ccast, pcast, bcast


def null_caster(cast: Any) -> Callable[[None, Any], Any] | None:
    """The Python function psycopg2 would call for a NULL cell of a column cast by
    ``cast``; None: the cell is None."""
    found = typecast_layout()
    if found is None or type(cast) is not found[0] or _word(id(cast) + found[1]):
        return None
    pcast = _word(id(cast) + found[2])
    if not pcast:
        return None
    function: Callable[[None, Any], Any] = ctypes.cast(pcast, ctypes.py_object).value
    return function
