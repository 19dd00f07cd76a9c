"""The repository's shape: no import cycle in the package or the benchmarks (not even
through ``TYPE_CHECKING`` or function-level imports), a public surface that is
``__init__.py`` plus a few public modules, benchmark modules that are each run
(``python -m benchmarks.x``) or used by one that is, and a map of the tests
(tests/README.md) that names every file in tests/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import pgpool_async

pytestmark = pytest.mark.single_io("the repository layout: no pool")

PACKAGE = Path(pgpool_async.__file__).resolve().parent
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _module_name(path: Path, top: Path) -> str:
    parts = list(path.relative_to(top.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, top: Path) -> set[str]:
    """Every module of the ``top`` package ``path`` imports, wherever the import statement is."""
    name = _module_name(path, top)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == top.name:
                found.add(target)
                for alias in node.names:  # "from . import copying" names a module
                    candidate = f"{target}.{alias.name}"
                    if (top.parent / (candidate.replace(".", "/") + ".py")).exists():
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == top.name)
    found.discard(name)
    return found


def _graph(top: Path) -> dict[str, set[str]]:
    modules = {_module_name(p, top): p for p in top.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # A package __init__ that only marks a folder is not an edge to its children.
        graph[name] = {m for m in _imports(path, top) if m in modules and m != name}
    return graph


@pytest.mark.parametrize(("top", "sample"), [(PACKAGE, "pgpool_async.pool"), (BENCHMARKS, "benchmarks.run")])
def test_no_import_cycle(top: Path, sample: str) -> None:
    graph = _graph(top)
    # Importing pgpool_async.x runs pgpool_async/__init__ first: not a cycle of x's making.
    for deps in graph.values():
        deps.discard(top.name)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert graph.get(sample)  # the walk saw real edges


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The walk above on a made-up package with a cycle through a function-level import."""
    top = tmp_path / "benchmarks"
    top.mkdir()
    (top / "__init__.py").write_text("")
    (top / "a.py").write_text("from ._b import helper\n")
    (top / "_b.py").write_text("def helper() -> None:\n    from . import a\n")
    with pytest.raises(AssertionError, match=r"import cycle: benchmarks\._b -> benchmarks\.a -> "):
        test_no_import_cycle(top, "benchmarks.a")


def _entry_points(top: Path) -> set[str]:
    """Modules with an ``if __name__ == "__main__":`` block: what ``python -m`` runs."""
    found = set()
    for path in top.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                found.add(_module_name(path, top))
    return found


def test_every_benchmark_module_is_run_or_used() -> None:
    """Each module of ``benchmarks/`` is an entry point (``python -m benchmarks.x``) or is
    imported, directly or not, by one: no orphan a newcomer has to wonder about. The fault
    benchmarks share their records and tables through ``benchmarks._harness``."""
    graph = _graph(BENCHMARKS)
    entries = _entry_points(BENCHMARKS)
    assert {"benchmarks.run", "benchmarks.faults"} <= entries
    reached: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph.get(name, ()))
    orphans = set(graph) - reached - {"benchmarks"}
    assert not orphans, f"benchmark modules nothing runs: {sorted(orphans)}"
    for fault_module in ("benchmarks.faults", "benchmarks.netfaults"):
        assert "benchmarks._harness" in graph[fault_module]
    assert "benchmarks.faults" not in graph["benchmarks.netfaults"]


def test_internal_modules_are_private() -> None:
    public = {
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if not any(part.startswith("_") for part in p.relative_to(PACKAGE).parts)
    }
    assert public == {
        "connection.py",
        "copying.py",
        "cursor.py",
        "errors.py",
        "extras.py",
        "fastapi.py",
        "notifications.py",
        "pool.py",
        "prometheus.py",
        "sync.py",
        "testing/faultproxy.py",
        "testing/throwaway.py",
    } | {p for p in public if p.startswith("testing/")}
    for name in pgpool_async.__all__:
        assert hasattr(pgpool_async, name), name


def test_the_tests_map_names_every_test_file() -> None:
    """tests/README.md maps modules to test files: it names every file in tests/, and only those."""
    tests = Path(__file__).resolve().parent
    text = (tests / "README.md").read_text()
    files = {p.name for p in tests.iterdir() if p.suffix in {".py", ".md"}} - {"__init__.py", "README.md"}
    named = set(re.findall(r"`([\w.]+\.(?:py|md))`", text))
    missing = sorted(files - named)
    assert not missing, f"tests/README.md does not name {missing}: add each to its table"
    gone = sorted(n for n in named if "/" not in n and n.startswith(("test_", "fix_")) and n not in files)
    assert not gone, f"tests/README.md names files that are not in tests/: {gone}"
