"""Static checks are part of the test command: mypy --strict and ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.single_io("linters and type checks: no pool")

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "pgpool_async"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "pgpool_async", "tests", "examples", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_import_is_declared() -> None:
    """deptry: each import in the package, tests, examples and benchmarks is a declared
    dependency (of the project or an extra), and each declared one is used (pyproject's
    [tool.deptry] lists the tools that are run rather than imported)."""
    proc = subprocess.run(
        [sys.executable, "-m", "deptry", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
