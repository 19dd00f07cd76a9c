"""The suite where users run it, beyond the interpreter and the DSN of this run.

- Every declared Python: the package declares the Pythons it supports (``requires-python``
  and its ``Programming Language :: Python :: 3.x`` classifiers). This run covers the
  interpreter it runs on; for the lowest and the highest declared ones that are not this
  interpreter, a venv is built with ``pip install -e '.[test]'`` and the non-slow suite runs
  there (both ``io`` paths, on a throwaway server of its own; one Python after the other).
  The interpreters are found on ``PATH`` (``python3.10``) or under pyenv. Slow, so marked
  ``slow``; CI runs them. Where an interpreter is missing the test skips with the reason,
  and fails under ``CI``.
- ``PGPOOL_TEST_DSN`` given as a URL (``postgresql://user@host:port/db``, the form most
  users have): a handful of the tests that add keywords to the DSN or proxy its address
  run in a child pytest with the session's server given that way.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from .conftest import server_query
from .fix_dsn import as_url, tcp_address, with_params

pytestmark = pytest.mark.single_io("runs the suite in child processes, which run both io paths")

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment less anything pointing at this venv, a database or pytest options."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "VIRTUAL_ENV",
            "PYTHONPATH",
            "PGPOOL_DSN",
            "PGPOOL_TEST_DSN",
            "PGPOOL_TEST_IO",
            "PYTEST_ADDOPTS",
        }
    }
    env.update(extra)
    return env


def _summary(out: str) -> str:
    """pytest's last line (``N passed, M skipped in T s``)."""
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- PGPOOL_TEST_DSN as a URL ----------------------------------------------------------


def test_the_dsn_helpers_take_a_url(dsn: str, app_name: str) -> None:
    url = as_url(dsn)
    assert url.startswith("postgresql://")
    assert psycopg2.extensions.parse_dsn(url) == psycopg2.extensions.parse_dsn(dsn)
    named = with_params(url, application_name=app_name, connect_timeout=5)
    assert server_query(named, "SELECT current_setting('application_name')") == [(app_name,)]
    assert tcp_address(url) == tcp_address(dsn)
    host, _ = tcp_address(dsn)
    assert tcp_address(f"postgresql://postgres@{host}/postgres") == (host, 5432)  # libpq's default port
    with pytest.raises(pytest.skip.Exception, match="Unix socket"):
        tcp_address("host=/var/run/postgresql dbname=x")


#: Tests that add keywords to the DSN or hand its address to a proxy (one or two of each kind).
URL_DSN_TESTS = [
    "tests/test_errors.py::test_unknown_database_and_role_are_permanent",
    "tests/test_pool.py::test_repr_and_errors_never_show_password",
    "tests/test_pool.py::test_connect_timeout_default_and_override",
    "tests/test_native.py::test_a_cancelled_statement_is_cancelled_on_the_server",
    "tests/test_native.py::test_a_killed_backend_closes_the_connection",
    "tests/test_failover.py::test_a_read_only_transaction_of_the_caller_retires_nothing",
    "tests/test_engine.py::test_connect_outside_lock",
    "tests/test_health.py::test_reconnect_failed_and_waiters_time_out_with_cause",
    "tests/test_cancellation.py::test_cancel_while_worker_connects",
]


@pytest.mark.timeout(300)
def test_a_url_test_dsn_runs_the_tests_that_build_dsns(dsn: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *URL_DSN_TESTS],
        cwd=ROOT,
        env=clean_env(PGPOOL_TEST_DSN=as_url(dsn), PGPOOL_TEST_IO="loop"),
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # Each ran (the async ones on asyncio and trio), none skipped.
    ran = re.fullmatch(r"(\d+) passed in [\d.]+s(?: \(.*\))?", _summary(proc.stdout))
    assert ran and int(ran[1]) >= len(URL_DSN_TESTS), out[-5000:]


# -- every declared Python -------------------------------------------------------------


