"""The shape of the code, checked: no import cycles, no imports hidden in functions, no overlong modules.

The layer order itself is import-linter's contract in pyproject.toml (run by `make lint`); these tests hold what
that contract does not: cycles between modules of one layer, and the habits that hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
LONG_MODULE = 600
# The CLI imports inside each command so that `lmforge --help` and the store commands never load torch; the
# store's writing operations import formats.folder (torch) inside, so that its reading ones (list, show) do not.
LOCAL_IMPORTS_ALLOWED = {"cli.py", "store.py"}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_between_lmforge_modules() -> None:
    graph = grimp.build_graph("lmforge")
    # A package's __init__ re-exporting its children is not a cycle of design; drop those edges.
    for module in list(graph.modules):
        for child in graph.find_children(module):
            if graph.direct_import_exists(importer=module, imported=child):
                graph.remove_import(importer=module, imported=child)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


def _local_lmforge_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] == "lmforge":
                    lines.append(inner.lineno)
                elif isinstance(inner, ast.Import) and any(
                    a.name.split(".")[0] == "lmforge" for a in inner.names
                ):
                    lines.append(inner.lineno)
    return lines


def test_lmforge_modules_import_lmforge_at_the_top() -> None:
    """A function-local import is how a cycle hides: outside the CLI, every lmforge import is at the top."""
    offenders = {
        str(path.relative_to(SRC)): lines
        for path in sorted(SRC.rglob("*.py"))
        if path.name not in LOCAL_IMPORTS_ALLOWED and (lines := _local_lmforge_imports(path))
    }
    assert offenders == {}


def test_long_modules_say_why() -> None:
    """A module past ~600 lines is probably two things; one that is not says why in its docstring."""
    unexplained = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG_MODULE:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if "Why one module" not in docstring:
                unexplained.append(str(path.relative_to(SRC)))
    assert unexplained == []
