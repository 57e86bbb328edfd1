"""The library code a reproduction depends on: the ``vlmdefense`` modules its notebook imports, transitively,
and its defense's own module, hashed so that a change to any of them makes the result stale.

Imports are read statically (``ast``), nothing is imported: ``vlmdefense status`` stays fast and never loads
torch. Imports inside functions count as well, since they run when the notebook calls the function.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import nbformat

import vlmdefense

PACKAGE = "vlmdefense"
PACKAGE_DIR = Path(vlmdefense.__file__).resolve().parent
#: Data files of the package that the workbench reads (prompt templates, the small CLIP's config).
DATA_GLOBS = ("data/*", "model_configs/*")


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of module ``name`` (``vlmdefense.x.y``) under ``package_dir``, if it exists."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``vlmdefense.x.y`` for ``package_dir/x/y.py`` (or ``.../y/__init__.py``)."""
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def imported_names(source: str, current: str = "", is_package: bool = False) -> set[str]:
    """Every module name an import statement of ``source`` may load (``from a import b`` gives ``a`` and
    ``a.b``, since ``b`` may be a submodule); relative imports are resolved against module ``current``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = current.split(".") if is_package else current.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(roots: Iterable[str], package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The source files of ``roots`` and of every ``vlmdefense`` module they import, transitively (the
    packages' ``__init__`` files included, as Python runs them)."""
    seen: dict[Path, None] = {}
    todo = [n for root in roots for n in _with_parents(root)]
    while todo:
        name = todo.pop()
        path = module_file(name, package_dir)
        if path is None or path in seen:
            continue
        seen[path] = None
        current = module_name(path, package_dir)
        found = imported_names(path.read_text(encoding="utf-8"), current, path.name == "__init__.py")
        todo.extend(n for imported in found for n in _with_parents(imported))
    return sorted(seen)


def notebook_imports(notebook: Path) -> set[str]:
    """The ``vlmdefense`` modules the code cells of ``notebook`` import."""
    nb = nbformat.read(str(notebook), as_version=4)
    names: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            names |= imported_names(cell.source)
        except SyntaxError:  # IPython magics: such a cell imports nothing we can see
            continue
    return names


def defense_module(method: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """``defenses/<paradigm>/<id>.py`` of a method (ids use ``-``, module names ``_``); the registry finds
    defenses at run time, so the import graph alone does not name it."""
    stem = method.replace("-", "_")
    found = sorted((package_dir / "defenses").glob(f"*/{stem}.py")) + sorted(
        (package_dir / "defenses").glob(f"{stem}.py")
    )
    return found[0] if found else None


def dependency_files(notebook: Path, method: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every library file a run of ``notebook`` for ``method`` depends on, sorted."""
    roots = set(notebook_imports(notebook))
    own = defense_module(method, package_dir)
    if own is not None:
        roots.add(module_name(own, package_dir))
    files = set(closure(roots, package_dir))
    for pattern in DATA_GLOBS:
        files.update(p for p in package_dir.glob(pattern) if p.is_file())
    return sorted(files)


def library_digest(notebook: Path, method: str, package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the relative paths and contents of :func:`dependency_files`."""
    entries = [
        (str(p.relative_to(package_dir)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in dependency_files(notebook, method, package_dir)
    ]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
