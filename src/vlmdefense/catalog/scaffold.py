"""Scaffolding of new catalog entries (``vlmdefense new``)."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from vlmdefense.catalog.schema import ID_PATTERN, Paradigm
from vlmdefense.catalog.validation import load_taxonomy


class ScaffoldError(Exception):
    """A new entry cannot be created (bad id, unknown family, id taken)."""


def entry_template(method_id: str, paradigm: Paradigm, family: str) -> str:
    """The commented YAML of a new entry, with TODO placeholders."""
    text = files("vlmdefense").joinpath("templates/entry.yaml").read_text(encoding="utf-8")
    return text.format(id=method_id, name=method_id, paradigm=paradigm.value, family=family)


def new_notebook(root: Path, method_id: str, name: str | None = None) -> Path:
    """Write ``notebooks/<method_id>.ipynb`` from ``notebooks/_template.ipynb``.

    Raises:
        ScaffoldError: the template is missing or the notebook exists already.
    """
    template = Path(root) / "notebooks" / "_template.ipynb"
    target = Path(root) / "notebooks" / f"{method_id}.ipynb"
    if not template.is_file():
        raise ScaffoldError(f"notebook template {template} not found")
    if target.exists():
        raise ScaffoldError(f"notebook {target} exists already")
    text = template.read_text(encoding="utf-8")
    text = text.replace("METHOD_ID", method_id).replace("METHOD_NAME", name or method_id)
    with target.open("x", encoding="utf-8") as handle:
        handle.write(text)
    return target


def new_entry(catalog_root: Path, method_id: str, paradigm: str, family: str) -> Path:
    """Write ``catalog_root/<paradigm>/<method_id>.yaml`` from the template.

    Raises:
        ScaffoldError: the id is malformed or taken, or the family is not of the paradigm.
    """
    if not re.match(ID_PATTERN, method_id):
        raise ScaffoldError(f"invalid id {method_id!r}: use lowercase letters, digits and '-'")
    try:
        kind = Paradigm(paradigm)
    except ValueError:
        choices = ", ".join(p.value for p in Paradigm)
        raise ScaffoldError(f"unknown paradigm {paradigm!r} (one of: {choices})") from None
    families = load_taxonomy(catalog_root).families_of(kind)
    if family not in families:
        raise ScaffoldError(f"unknown family {family!r} for {kind.value} (one of: {', '.join(families)})")
    taken = sorted(catalog_root.glob(f"*/{method_id}.yaml"))
    if taken:
        raise ScaffoldError(f"id {method_id!r} exists already: {taken[0]}")
    target = catalog_root / kind.value / f"{method_id}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("x", encoding="utf-8") as handle:
        handle.write(entry_template(method_id, kind, family))
    return target
