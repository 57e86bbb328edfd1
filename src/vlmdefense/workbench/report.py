"""Tables and plots of result records, for notebooks and the site."""

from __future__ import annotations

from typing import Any

from vlmdefense.runs.records import Result, RobustEntry
from vlmdefense.workbench.audit_report import audit_table, lowered_note

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
    eps = result.headline.eps.display
    rows = ["| | clean | robust (non-adaptive) | robust (adaptive) |", "| --- | --- | --- | --- |"]
    for label, record in (("baseline (undefended)", baseline), (result.method, result)):
        if record is None or record.headline is None:
            rows.append(f"| {label} | no result | | |")
            continue
        h = record.headline
        rows.append(f"| {label} | {_fmt(h.clean)} | {_fmt(h.robust)} | {_fmt(h.robust_adaptive)} |")
    return f"At the headline ε = {eps} (worst case over the profile's attacks):\n\n" + "\n".join(rows)


def reported_table(result: Result) -> str:
    """Markdown: the paper's own numbers from the catalog, with their setting."""
    if not result.reported:
        return "The catalog holds no reported numbers for this method."
    rows = ["| model | dataset | attack | ε | clean | robust | source |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.reported:
        rows.append(
            f"| {r.model} | {r.dataset} | {r.attack} | {r.eps.display} | {_fmt(r.clean)} | "
            f"{_fmt(r.robust)} | {r.source} |"
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
    return result.robust_at(result.headline.eps.value)


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
    note = lowered_note(result)
    display(Markdown("### Evaluation checks\n\n" + audit_table(result) + (f"\n\n{note}" if note else "")))


def headline_numbers(result: Result | None) -> tuple[float | None, float | None, float | None]:
    """(clean, robust non-adaptive, robust adaptive) at the result's headline ε; ``None`` where absent."""
    if result is None or result.headline is None:
        return None, None, None
    h = result.headline
    return h.clean, h.robust, h.robust_adaptive


def robust_gain(result: Result, baseline: Result | None) -> float | None:
    """Headline robust accuracy (the lower of non-adaptive and adaptive) minus the baseline's, in points."""
    _, robust, adaptive = headline_numbers(result)
    _, base, _ = headline_numbers(baseline)
    values = [v for v in (robust, adaptive) if v is not None]
    if not values or base is None:
        return None
    return min(values) - base


def _split_at_headline(result: Result, split: str, adaptive: bool | None = False) -> float | None:
    """Worst robust accuracy of one split at the headline ε."""
    values = [getattr(r.acc, split) for r in headline_entries(result) if adaptive is None or r.adaptive == adaptive]
    values = [v for v in values if v is not None]
    return min(values) if values else None


GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _group_colours(labels: list[str], groups: dict[str, str] | None) -> dict[str, str]:
    names = list(dict.fromkeys((groups or {}).get(label, "") for label in labels))
    palette = {name: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, name in enumerate(names)}
    return {label: palette[(groups or {}).get(label, "")] for label in labels}


def plot_gain_vs_cost(results: dict[str, Result], baseline: Result | None, groups: dict[str, str] | None = None) -> Any:
    """Robustness gain over the baseline at the headline ε against training seconds and against image-tower
    passes per test image (two panels), one point per result, coloured by ``groups`` (label → group)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    points = {
        label: (r.cost, robust_gain(r, baseline))
        for label, r in results.items()
        if r.cost is not None and robust_gain(r, baseline) is not None
    }
    colours = _group_colours(list(points), groups)
    for label, (cost, delta) in points.items():
        passes = cost.forward_passes + cost.backward_passes
        for ax, x in ((axes[0], cost.train_seconds), (axes[1], passes)):
            ax.scatter([x], [delta], color=colours[label], s=40, zorder=3)
            ax.annotate(label, (x, delta), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes[0].set_xscale("symlog", linthresh=1.0)
    axes[0].set_xlim(left=0)
    axes[0].set_xlabel("training time (s, symlog)")
    axes[1].set_xlabel("image-tower passes per test image (forward + backward)")
    axes[0].set_ylabel("robust accuracy gain over undefended (points)")
    for ax in axes:
        ax.axhline(0, color="#888", linewidth=1)
        ax.grid(alpha=0.3)
    seen_groups = {(groups or {}).get(label, ""): colours[label] for label in points}
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=colour, label=name)
        for name, colour in seen_groups.items()
        if name
    ]
    if handles:
        axes[1].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    return fig


def plot_seen_unseen(results: dict[str, Result], baseline: Result | None = None) -> Any:
    """Accuracy on seen against unseen classes, clean and robust at the headline ε (two panels), with the
    diagonal: points below it lose accuracy on classes they were not fitted on."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    entries = dict(results)
    if baseline is not None:
        entries = {"baseline (undefended)": baseline, **entries}
    for ax, kind in zip(axes, ("clean", "robust"), strict=True):
        for label, result in entries.items():
            if kind == "clean":
                if result.clean is None:
                    continue
                seen, unseen = result.clean.seen, result.clean.unseen
            else:
                seen, unseen = _split_at_headline(result, "seen"), _split_at_headline(result, "unseen")
            if seen is None or unseen is None:
                continue
            is_base = result is baseline
            ax.scatter([seen], [unseen], marker="x" if is_base else "o", color="#555" if is_base else None, zorder=3)
            ax.annotate(label, (seen, unseen), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.plot([0, 100], [0, 100], linestyle="--", color="#888", linewidth=1)
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("accuracy on seen classes (%)")
        ax.set_ylabel("accuracy on unseen classes (%)")
        eps = ""
        if kind == "robust":
            first = next((r for r in entries.values() if r.headline), None)
            eps = f" at ε = {first.headline.eps.display}" if first and first.headline else ""
        ax.set_title(f"{kind}{eps}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_adaptive_gap(results: dict[str, Result], baseline: Result | None = None) -> Any:
    """Clean, non-adaptive robust and adaptive robust accuracy at the headline ε, grouped bars per result;
    a missing adaptive number is marked ``n/a``."""
    import matplotlib.pyplot as plt

    entries = dict(results)
    if baseline is not None:
        entries = {"baseline": baseline, **entries}
    labels = list(entries)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4))
    width = 0.27
    series = (("clean", 0, "#9ecae1"), ("non-adaptive", 1, "#3182bd"), ("adaptive", 2, "#e6550d"))
    for name, index, colour in series:
        xs, ys = [], []
        for i, label in enumerate(labels):
            value = headline_numbers(entries[label])[index]
            x = i + (index - 1) * width
            if value is None:
                if index == 2:
                    ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="#888")
                continue
            xs.append(x)
            ys.append(value)
        ax.bar(xs, ys, width=width, color=colour, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy at the headline ε (%)")
    ax.set_ylim(0, 102)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep_by_method(results: dict[str, Result], split: str = "all", title: str | None = None) -> Any:
    """Like :func:`plot_sweep`, but one colour per result: its adaptive curve is the same colour, dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, (label, result) in enumerate(results.items()):
        colour = f"C{index % 10}"
        for adaptive in sorted({r.adaptive for r in result.robust}) or [False]:
            points = sweep(result, adaptive, split)
            if not points:
                continue
            ax.plot(
                [p[0] * 255 for p in points],
                [p[1] for p in points],
                marker="o",
                color=colour,
                linestyle="--" if adaptive else "-",
                label=label + (" (adaptive)" if adaptive else ""),
            )
    ax.set_xlabel("ε (×1/255, L∞)")
    ax.set_ylabel(f"accuracy, {split} (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
