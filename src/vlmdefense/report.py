"""Tables and plots of result records, for notebooks and the site."""

from __future__ import annotations

from typing import Any

from vlmdefense.results import Result, RobustEntry

SPLITS = ("all", "seen", "unseen", "transfer")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def accuracy_table(result: Result) -> str:
    """Markdown: clean and every robust setting, per split."""
    lines = [
        "| setting | attack | adaptive | all | seen | unseen | transfer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    if result.clean is not None:
        c = result.clean
        lines.append(f"| clean | – | – | {_fmt(c.all)} | {_fmt(c.seen)} | {_fmt(c.unseen)} | {_fmt(c.transfer)} |")
    for r in result.robust:
        a = r.acc
        lines.append(
            f"| ε = {r.eps.display} | {r.attack} | {'yes' if r.adaptive else 'no'} | {_fmt(a.all)} | "
            f"{_fmt(a.seen)} | {_fmt(a.unseen)} | {_fmt(a.transfer)} |"
        )
    return "\n".join(lines)


def comparison_table(result: Result, baseline: Result | None) -> str:
    """Markdown: this defense against the baseline at the headline ε (clean, non-adaptive, adaptive)."""
    if result.headline is None:
        return "No headline numbers."
    eps = result.headline["eps"]["display"]
    rows = ["| | clean | robust (non-adaptive) | robust (adaptive) |", "| --- | --- | --- | --- |"]
    for label, record in (("baseline (undefended)", baseline), (result.method, result)):
        if record is None or record.headline is None:
            rows.append(f"| {label} | no result | | |")
            continue
        h = record.headline
        rows.append(f"| {label} | {_fmt(h['clean'])} | {_fmt(h['robust'])} | {_fmt(h.get('robust_adaptive'))} |")
    return f"At the headline ε = {eps} (worst case over the profile's attacks):\n\n" + "\n".join(rows)


def reported_table(result: Result) -> str:
    """Markdown: the paper's own numbers from the catalog, with their setting."""
    if not result.reported:
        return "The catalog holds no reported numbers for this method."
    rows = ["| model | dataset | attack | ε | clean | robust | source |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.reported:
        rows.append(
            f"| {r['model']} | {r['dataset']} | {r['attack']} | {r['eps']['display']} | {_fmt(r.get('clean'))} | "
            f"{_fmt(r.get('robust'))} | {r['source']} |"
        )
    return "\n".join(rows)


def sweep(result: Result, adaptive: bool | None = None, split: str = "all") -> list[tuple[float, float]]:
    """(ε, robust accuracy) points of the ε sweep (the sweep attack only), with ε = 0 as clean."""
    points: list[tuple[float, float]] = []
    if result.clean is not None and getattr(result.clean, split) is not None:
        points.append((0.0, getattr(result.clean, split)))
    for r in result.robust:
        if r.attack.startswith("worst("):
            continue
        if adaptive is not None and r.adaptive != adaptive:
            continue
        value = getattr(r.acc, split)
        if value is not None:
            points.append((r.eps.value, value))
    return sorted(points)


def plot_sweep(results: dict[str, Result], split: str = "all", ax: Any = None) -> Any:
    """Robust accuracy against ε for several results (adaptive attacks dashed). Returns the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
    else:
        fig = ax.figure
    for label, result in results.items():
        kinds = sorted({r.adaptive for r in result.robust})
        for adaptive in kinds or [False]:
            points = sweep(result, adaptive, split)
            if not points:
                continue
            xs = [p[0] * 255 for p in points]
            ys = [p[1] for p in points]
            name = label + (" (adaptive)" if adaptive else "")
            ax.plot(xs, ys, marker="o", linestyle="--" if adaptive else "-", label=name)
    ax.set_xlabel("ε (×1/255, L∞)")
    ax.set_ylabel(f"accuracy, {split} (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_splits(result: Result, ax: Any = None) -> Any:
    """Accuracy against ε for each split (all / seen / unseen / transfer) of one result."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
    else:
        fig = ax.figure
    adaptive = any(r.adaptive for r in result.robust) or None
    for split in SPLITS:
        points = sweep(result, adaptive if adaptive else False, split)
        if points:
            ax.plot([p[0] * 255 for p in points], [p[1] for p in points], marker="o", label=split)
    ax.set_xlabel("ε (×1/255, L∞)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="adaptive attack" if adaptive else None)
    ax.set_title(result.method)
    fig.tight_layout()
    return fig


def headline_entries(result: Result) -> list[RobustEntry]:
    """The robust entries at the headline ε."""
    if result.headline is None:
        return []
    return result.robust_at(result.headline["eps"]["value"])


def cost_table(result: Result) -> str:
    """Markdown: measured training and inference cost."""
    if result.cost is None:
        return "No cost measured."
    c = result.cost
    return "\n".join(
        [
            "| training (s) | inference (ms / image) | forward passes / image | backward passes / image |",
            "| --- | --- | --- | --- |",
            f"| {c.train_seconds:.1f} | {1000 * c.inference_seconds_per_image:.3f} | {c.forward_passes:g} | "
            f"{c.backward_passes:g} |",
        ]
    )


def display_report(result: Result, baseline: Result | None = None) -> None:
    """Show, in a notebook, every table and plot of a result beside the baseline."""
    import matplotlib.pyplot as plt
    from IPython.display import Markdown, display

    display(Markdown("### Accuracy (%) per split\n\n" + accuracy_table(result)))
    display(Markdown("### Against the baseline\n\n" + comparison_table(result, baseline)))
    display(Markdown("### The paper's reported numbers (catalog)\n\n" + reported_table(result)))
    results = {result.method: result}
    if baseline is not None and baseline.method != result.method:
        results = {"baseline": baseline, **results}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    plot_sweep(results, ax=axes[0])
    axes[0].set_title("robust accuracy vs ε (all test digits)")
    plot_splits(result, ax=axes[1])
    fig.tight_layout()
    display(fig)
    plt.close(fig)
    display(Markdown("### Cost\n\n" + cost_table(result)))
