"""The registry of defenses: one module per method, mirroring the catalog and the notebooks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from vlmdefense.catalog.schema import ReproductionStatus
from vlmdefense.catalog.validation import load_catalog
from vlmdefense.defenses import create_defense, list_defenses
from vlmdefense.defenses.base import Defense
from vlmdefense.defenses.baseline import Undefended
from vlmdefense.defenses.registry import defense_class

DEFENSES_DIR = REPO / "src" / "vlmdefense" / "defenses"


def _reproduced() -> dict[str, str]:
    """Catalog id → paradigm of the entries with a reproduction (reproduced or partial)."""
    catalog, _ = load_catalog(REPO / "catalog")
    assert catalog is not None
    done = {ReproductionStatus.REPRODUCED, ReproductionStatus.PARTIAL}
    return {
        item.entry.id: item.entry.paradigm.value
        for item in catalog.items.values()
        if item.entry.reproduction.status in done
    }


def test_registry_equals_the_reproduced_catalog_entries_and_the_notebooks() -> None:
    ids = list_defenses()
    assert ids == sorted(ids) and "baseline" in ids
    assert set(ids) == set(_reproduced()) | {"baseline"}
    notebooks = {p.stem for p in (REPO / "notebooks").glob("*.ipynb") if p.stem != "_template"}
    assert set(ids) == notebooks


def test_each_method_lives_in_its_paradigm_module() -> None:
    for defense_id, paradigm in _reproduced().items():
        cls = defense_class(defense_id)
        expected = DEFENSES_DIR / paradigm.replace("-", "_") / f"{defense_id.replace('-', '_')}.py"
        module = __import__(cls.__module__, fromlist=["__file__"])
        assert module.__file__ is not None and Path(module.__file__).resolve() == expected.resolve(), defense_id
        assert cls.id == defense_id and issubclass(cls, Defense)
    assert defense_class("baseline") is Undefended


@pytest.mark.parametrize("defense_id", ["baseline", "tecoa", "pmg-aft", "ttc", "r-tpt"])
def test_create_defense_configures_from_params(defense_id: str) -> None:
    defense = create_defense(defense_id, fast=True, seed=3, unrelated="ignored")
    assert isinstance(defense, defense_class(defense_id)) and defense.id == defense_id


def test_create_defense_passes_the_parameters() -> None:
    tecoa = create_defense("tecoa", fast=True, epochs=3)
    assert tecoa.config.epochs == 3 and tecoa.config.train_limit == 128  # type: ignore[attr-defined]


def test_unknown_id_names_the_known_ids_and_the_closest() -> None:
    with pytest.raises(ValueError) as error:
        create_defense("tecao")
    message = str(error.value)
    assert "'tecao'" in message and "did you mean 'tecoa'" in message
    assert all(defense_id in message for defense_id in list_defenses())
    with pytest.raises(ValueError, match=f"known: {list_defenses()[0]}, "):
        defense_class("nothing-like-it")


def test_no_defense_module_imports_the_harness() -> None:
    for path in DEFENSES_DIR.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "workbench.context" not in text and "workbench.harness" not in text, path


@pytest.mark.parametrize("defense_id", list_defenses())
def test_no_config_field_is_taken_from_the_profiles_evaluation_settings(defense_id: str) -> None:
    """A defense is configured from the merged profile parameters by field name, so a field named like a
    profile key (``batch_size``: the evaluation batch) would silently take the evaluation's value; only the
    shared ``seed`` may coincide. (The pre-training batch once took the evaluation's 360 this way.)"""
    profiles = yaml.safe_load((REPO / "reproductions" / "profiles.yaml").read_text())
    profile_keys = {key for profile in profiles.values() for key in profile if key != "methods"}
    config_class = getattr(defense_class(defense_id), "config_class", None)
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return
    fields = {field.name for field in dataclasses.fields(config_class)}
    assert fields & profile_keys <= {"seed"}
