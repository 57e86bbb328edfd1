"""The trade-off of a fine-tuning method between seen-class robustness and zero-shot accuracy: the evaluated run
beside gentler refits (measured by :func:`~vlmdefense.defenses.training_time.tga_zsr.settings_tradeoff`), as a
table of points and a scatter plot."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from vlmdefense.runs.records import Result


def run_point(result: Result) -> dict[str, float | None]:
    """The evaluated run's clean and sweep-attack accuracy (PGD-10 on the smoke profile) at the headline ε,
    per split, under the keys of ``settings_tradeoff``."""
    headline = result.parameters["headline_eps"]
    row = next(r for r in result.robust if r.attack.startswith("PGD-") and r.eps.display == headline)
    assert result.clean is not None
    return {
        "clean_seen": result.clean.seen,
        "clean_unseen": result.clean.unseen,
        "pgd10_seen": row.acc.seen,
        "pgd10_unseen": row.acc.unseen,
    }


def tradeoff_points(result: Result, refits: dict[str, dict[str, Any]], run_name: str) -> dict[str, dict[str, Any]]:
    """The refits' rows and the evaluated run's, named ``run_name``."""
    return {**refits, run_name: run_point(result)}


def plot_tradeoff(points: dict[str, dict[str, Any]], headline: str, title: str) -> Any:
    """Seen-class robust accuracy against unseen-class clean accuracy, one marker per setting."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, row in points.items():
        ax.scatter(row["pgd10_seen"], row["clean_unseen"], label=name)
    ax.set_xlabel(f"seen digits: PGD-10 accuracy at {headline} (%)")
    ax.set_ylabel("unseen digits: clean accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def tradeoff_lines(points: dict[str, dict[str, Any]]) -> str:
    """One Markdown bullet per setting with its four accuracies."""
    return "\n".join(
        f"* **{name}:** seen {row['clean_seen']} % clean / {row['pgd10_seen']} % PGD-10, "
        f"unseen {row['clean_unseen']} % clean / {row['pgd10_unseen']} % PGD-10"
        for name, row in points.items()
    )
