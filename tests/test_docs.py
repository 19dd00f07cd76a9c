"""The documentation cannot rot: the site builds strictly, every public name has a
docstring, every Python snippet in the docs comes from an example the suite runs, the
README's snippets are copies of those examples, and the examples added for the docs run.

``mkdocs build --strict`` needs the ``docs`` extra (part of ``test``): without it the build
test skips locally with the reason and fails when ``CI`` is set.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pgpool_async.testing import skip_or_fail

from .conftest import python_args, server_query
from .webserver import serving

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

# Every module whose names the API reference documents.
PUBLIC_MODULES = [
    "pgpool_async",
    "pgpool_async.errors",
    "pgpool_async.fastapi",
    "pgpool_async.extras",
    "pgpool_async.copying",
    "pgpool_async.notifications",
    "pgpool_async.prometheus",
    "pgpool_async.testing",
    "pgpool_async.testing.throwaway",
    "pgpool_async.testing.faultproxy",
    "pgpool_async.testing.pgbouncer",
    "pgpool_async.testing.standby",
    "pgpool_async.testing.load",
    "pgpool_async.testing.netns",
]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
SECTION = re.compile(r"^\s*# --8<-- \[(start|end):(\w+)\]\s*$")


def _blocks(path: Path, language: str = "python") -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def _doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _sections(path: Path) -> dict[str, str]:
    """The ``# --8<-- [start:name]`` ... ``[end:name]`` sections of an example, as
    pymdownx.snippets includes them (marker lines left out, indentation kept)."""
    found: dict[str, list[str]] = {}
    open_: list[str] = []
    for line in path.read_text().splitlines():
        m = SECTION.match(line)
        if m:
            kind, name = m.groups()
            if kind == "start":
                found[name] = []
                open_.append(name)
            else:
                open_.remove(name)
            continue
        for name in open_:
            found[name].append(line)
    return {name: "\n".join(lines) for name, lines in found.items()}


def _dedent(text: str) -> str:
    lines = text.splitlines()
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines).strip()


# -- the site ------------------------------------------------------------------------------


@pytest.mark.single_io("builds the documentation site: no pool")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link or anchor, a missing include or a name
    mkdocstrings cannot find fails; the reference then shows the public API."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "pymdownx"):
        if importlib.util.find_spec(module) is None:
            skip_or_fail(f"{module} is not installed: pip install -e '.[docs]' to build the docs")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = (site / "reference" / "pgpool_async" / "index.html").read_text()
    for name in ("AsyncConnectionPool", "AsyncCursor", "scroll", "fetchval", "transaction"):
        assert name in reference, name
    assert "TransactionFailed" in (site / "reference" / "errors" / "index.html").read_text()
    assert "install_error_handlers" in (site / "reference" / "fastapi" / "index.html").read_text()
    # The snippets were included, not left as include lines.
    assert "--8&lt;--" not in (site / "getting-started" / "index.html").read_text()
    home = re.sub(r"<[^>]+>", "", (site / "index.html").read_text())  # highlighted: text only
    assert "AsyncConnectionPool(1, 10, dsn, timeout=5)" in home


@pytest.mark.single_io("reads mkdocs.yml: no pool")
def test_every_page_is_in_the_nav() -> None:
    """A page left out of ``nav`` is built but unreachable: every page is listed, except
    the guides other parts of the project add to ``docs/`` before they join the nav."""
    config = (ROOT / "mkdocs.yml").read_text()
    lines = [line for line in config.splitlines() if not line.strip().startswith("#")]
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", "\n".join(lines), re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in _doc_pages()}
    assert pages - nav <= {"observability.md", "from-psycopg2-pools.md"}, pages - nav
    assert nav <= pages, nav - pages


# -- docstrings ----------------------------------------------------------------------------


def _attribute_docstrings(module: object) -> set[str]:
    """Module-level names followed by a string literal (an attribute docstring)."""
    source = inspect.getsource(module)  # type: ignore[arg-type]
    body = ast.parse(source).body
    named: set[str] = set()
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, (ast.Assign, ast.AnnAssign))
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named.update(t.id for t in targets if isinstance(t, ast.Name))
    return named


def _public_members(cls: type) -> Iterator[tuple[str, object]]:
    """Public methods and properties a class defines itself (not inherited ones)."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property) or inspect.isfunction(member):
            yield name, member


@pytest.mark.single_io("reads docstrings: no pool")
@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip(), f"{module_name} has no module docstring"
    names = getattr(module, "__all__", None)
    assert names, f"{module_name} has no __all__"
    attribute_docs = _attribute_docstrings(module)
    missing: list[str] = []
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj):
            # A class that only inherits its docstring (an exception) still needs its own;
            # psycopg2's PoolError, re-exported as it is, keeps psycopg2's.
            own = obj.__module__.startswith("pgpool_async")
            if own and not (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__):
                missing.append(name)
            if inspect.isclass(obj) and obj.__module__.startswith("pgpool_async"):
                missing += [
                    f"{name}.{member_name}"
                    for member_name, member in _public_members(obj)
                    if not (member.__doc__ or "").strip()
                ]
        elif callable(obj) and obj.__doc__:
            continue  # a callable instance (a FastAPI dependency object) with its docs
        elif name not in attribute_docs and getattr(obj, "__module__", "").startswith("pgpool_async"):
            missing.append(name)
        elif name not in attribute_docs and not inspect.ismodule(obj) and not callable(obj):
            missing.append(name)  # a constant: it needs an attribute docstring
    assert not missing, f"{module_name}: no docstring for {missing}"


# -- snippets ------------------------------------------------------------------------------


