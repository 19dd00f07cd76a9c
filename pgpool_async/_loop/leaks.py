"""Leak detection: connections kept too long, or dropped without being returned.

With ``leak_threshold`` set, the pool records where each connection was taken
(the caller's stack, outside this package) and warns, through the
``pgpool_async`` logger, once per loan that outlives the threshold. Whatever the
threshold, a lent connection garbage-collected without being returned is
reported and its slot recovered by the pool's maintenance task.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

__all__ = ["call_site", "logger"]

logger = logging.getLogger("pgpool_async")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STACK_DEPTH = 6


def call_site() -> traceback.StackSummary:
    """The caller's stack, innermost last, without this package's own frames."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
    return traceback.extract_stack(frame, limit=_STACK_DEPTH)


def describe(site: traceback.StackSummary | None) -> str:
    """``file:line in function()`` of the innermost frame, then the stack."""
    if not site:
        return "an unknown place (set leak_threshold to record where connections are taken)"
    last = site[-1]
    stack = "".join(traceback.format_list(site)).rstrip()
    return f"{last.filename}:{last.lineno} in {last.name}()\n{stack}"
