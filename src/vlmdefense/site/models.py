"""The models page: the card of the small diffusion prior (recipe, seed, loss curve, test denoising error,
sha256, sample grid), taken from what the reproductions recorded — the site never trains a model.

Where each part comes from, in order (a clean clone in CI has the first two, never a cache):

1. the card fields from the result records of every method that used the prior (``findings.prior_card``, or
   the shorter ``findings.prior`` summary every diffusion purifier records), merged per recipe key;
2. the sample grid from an executed notebook of such a record, the image output of its cell tagged
   ``prior-sample-grid``; the loss curve is drawn from the record's card;
3. only for what neither holds: the local cache of the prior (``<cache>/models/vlmd-small-ddpm-<key>/``),
   and only when its card's sha256 is the one the record names.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmdefense.catalog.schema import Entry
from vlmdefense.site.data import SiteData
from vlmdefense.site.render import Writer, render

MODELS_PAGE = "models.md"
SMALL_PRIOR = "vlmd-small-ddpm"  # the model name the small prior's card carries
GRID_TAG = "prior-sample-grid"
FINDING_KEYS = ("prior_card", "prior")


@dataclass
class PriorCard:
    """One small prior (one recipe key) as the page shows it.

    Attributes:
        key: the recipe key; card: its fields, merged from the records (and the cache, when it matches).
        used_by: (entry, profile) of every record that used it.
        sources: where the card, grid and curve came from, as the page states it.
        grid, curve: the page's image paths (empty: not available).
    """

    key: str
    card: dict[str, Any] = field(default_factory=dict)
    used_by: list[tuple[Entry, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    grid: str = ""
    curve: str = ""


def prior_anchor(key: str) -> str:
    """The anchor of a prior's section on the models page."""
    return f"prior-{key}"


def recorded_cards(findings: dict[str, Any]) -> list[dict[str, Any]]:
    """The small prior's card dictionaries a record's findings hold (richest first)."""
    found = [findings.get(k) for k in FINDING_KEYS]
    cards = [c for c in found if isinstance(c, dict) and c.get("model") == SMALL_PRIOR and c.get("recipe_key")]
    return sorted(cards, key=len, reverse=True)


def priors_used(data: SiteData, method: str) -> list[str]:
    """The recipe keys of the small priors ``method``'s successful records used."""
    keys: list[str] = []
    for profile in data.profiles:
        result = data.ok(method, profile)
        for card in recorded_cards(result.findings if result else {}):
            if card["recipe_key"] not in keys:
                keys.append(card["recipe_key"])
    return keys


def notebook_grid(notebook: Path) -> bytes | None:
    """The PNG a cell tagged :data:`GRID_TAG` displayed in an executed notebook, if any."""
    try:
        cells = json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        return None
    for cell in cells:
        if GRID_TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                return base64.b64decode("".join(png) if isinstance(png, list) else png)
    return None


def cached_card(key: str, sha256: str | None) -> tuple[dict[str, Any], Path] | None:
    """The cached card of recipe ``key`` and its folder, when the cache holds it with the same sha256."""
    from vlmdefense.workbench.models import cache_dir

    folder = cache_dir() / "models" / f"{SMALL_PRIOR}-{key}"
    try:
        card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not sha256 or card.get("sha256") != sha256:
        return None
    return card, folder


