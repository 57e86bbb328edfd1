"""Reproduction profiles (``reproductions/profiles.yaml``), method overrides and ``-p KEY=VALUE``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vlmdefense.catalog.yaml_source import load_yaml_mapping
from vlmdefense.problems import Problem, ProblemsError, display_path

PROFILES_FILE = Path("reproductions") / "profiles.yaml"


def load_profiles(root: Path) -> dict[str, dict[str, Any]]:
    """All profiles of ``root/reproductions/profiles.yaml``, with ``extends`` resolved: a profile inherits
    its parent's keys (nested mappings merge), except ``methods``, which a profile that names it replaces
    (per-method budgets belong to one profile).

    Raises:
        ProblemsError: the file is missing, invalid, or a profile extends an unknown one.
    """
    path = Path(root) / PROFILES_FILE
    if not path.is_file():
        raise ProblemsError([_problem(path, 1, "-", "profiles file not found")])
    doc = load_yaml_mapping(path)
    raw = doc.data
    resolved: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise ProblemsError([doc.problem((name,), "a profile must be a mapping")])
        parent = body.get("extends")
        if parent is not None and parent not in raw:
            raise ProblemsError([doc.problem((name, "extends"), f"unknown profile {parent!r}")])
        base = copy.deepcopy(raw[parent]) if parent else {}
        if "methods" in body:
            base.pop("methods", None)
        merged = deep_merge(base, {k: v for k, v in body.items() if k != "extends"})
        merged["name"] = name
        resolved[name] = merged
    return resolved


def _problem(path: Path, line: int, field: str, message: str) -> Problem:

    return Problem(display_path(path), line, field, message)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; nested mappings merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: Profile sections that configure how runs are executed rather than what a notebook computes.
NOT_PARAMETERS = ("methods", "executor", "shards")


def is_suite_profile(body: dict[str, Any]) -> bool:
    """A profile with a zero-shot ``suite`` evaluates checkpoints (``vlmdefense evaluate``), not notebooks."""
    return isinstance(body.get("suite"), dict)


def notebook_profiles(root: Path) -> dict[str, dict[str, Any]]:
    """The profiles reproduction notebooks run under: all but the zero-shot suites."""
    return {name: body for name, body in load_profiles(root).items() if not is_suite_profile(body)}


def method_parameters(profile: dict[str, Any], method: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters a method's notebook runs with: profile, then ``methods.<method>``, then overrides
    (the profile's ``executor`` section says where jobs run, not what they compute: it is left out)."""
    params = {k: v for k, v in profile.items() if k not in NOT_PARAMETERS}
    params = deep_merge(params, (profile.get("methods") or {}).get(method, {}))
    return deep_merge(params, overrides or {})


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a YAML value (``n_test=40``, ``eps=[8/255]``, ``pretrained=/x.pt``).

    Raises:
        ValueError: no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not KEY=VALUE")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if "." in key:  # model.pretrained=... → nested
        head, *rest = key.split(".")
        nested: Any = parsed
        for part in reversed(rest):
            nested = {part: nested}
        return head, nested
    return key, parsed


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Several ``KEY=VALUE`` items merged into one mapping; ``pretrained=`` sets ``model.pretrained``."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        if key == "pretrained":
            key, value = "model", {"pretrained": value}
        out = deep_merge(out, {key: value})
    return out
