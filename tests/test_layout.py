"""The shape of the library: no import cycle between its modules (type-only imports count too), and no
module longer than the project's limit."""

from __future__ import annotations

import ast
import re

from conftest import REPO
from vlmdefense.runs.code_digest import PACKAGE_DIR, module_file, module_name

MAX_LINES = 450


def _targets(node: ast.ImportFrom | ast.Import, current: str, is_package: bool) -> set[str]:
    """The modules an import statement names (``from a import b`` is ``a.b`` when ``b`` is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        anchor = current.split(".") if is_package else current.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
        base = ".".join([*anchor, base] if base else anchor)
    found = {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}") is not None}
    return found if len(found) == len(node.names) else found | {base}


def import_graph() -> dict[str, set[str]]:
    """Module → the library modules it imports (anywhere in the file, ``TYPE_CHECKING`` blocks included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name = module_name(path)
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _targets(node, name, path.name == "__init__.py")
        graph[name] = {e for e in edges if e != name and module_file(e) is not None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_library() -> None:
    graph = import_graph()
    assert graph.get("vlmdefense.workbench.harness")
    assert cycles(graph) == [], "modules that import each other (directly or through others)"


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        str(p.relative_to(PACKAGE_DIR)): n
        for p in PACKAGE_DIR.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these by job (limit {MAX_LINES} lines)"


def test_every_module_says_what_it_is_for() -> None:
    missing = [
        str(p.relative_to(PACKAGE_DIR))
        for p in PACKAGE_DIR.rglob("*.py")
        if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
    ]
    assert missing == []


def test_every_source_path_a_notebook_names_exists() -> None:
    named = set()
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        named |= {(notebook.name, path) for path in re.findall(r"src/vlmdefense/[\w/]+\.py", notebook.read_text())}
    assert named, "the notebooks name the modules they reproduce"
    missing = sorted((name, path) for name, path in named if not (REPO / path).is_file())
    assert not missing, f"notebooks name modules that do not exist: {missing}"
