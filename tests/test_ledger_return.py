"""The return decision (``ledger.decide_return``): every case, no server."""

from __future__ import annotations

import itertools

import pytest

from pgpool_async._loop.ledger import Return, decide_return

pytestmark = pytest.mark.single_io("pure function: no pool")

FACTS = ("close", "settled", "clean", "closed", "shut_down", "must_close")


def _expected(facts: dict[str, bool], engine: bool, engine_on_loop: bool) -> Return:
    """The rule, written out the long way."""
    broken = facts["closed"] or facts["shut_down"]
    if engine:
        if facts["close"] or broken:
            return Return.ENGINE_CLOSE
        if facts["settled"] and facts["clean"] and engine_on_loop:
            return Return.ENGINE
        return Return.ENGINE_RESET
    if facts["close"] or broken or facts["must_close"]:
        return Return.CLOSE
    return Return.KEEP if facts["settled"] and facts["clean"] else Return.RESET


@pytest.mark.parametrize("engine,engine_on_loop", [(False, False), (True, False), (True, True)])
def test_every_combination(engine: bool, engine_on_loop: bool) -> None:
    for values in itertools.product((False, True), repeat=len(FACTS)):
        facts = dict(zip(FACTS, values, strict=True))
        got = decide_return(**facts, engine=engine, engine_on_loop=engine_on_loop)
        assert got is _expected(facts, engine, engine_on_loop), facts


def test_the_common_case_needs_no_io() -> None:
    kept = dict(close=False, settled=True, clean=True, closed=False, shut_down=False, must_close=False)
    assert decide_return(**kept) is Return.KEEP
    assert decide_return(**kept, engine=True, engine_on_loop=True) is Return.ENGINE
    # psycopg2's putconn may roll back or close under its lock: a thread, always.
    assert decide_return(**kept, engine=True) is Return.ENGINE_RESET


@pytest.mark.parametrize("fact", ["close", "closed", "shut_down"])
def test_broken_or_asked_is_closed(fact: str) -> None:
    facts = dict(close=False, settled=True, clean=True, closed=False, shut_down=False, must_close=False)
    facts[fact] = True
    assert decide_return(**facts) is Return.CLOSE
    assert decide_return(**facts, engine=True, engine_on_loop=True) is Return.ENGINE_CLOSE


def test_not_kept_is_closed_but_an_engine_decides_for_itself() -> None:
    facts = dict(close=False, settled=True, clean=True, closed=False, shut_down=False, must_close=True)
    assert decide_return(**facts) is Return.CLOSE
    assert decide_return(**facts, engine=True, engine_on_loop=True) is Return.ENGINE


@pytest.mark.parametrize("fact", ["settled", "clean"])
def test_unsettled_or_dirty_is_reset_in_a_thread(fact: str) -> None:
    facts = dict(close=False, settled=True, clean=True, closed=False, shut_down=False, must_close=False)
    facts[fact] = False
    assert decide_return(**facts) is Return.RESET
    assert decide_return(**facts, engine=True, engine_on_loop=True) is Return.ENGINE_RESET
