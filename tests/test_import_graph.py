"""No import circles inside src/archlab: every arrow of the import graph runs one way.

The graph is read from the source (AST), not from an interpreter, so an import hidden in a
function body counts as much as one at the top: a function-level import that closes a circle
only postpones it to the first call. Imports under ``if TYPE_CHECKING:`` are left out (they
never run). The two dynamic imports the AST cannot read (the registry's architecture modules,
the CLI's command modules) are added from the lists that drive them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "archlab"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from pkg import sub`` names pkg.sub)."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in paths)
                continue
            if node.level:
                base_parts = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in paths:
                    targets.add(sub)
                elif base in paths:
                    targets.add(base)
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's circles: one per strongly connected component of more than one module
    (Tarjan), each given as a closed path through it, e.g. ``[a, b, a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_closed_path(graph, set(c)) for c in components]


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in component and w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError("a strongly connected component without a circle")


def dynamic_edges() -> dict[str, set[str]]:
    """The imports done by importlib.import_module from a list, read from those lists."""
    from archlab import cli
    from archlab.models import registry

    return {
        "archlab.cli": {f"archlab.commands.{c}" for c in cli.COMMANDS},
        "archlab.models.registry": {f"archlab.models.{m}" for m in registry.MODULES},
    }


def archlab_graph() -> dict[str, set[str]]:
    graph = import_graph(SRC)
    for module, targets in dynamic_edges().items():
        assert module in graph and targets <= graph.keys(), (module, targets - graph.keys())
        graph[module] |= targets
    return graph


def test_no_import_circles_in_archlab():
    cycles = find_cycles(archlab_graph())
    assert cycles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports_at_every_level_but_not_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .. import top\n")
    (pkg / "top.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import pkg.leaf\n"
        "if TYPE_CHECKING:\n    from .hidden import X\n"
        "else:\n    from . import other\n"
        "def f():\n    from .sub import deep\n"
    )
    (pkg / "sub" / "deep.py").write_text("from ..top import f\n")
    for leaf in ("leaf", "hidden", "other"):
        (pkg / f"{leaf}.py").write_text("import os\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.top"] == {"pkg.leaf", "pkg.other", "pkg.sub.deep"}
    assert graph["pkg.sub"] == {"pkg.top"}
    assert graph["pkg.sub.deep"] == {"pkg.top"}
    assert graph["pkg.leaf"] == set() and graph["pkg"] == set()
    assert find_cycles(graph) == [["pkg.sub.deep", "pkg.top", "pkg.sub.deep"]]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
        # a triangle with a chord: the shortest circle through the first module
        ({"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "a"]]),
        ({"x": {"y"}, "y": {"z"}, "z": {"x"}, "p": {"q"}, "q": {"p"}},
         [["p", "q", "p"], ["x", "y", "z", "x"]]),
    ],
)  # fmt: skip
def test_find_cycles_on_constructed_graphs(graph, expected):
    assert sorted(find_cycles(graph)) == expected
