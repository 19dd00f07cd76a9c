"""The package's shape: no import cycle (not even through ``TYPE_CHECKING``
imports), and a public surface that is ``__init__.py`` plus a few public modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pgpool_async

pytestmark = pytest.mark.single_io("the repository layout: no pool")

PACKAGE = Path(pgpool_async.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every pgpool_async module ``path`` imports, wherever the import statement is."""
    name = _module_name(path)
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
            if target.startswith("pgpool_async"):
                found.add(target)
                for alias in node.names:  # "from . import copying" names a module
                    candidate = f"{target}.{alias.name}"
                    if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists():
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pgpool_async"))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # A package __init__ that only marks a folder is not an edge to its children.
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def test_no_import_cycle() -> None:
    graph = _graph()
    # Importing pgpool_async.x runs pgpool_async/__init__ first: not a cycle of x's making.
    for deps in graph.values():
        deps.discard("pgpool_async")
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
    assert graph.get("pgpool_async.pool")  # the walk saw real edges


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