def _curve_png(card: dict[str, Any], w: Writer, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = card.get("loss_curve") or {}
    losses = curve.get("mean_loss") or []
    if not losses:
        return ""
    every = int(curve.get("every_steps", 1))
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.plot([every * (i + 1) for i in range(len(losses))], losses)
    ax.set(xlabel="optimiser step", ylabel="denoising loss (mean per bin)", yscale="log", title="small diffusion prior")
    fig.tight_layout()
    fig.savefig(w.path(path), dpi=100)
    plt.close(fig)
    return path


def collect_priors(data: SiteData) -> list[PriorCard]:
    """Every small prior the successful records used, merged per recipe key (no file is written)."""
    priors: dict[str, PriorCard] = {}
    for entry in data.entries:
        for profile in data.profiles:
            result = data.ok(entry.id, profile)
            for card in recorded_cards(result.findings if result else {}):
                prior = priors.setdefault(card["recipe_key"], PriorCard(card["recipe_key"]))
                for k, v in card.items():
                    prior.card.setdefault(k, v)
                if (entry, profile) not in prior.used_by:
                    prior.used_by.append((entry, profile))
    return list(priors.values())


def write_prior_assets(prior: PriorCard, data: SiteData, w: Writer) -> None:
    """Write the grid and the loss curve of ``prior`` and note where each part came from."""
    records = ", ".join(f"{entry.id} ({profile})" for entry, profile in prior.used_by)
    prior.sources.append(f"card fields from the result records of {records}")
    grid = None
    for entry, profile in prior.used_by:
        notebook = data.notebooks.get(entry.id, {}).get(profile)
        grid = notebook_grid(notebook) if notebook else None
        if grid:
            prior.sources.append(f"sample grid from the executed notebook of {entry.id} ({profile})")
            break
    cached = None
    if grid is None or not prior.card.get("loss_curve"):
        cached = cached_card(prior.key, prior.card.get("sha256"))
    if cached is not None:
        card, folder = cached
        missing = [k for k in card if k not in prior.card]
        for k in missing:
            prior.card[k] = card[k]
        grid_file = folder / str(card.get("sample_grid", {}).get("file", "samples.png"))
        if grid is None and grid_file.is_file():
            grid = grid_file.read_bytes()
            missing.append("sample grid image")
        if missing:
            filled = ", ".join(k.replace("_", " ") for k in missing)
            prior.sources.append(f"from the local cache of the prior (same sha256): {filled}")
    if grid:
        prior.grid = f"assets/models/{prior.key}-samples.png"
        w.path(prior.grid).write_bytes(grid)
    prior.curve = _curve_png(prior.card, w, f"assets/models/{prior.key}-loss.png")


def card_rows(card: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of the card's table, in reading order, for the fields it has."""
    metrics = card.get("metrics") or {}
    grid = card.get("sample_grid") or {}
    unet = card.get("unet") or {}
    rows = [
        ("Model", card.get("model")),
        ("Recipe key", card.get("recipe_key")),
        ("Seed", card.get("seed", (card.get("recipe") or {}).get("seed"))),
        ("Parameters", f"{card['parameters']:,}" if isinstance(card.get("parameters"), int) else None),
        ("UNet levels (channels)", ", ".join(map(str, unet.get("block_out_channels", []))) or None),
        ("Training images", card.get("train_images")),
        ("Training time", f"{card['train_seconds']} s wall" if "train_seconds" in card else None),
        (
            "Training CPU time",
            f"{card['train_cpu_seconds']} s on {card.get('threads', '?')} thread(s)"
            if "train_cpu_seconds" in card
            else None,
        ),
        ("Final training loss", card.get("final_loss")),
        ("Test denoising error (MSE of the predicted noise)", metrics.get("test_denoising_mse")),
        ("Sample grid", f"{grid['images']} samples, {grid.get('sampler', '')}" if "images" in grid else None),
        ("sha256 of the weights", card.get("sha256")),
    ]
    return [(label, str(value)) for label, value in rows if value is not None]


def models_page(data: SiteData, w: Writer) -> None:
    """Write ``models.md`` (the small prior's cards, from the records) and its images."""
    priors = collect_priors(data)
    for prior in priors:
        write_prior_assets(prior, data, w)
    body = render(
        "models.md.j2",
        priors=priors,
        rows={p.key: card_rows(p.card) for p in priors},
        recipes={p.key: sorted((p.card.get("recipe") or {}).items()) for p in priors},
        anchor=prior_anchor,
    )
    w.page(MODELS_PAGE, "Models", body)