@pytest.mark.single_io("reads the docs: no pool")
def test_docs_python_snippets_are_includes_from_examples() -> None:
    """Every Python block in ``docs/`` is an include of an example (or a section of one),
    so the code a reader copies is code the suite runs."""
    wrong: list[str] = []
    for page in _doc_pages():
        for body in _blocks(page):
            for line in body.strip().splitlines():
                m = INCLUDE.match(line.strip())
                if not m:
                    wrong.append(f"{page.relative_to(ROOT)}: {line.strip()!r}")
                    continue
                target, _, section = m.group(1).partition(":")
                assert target.startswith("examples/"), f"{page.relative_to(ROOT)} includes {target}"
                path = ROOT / target
                assert path.exists(), f"{page.relative_to(ROOT)} includes {target}: no such file"
                if section:
                    assert section in _sections(path), f"{page.relative_to(ROOT)}: no section {m.group(1)}"
    assert not wrong, "Python in docs/ that is not an include from examples/:\n" + "\n".join(wrong)


@pytest.mark.single_io("reads the README: no pool")
def test_readme_python_snippets_are_copies_of_examples() -> None:
    """GitHub shows the README without includes, so its Python blocks are copies: each is
    an example's section (or whole file, less its docstring) character for character."""
    known: dict[str, str] = {}
    for path in sorted(EXAMPLES.glob("*.py")):
        for name, text in _sections(path).items():
            known[_dedent(text)] = f"{path.name}:{name}"
    blocks = _blocks(ROOT / "README.md")
    assert blocks, "the README shows no Python"
    for body in blocks:
        assert _dedent(body) in known, (
            "a README Python block is not a section of any example (update it from examples/):\n" + body
        )


# -- the examples written for the docs -----------------------------------------------------


def _run(args: list[str], dsn: str | None, io: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PGPOOL_DSN"}
    if dsn:
        env["PGPOOL_DSN"] = dsn
    proc = subprocess.run(
        [sys.executable, *python_args(args, io)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_quickstart_example(dsn: str, pool_io: str | None) -> None:
    server_query(dsn, "DROP TABLE IF EXISTS notes")
    out = _run(["examples/quickstart.py"], dsn, pool_io)
    assert "notes: 1" in out and "this month: 1" in out


def test_transactions_example(dsn: str, pool_io: str | None) -> None:
    out = _run(["examples/transactions.py"], dsn, pool_io)
    assert "rows after the savepoint: 2" in out
    assert "first row: (1, 'one') then 1 more; sum of 10000: 50005000 ; read-only count: 2" in out
    assert "copied out: 4 rows, 27 bytes" in out
    assert "notifications: ['job 0', 'job 1', 'job 2']" in out
    assert "all connections back: True" in out


def test_lifecycle_example(dsn: str, pool_io: str | None) -> None:
    out = _run(["examples/lifecycle.py"], dsn, pool_io)
    assert "sizes after resize: 4 40 closed: True" in out
    assert re.search(r"slow query given up after 0\.\d s", out), out
    assert "connection back, clean: True" in out
    assert "server-side limit: canceling statement due to statement timeout" in out
    assert re.search(r"permanent: True after \d\.\d s", out), out


@pytest.mark.single_io("creates pools without opening them: no I/O")
def test_scaling_example() -> None:
    out = _run(["examples/scaling.py"], None, None)
    assert out.count("[not open, io=auto]") == 4, out
    assert "at pgbouncer:6432" in out and "at db1,db2,db3" in out


@pytest.fixture
def quickstart_server(dsn: str, pool_io: str | None) -> Iterator[str]:
    server_query(dsn, "DROP TABLE IF EXISTS items")
    with serving(sys.executable, python_args(["examples/fastapi_quickstart.py"], pool_io), dsn) as (base, _):
        yield base


def test_fastapi_quickstart_example(quickstart_server: str) -> None:
    """Every route of the FastAPI app the README and the getting-started page show."""
    with httpx.Client(base_url=quickstart_server, timeout=30) as client:
        created = client.post("/items/apple")
        assert created.status_code == 200, created.text
        item = created.json()
        assert client.get(f"/items/{item}").json() == {"name": "apple"}
        missing = client.get("/items/987654321")
        assert missing.status_code == 404 and missing.json() == {"detail": "no item 987654321"}
        assert client.get("/report").json() == {"items": 1}
        export = client.get("/export.csv")
        assert export.status_code == 200 and export.text == f"{item},apple\n"
        health = client.get("/health")
        assert health.status_code == 200, health.text


@pytest.mark.single_io("reads the README: no pool")
def test_readme_is_a_landing_page_whose_links_resolve() -> None:
    """Under 200 lines, with a chart, and every relative link (into docs/, the changelog,
    the charts) names a file of the repository."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.endswith(".png") for link in local), "the README shows no chart"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


@pytest.mark.single_io("draws charts from committed results: no pool")
def test_benchmark_charts_render_with_their_provenance(tmp_path: Path) -> None:
    """``python -m benchmarks.report`` draws the four charts the docs show from the
    committed results, each labelled with the machine, commit and date of its data;
    the committed PNGs are the ones the docs link."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = ["select1.png", "overload.png", "waiters.png", "fastapi.png"]
    for name in names:
        drawn = tmp_path / name
        assert drawn.read_bytes().startswith(b"\x89PNG"), name
        assert (DOCS / "img" / name).exists(), f"docs/img/{name} is not committed"
    from benchmarks.charts import provenance

    for results in ("latest.json", "web.json"):
        data = json.loads((ROOT / "benchmarks" / "results" / results).read_text())
        line = provenance(data)
        assert data["machine"]["source"]["commit"] in line and data["started_at"][:10] in line, line
        assert "cores" in line and "Python" in line, line
    pages = "".join(p.read_text() for p in _doc_pages())
    assert all(f"img/{name}" in pages for name in names)