def declared_pythons() -> list[tuple[int, int]]:
    """The Pythons pyproject.toml declares (oldest first). Read as text: tomllib is 3.11+."""
    text = (ROOT / "pyproject.toml").read_text()
    found = sorted(
        (int(major), int(minor))
        for major, minor in re.findall(r'"Programming Language :: Python :: (\d+)\.(\d+)"', text)
    )
    floor = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', text, re.MULTILINE)
    assert floor and found, "pyproject.toml declares requires-python >=3.x and the 3.x classifiers"
    assert found[0] == (int(floor[1]), int(floor[2])), "requires-python and the lowest classifier agree"
    return found


def find_python(version: tuple[int, int]) -> str | None:
    """An interpreter of this minor version: ``python3.X`` on PATH, else pyenv's newest."""
    name = f"python{version[0]}.{version[1]}"
    candidates = [shutil.which(name) or ""]
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pattern = os.path.join(root, "versions", f"{version[0]}.{version[1]}.*", "bin", name)
    candidates += sorted(glob.glob(pattern), key=lambda p: [int(x) for x in re.findall(r"\d+", p)[-3:]])[::-1]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            probe = subprocess.run(
                [path, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True
            )
            if probe.returncode == 0 and probe.stdout.split() == [str(v) for v in version]:
                return path
    return None


def _ends() -> list[tuple[int, int]]:
    declared = declared_pythons()
    return sorted({declared[0], declared[-1]} - {sys.version_info[:2]})


class SuiteRun:
    """The non-slow suite on another interpreter, in a fresh venv under ``where``."""

    def __init__(self, python: str, where: Path) -> None:
        self.python = python
        self.where = where
        self.log = where / "run.log"
        self.proc: subprocess.Popen[str] | None = None
        self.started = time.monotonic()

    def start(self) -> None:
        """Build the venv (here, so nothing outlives this process but the run itself), then
        start the suite in it."""
        venv = self.where / "venv"
        env = clean_env()
        for args in (
            [self.python, "-m", "venv", str(venv)],
            [f"{venv}/bin/pip", "install", "-q", "-e", ".[test]"],
        ):
            done = subprocess.run(
                args, cwd=ROOT, env=env, timeout=900, capture_output=True, text=True, stdin=subprocess.DEVNULL
            )
            assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        # Its own mypy cache: test_quality.py checks the package with this interpreter.
        env["MYPY_CACHE_DIR"] = str(self.where / "mypy_cache")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [f"{venv}/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,  # its own process group: stop() ends all of it
                preexec_fn=_die_with_parent,
            )

    def wait(self, timeout: float) -> tuple[int, str, float]:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            code = -9
        return code, self.log.read_text(), time.monotonic() - self.started

    def stop(self) -> None:
        """Interrupt the run (pytest then tears down its server), then kill what is left."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
                return


def _die_with_parent() -> None:
    """In the child: interrupted by the kernel if this pytest dies without cleaning up
    (Linux), so the child pytest still tears down its throwaway server. SIGINT is set back
    to its default first: a pytest started in the background ignores it, and so would
    the child (Python keeps an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("version", _ends(), ids=lambda v: f"py{v[0]}.{v[1]}")
def test_the_suite_passes_on_each_end_python(version: tuple[int, int], tmp_path: Path) -> None:
    """One Python after the other: side by side, the suites' own timing checks (the event
    loop never stalls 0.5 s) would measure each other."""
    name = "python{}.{}".format(*version)
    python = find_python(version)
    if python is None:
        why = f"{name} is not installed (on PATH or under pyenv): the suite cannot be run on it"
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must run this test)")
        pytest.skip(why)
    run = SuiteRun(python, tmp_path)
    try:
        run.start()
        code, out, took = run.wait(timeout=1700)
    finally:
        run.stop()
    summary = _summary(out)
    print(f"{name} ({python}): {summary} (with the venv build: {took:.0f} s)")
    assert code == 0, out[-8000:]
    # "2 xfailed" is fine; "1 failed" or "1 error" is not.
    failed = re.search(r"\b\d+ (failed|errors?)\b", summary)
    assert re.match(r"\d+ passed", summary) and not failed, out[-8000:]
