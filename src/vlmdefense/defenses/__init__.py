"""Defenses behind one interface (:class:`~vlmdefense.defenses.base.Defense`); the id is the catalog id."""
