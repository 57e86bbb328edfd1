"""Numbers for a notebook's prose, read from the result record: a Findings section is a code cell that
prints Markdown, so every number it states is the number the run produced.

Usage in a notebook::

    R, B = Numbers(result), Numbers(baseline)
    show(f"Robust accuracy at 8/255 rises from {B.robust('8/255')} to **{R.robust('8/255')}**.")
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vlmdefense.runs.records import Result, RobustEntry
from vlmdefense.units import Epsilon

WORST_PREFIX = "worst("


def pct(value: float | None, digits: int = 1) -> str:
    """``61.1 %`` (``n/a`` when there is no number)."""
    return "n/a" if value is None else f"{value:.{digits}f} %"


def num(value: float | None, digits: int = 2) -> str:
    """A plain number with ``digits`` decimals (``n/a`` when there is none)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


class Numbers:
    """Formatted look-ups into one result record (``None`` gives ``n/a`` everywhere)."""

    def __init__(self, result: Result | None, digits: int = 1) -> None:
        self.result = result
        self.digits = digits

    # ---- raw values ------------------------------------------------------------------------------

    def clean_value(self, split: str = "all") -> float | None:
        """Clean accuracy of a split (``all``, ``seen``, ``unseen``, ``transfer``)."""
        if self.result is None or self.result.clean is None:
            return None
        value: float | None = getattr(self.result.clean, split)
        return value

    def rows(self, eps: str | float, attack: str | None = None, adaptive: bool | None = False) -> list[RobustEntry]:
        """Robust rows at ``eps``: of one attack (its recorded name, e.g. ``PGD-10`` or ``PGD-10+EOT-4``),
        or of every attack when ``attack`` is ``None``; ``adaptive=None`` takes both kinds."""
        if self.result is None:
            return []
        value = eps if isinstance(eps, float) else Epsilon.parse(eps).value
        found = self.result.robust_at(value, adaptive)
        return [r for r in found if attack is None or r.attack == attack]

    def robust_value(
        self, eps: str | float, split: str = "all", attack: str | None = None, adaptive: bool | None = False
    ) -> float | None:
        """The lowest accuracy of ``split`` over the matching rows (the per-example worst case when the
        record holds a ``worst(...)`` row at ``eps``)."""
        values = [getattr(r.acc, split) for r in self.rows(eps, attack, adaptive)]
        present = [v for v in values if v is not None]
        return min(present) if present else None

    def finding(self, *path: str | int) -> Any:
        """A value of ``findings`` by its keys (``finding("ablation", "accuracy", "clean")``)."""
        node: Any = self.result.findings if self.result is not None else None
        for key in path:
            if node is None:
                return None
            node = node[int(key)] if isinstance(node, list) else node.get(key)
        return node

    # ---- formatted -------------------------------------------------------------------------------

    def clean(self, split: str = "all") -> str:
        """Clean accuracy, formatted."""
        return pct(self.clean_value(split), self.digits)

    def robust(
        self, eps: str | float, split: str = "all", attack: str | None = None, adaptive: bool | None = False
    ) -> str:
        """Robust accuracy (worst case over the matching rows), formatted."""
        return pct(self.robust_value(eps, split, attack, adaptive), self.digits)

    def sweep(self, split: str = "all", adaptive: bool = False, sep: str = " / ") -> str:
        """The sweep attack's accuracies over the profile's ε list, in order, without units."""
        if self.result is None:
            return "n/a"
        rows = [r for r in self.result.robust if r.adaptive == adaptive and not r.attack.startswith(WORST_PREFIX)]
        sweep_attack = rows[0].attack if rows else None
        values: Iterable[float | None] = (
            getattr(r.acc, split) for r in sorted(rows, key=lambda r: r.eps.value) if r.attack == sweep_attack
        )
        return sep.join(num(v, self.digits) for v in values)

    def value(self, *path: str | int, digits: int | None = None, percent: bool = False) -> str:
        """A finding, formatted as a number (with `` %`` when ``percent``)."""
        raw = self.finding(*path)
        d = self.digits if digits is None else digits
        if raw is None:
            return "n/a"
        return pct(float(raw), d) if percent else num(float(raw), d)


def show(markdown: str) -> None:
    """Display Markdown in a notebook (plain text elsewhere)."""
    from IPython.display import Markdown, display

    display(Markdown(markdown))
