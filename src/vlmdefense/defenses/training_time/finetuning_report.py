"""Notebook helpers of the training-time defenses: the seen/unseen/transfer table and the training curve."""

from __future__ import annotations

from typing import Any


def seen_unseen_table(result: Any, baseline: Any | None = None) -> str:
    """Markdown: clean and worst-case robust accuracy at the headline ε on seen, unseen and transfer
    images, for the defense and the baseline (the generalisation question of adversarial fine-tuning)."""
    rows = [
        "| model | clean seen | clean unseen | clean transfer | robust seen | robust unseen | robust transfer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    for label, record in (("baseline (undefended)", baseline), (getattr(result, "method", "defense"), result)):
        if record is None or record.headline is None or record.clean is None:
            continue
        entries = [r for r in record.robust_at(record.headline.eps.value) if not r.adaptive]

        def worst(split: str, entries: list[Any] = entries) -> float | None:
            values = [getattr(r.acc, split) for r in entries if getattr(r.acc, split) is not None]
            return min(values) if values else None

        c = record.clean
        rows.append(
            f"| {label} | {fmt(c.seen)} | {fmt(c.unseen)} | {fmt(c.transfer)} | {fmt(worst('seen'))} | "
            f"{fmt(worst('unseen'))} | {fmt(worst('transfer'))} |"
        )
    eps = result.headline.eps.display if result.headline else "?"
    return f"Robust: worst case over the profile's attacks at ε = {eps}.\n\n" + "\n".join(rows)


def plot_training(history: list[dict[str, float]], title: str = "") -> Any:
    """Training loss (and its components) and the adversarial accuracy on training batches, per epoch."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    epochs = [h["epoch"] for h in history]
    for key in history[0] if history else []:
        if key in {"epoch", "train_adv_acc"}:
            continue
        axes[0].plot(epochs, [h[key] for h in history], marker=".", label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("mean over the epoch")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].plot(epochs, [h.get("train_adv_acc") for h in history], marker=".")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("accuracy on PGD training images (%)")
    axes[1].set_ylim(-2, 102)
    axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
