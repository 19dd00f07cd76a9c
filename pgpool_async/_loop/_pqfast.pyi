"""Types of the optional C module (``_pqfast.c``); see its docstrings."""

from collections.abc import Callable
from typing import Any

def bind(*addresses: int) -> None: ...
def set_typecast(type: type, ccast_offset: int, pcast_offset: int, bcast_offset: int, /) -> None: ...
def send(pg: int, query: bytes, /) -> int: ...
def pump(
    pg: int, last: int | None, prev: int | None, keep_prev: bool, /
) -> tuple[int, int | None, int | None, int, int]: ...
def convert(
    res: int,
    casts: list[Callable[[bytes, Any], Any]],
    cursor: Any,
    start: int,
    stop: int,
    rows: list[tuple[Any, ...]],
    /,
) -> list[tuple[Any, ...]]: ...
def casts(
    res: int,
    cursor: Any,
    cursor_types: dict[int, Any] | None,
    conn_types: dict[int, Any] | None,
    global_types: dict[int, Any] | None,
    fallback: Callable[[Any, int], Callable[[bytes, Any], Any]],
    /,
) -> list[Callable[[bytes, Any], Any]]: ...
def rows(
    res: int,
    cursor: Any,
    cursor_types: dict[int, Any] | None,
    conn_types: dict[int, Any] | None,
    global_types: dict[int, Any] | None,
    fallback: Callable[[Any, int], Callable[[bytes, Any], Any]],
    limit: int,
    /,
) -> list[tuple[Any, ...]] | None: ...
def head(
    res: int,
    cursor: Any,
    cursor_types: dict[int, Any] | None,
    conn_types: dict[int, Any] | None,
    global_types: dict[int, Any] | None,
    fallback: Callable[[Any, int], Callable[[bytes, Any], Any]],
    count: int,
    /,
) -> tuple[list[tuple[Any, ...]], int]: ...
def ntuples(res: int, /) -> int: ...
def clear(res: int | None, /) -> None: ...
