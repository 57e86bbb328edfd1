"""Defenses behind one interface (:class:`~vlmdefense.defenses.base.Defense`); the id is the catalog id.

One module per method, ``defenses/<paradigm>/<id>.py``, with the mechanisms several methods share beside
them; :func:`create_defense` builds a defense by id and :func:`list_defenses` lists the ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmdefense.defenses.base import Defense

__all__ = ["create_defense", "list_defenses"]


def list_defenses() -> list[str]:
    """The registered ids, sorted (``baseline`` included); see :mod:`vlmdefense.defenses.registry`."""
    from vlmdefense.defenses.registry import list_defenses as registered

    return registered()


def create_defense(defense_id: str, **params: Any) -> Defense:
    """The defense of ``defense_id`` configured by ``params``; see :mod:`vlmdefense.defenses.registry`.

    Raises:
        ValueError: unknown id.
    """
    from vlmdefense.defenses.registry import create_defense as create

    return create(defense_id, **params)
