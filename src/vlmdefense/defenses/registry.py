"""The defenses by catalog id, discovered from the modules of the paradigm subpackages.

A method lives in ``defenses/<paradigm>/<id>.py`` (underscores for hyphens), mirroring
``catalog/<paradigm>/<id>.yaml`` and ``notebooks/<id>.ipynb``: every :class:`~vlmdefense.defenses.base.Defense`
subclass that sets its own ``id`` in a module of a paradigm subpackage is registered, so adding a method
touches that one file. The undefended model (``baseline``) is registered from ``defenses/baseline.py``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from functools import cache
from types import ModuleType
from typing import Any

from vlmdefense.defenses.base import Defense
from vlmdefense.defenses.baseline import Undefended

PACKAGE = "vlmdefense.defenses"


def paradigm_packages() -> list[str]:
    """The paradigm subpackages of ``vlmdefense.defenses`` (``training_time`` …), by module name."""
    package = importlib.import_module(PACKAGE)
    return sorted(f"{PACKAGE}.{info.name}" for info in pkgutil.iter_modules(package.__path__) if info.ispkg)


def _defined_defenses(module: ModuleType) -> list[type[Defense]]:
    """The Defense subclasses that ``module`` defines and gives an ``id`` of their own."""
    return [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Defense) and obj.__module__ == module.__name__ and "id" in vars(obj)
    ]


@cache
def _registry() -> dict[str, type[Defense]]:
    found: dict[str, type[Defense]] = {Undefended.id: Undefended}
    for name in paradigm_packages():
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            for cls in _defined_defenses(importlib.import_module(info.name)):
                if cls.id in found and found[cls.id] is not cls:
                    other = found[cls.id]
                    raise RuntimeError(
                        f"defense id {cls.id!r} defined twice: {other.__module__}.{other.__name__} "
                        f"and {cls.__module__}.{cls.__name__}"
                    )
                found[cls.id] = cls
    return found


def list_defenses() -> list[str]:
    """The registered ids, sorted (``baseline`` included)."""
    return sorted(_registry())


def defense_class(defense_id: str) -> type[Defense]:
    """The class of ``defense_id``.

    Raises:
        ValueError: unknown id (the message lists the known ids and suggests the closest).
    """
    registry = _registry()
    if defense_id not in registry:
        close = difflib.get_close_matches(defense_id, list(registry), n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown defense {defense_id!r}{hint} (known: {', '.join(sorted(registry))})")
    return registry[defense_id]


def create_defense(defense_id: str, **params: Any) -> Defense:
    """The defense of ``defense_id`` configured by ``params`` (a profile's parameters: paper defaults,
    shrunk when ``fast``, overridden by keys of the same names), not yet fitted.

    Raises:
        ValueError: unknown id.
    """
    return defense_class(defense_id).from_params(params)
