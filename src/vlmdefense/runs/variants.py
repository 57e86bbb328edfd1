"""Variants: runs with overrides, recorded beside the canonical record and never over it.

A run of ``vlmdefense run ID -p KEY=VALUE`` is an experiment, not the reproduction the site shows. It lands
in ``reproductions/<id>/<profile>/variants/<slug>/`` with its own executed notebook and ``result.json``, and
a ``variant.json`` that keeps the overrides it ran with (so that its staleness can be computed again). The
slug is a readable, filesystem-safe rendering of the sorted overrides plus a short hash of them
(``epochs=5-3f2a1c``), so the same overrides always land in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmdefense.fileio import atomic_write_json
from vlmdefense.runs.records import RESULT_FILE

REPRODUCTIONS = "reproductions"
VARIANTS = "variants"
VARIANT_FILE = "variant.json"
#: Longest readable part of a slug (the hash keeps longer ones apart).
SLUG_TEXT = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")


def flatten(overrides: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of ``overrides``, sorted by key (``model.name``)."""
    items: list[tuple[str, Any]] = []
    for key in sorted(overrides):
        value = overrides[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += flatten(value, f"{name}.")
        else:
            items.append((name, value))
    return items


def _text(value: Any) -> str:
    """A value as a command line would write it (``5``, ``4/255``, ``[4/255, 8/255]``, ``null``)."""
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def overrides_hash(overrides: dict[str, Any]) -> str:
    """Six hex digits of the overrides' canonical JSON."""
    return hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]


def variant_slug(overrides: dict[str, Any]) -> str:
    """``key=value,key=value-<hash>``: the sorted overrides, made filesystem-safe, plus a short hash.

    Raises:
        ValueError: no overrides (a run without overrides is the canonical one).
    """
    if not overrides:
        raise ValueError("a variant needs at least one override")
    parts = []
    for key, value in flatten(overrides):
        shown = "+".join(_text(v) for v in value) if isinstance(value, list) else _text(value)
        parts.append(f"{key}={shown}")
    text = _UNSAFE.sub("_", ",".join(parts).replace("/", "_")).strip("._-")[:SLUG_TEXT].rstrip("._-")
    return f"{text}-{overrides_hash(overrides)}"


def override_args(overrides: dict[str, Any]) -> str:
    """The overrides as ``-p KEY=VALUE`` options (for the command recorded in provenance)."""
    return " ".join(f"-p {key}={_text(value)}" for key, value in flatten(overrides))


def canonical_dir(root: Path, method: str, profile: str) -> Path:
    """``reproductions/<method>/<profile>/``: the record the site shows."""
    return Path(root) / REPRODUCTIONS / method / profile


def variant_dir(root: Path, method: str, profile: str, overrides: dict[str, Any]) -> Path:
    """``reproductions/<method>/<profile>/variants/<slug>/``."""
    return canonical_dir(root, method, profile) / VARIANTS / variant_slug(overrides)


def record_dir(
    root: Path, method: str, profile: str, overrides: dict[str, Any] | None = None, canonical: bool = False
) -> Path:
    """Where a run writes: the canonical folder without overrides (or when ``canonical`` is asked for),
    its variant's folder otherwise."""
    if canonical or not overrides:
        return canonical_dir(root, method, profile)
    return variant_dir(root, method, profile, overrides)


@dataclass(frozen=True)
class Variant:
    """One variant folder: whose it is and the overrides it ran with."""

    method: str
    profile: str
    slug: str
    overrides: dict[str, Any]
    folder: Path

    @property
    def result_file(self) -> Path:
        """Its ``result.json``."""
        return self.folder / RESULT_FILE


def write_variant_file(folder: Path, method: str, profile: str, overrides: dict[str, Any]) -> None:
    """Record the overrides of a variant in its folder (``variant.json``), atomically."""
    atomic_write_json(
        Path(folder) / VARIANT_FILE,
        {"method": method, "profile": profile, "overrides": overrides, "slug": Path(folder).name},
    )


def read_variant(folder: Path) -> Variant | None:
    """The variant recorded in ``folder`` (``None`` when its ``variant.json`` is missing or unreadable)."""
    folder = Path(folder)
    try:
        data = json.loads((folder / VARIANT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("overrides"), dict):
        return None
    method, profile = folder.parent.parent.parent.name, folder.parent.parent.name
    return Variant(method, profile, folder.name, data["overrides"], folder)


def variant_folders(root: Path) -> list[Path]:
    """Every ``reproductions/<method>/<profile>/variants/<slug>/`` folder, sorted."""
    return sorted(p for p in (Path(root) / REPRODUCTIONS).glob(f"*/*/{VARIANTS}/*") if p.is_dir())


def variant_result_files(root: Path) -> list[Path]:
    """Every variant's ``result.json``."""
    return sorted((Path(root) / REPRODUCTIONS).glob(f"*/*/{VARIANTS}/*/{RESULT_FILE}"))


def is_variant_result(path: Path) -> bool:
    """Whether ``path`` is a variant's ``result.json`` (``.../<method>/<profile>/variants/<slug>/result.json``)."""
    parts = Path(path).parts
    return len(parts) >= 5 and parts[-3] == VARIANTS and parts[-1] == RESULT_FILE
