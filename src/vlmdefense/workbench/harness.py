"""What a reproduction notebook calls: set up a profile, evaluate a defense, save and plot the result.

A notebook stays thin::

    ctx = harness.setup("baseline", profile, overrides)
    result = harness.evaluate(ctx, Undefended(ctx.base))
    harness.save_result(result, result_path)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmdefense.defenses.base import Defense
from vlmdefense.fileio import atomic_write_json
from vlmdefense.paths import find_root
from vlmdefense.runs.profiles import load_profiles, method_parameters
from vlmdefense.runs.provenance import now_iso, provenance
from vlmdefense.runs.records import Result
from vlmdefense.units import Epsilon
from vlmdefense.workbench.attacks import WorstCase, make_attack
from vlmdefense.workbench.data import (
    ImageSet,
    PromptSpec,
    digit_prompts,
    load_digits_split,
    load_mnist_transfer,
    load_torchvision_dataset,
)
from vlmdefense.workbench.evaluation import (
    EvalSets,
    RobustRecord,
    ZeroShotClassifier,
    clean_accuracy,
    robust_accuracy,
    time_inference,
)
from vlmdefense.workbench.models import SMALL_CLIP, LoadedClip, configure_threads, load_clip, set_seed, small_clip_card

logger = logging.getLogger(__name__)


def budgets(raw: list[Any]) -> list[Epsilon]:
    """Parse a profile's ``eps`` list ('8/255', floats)."""
    return [Epsilon.parse(item) for item in raw]


@dataclass
class Context:
    """Everything a reproduction needs: parameters, model, data, the undefended classifier."""

    method: str
    profile: str
    params: dict[str, Any]
    root: Path
    device: str
    clip: LoadedClip
    prompts: PromptSpec
    train: ImageSet | None
    sets: EvalSets
    base: ZeroShotClassifier
    started: str
    start_time: float
    model_card: dict[str, Any] | None = None
    train_seconds: float = 0.0
    findings: dict[str, Any] = field(default_factory=dict)

    @property
    def eps(self) -> list[Epsilon]:
        """The ε sweep."""
        return budgets(self.params["eps"])

    @property
    def headline(self) -> Epsilon:
        """The headline ε (the worst case over all attacks is run there)."""
        return budgets([self.params["headline_eps"]])[0]

    @property
    def seen_train(self) -> ImageSet:
        """The training images of seen classes: all a training-time defense may fine-tune on."""
        from vlmdefense.workbench.data import seen_mask

        if self.train is None:
            raise RuntimeError("this profile has no training split: set train_dataset (and n_train) in its parameters")
        return self.train.subset(seen_mask(self.train.labels, self.prompts.seen_classes), "digits-train-seen")


def _load_sets(
    params: dict[str, Any], image_size: int, root: Path
) -> tuple[ImageSet | None, ImageSet, ImageSet | None, PromptSpec]:
    dataset = params["dataset"]
    if dataset == "sklearn-digits":
        train, test = load_digits_split(image_size, seed=params.get("split_seed", 0))
        transfer = load_mnist_transfer(image_size) if params.get("transfer") == "mnist-5k" else None
        prompts = digit_prompts()
    else:
        data_root = (root / params.get("data_root", "data")).resolve()
        test = load_torchvision_dataset(dataset, data_root, image_size, params.get("n_test"))
        transfer_name = params.get("transfer")
        transfer = (
            load_torchvision_dataset(transfer_name, data_root, image_size, params.get("n_transfer"))
            if transfer_name
            else None
        )
        train_name = params.get("train_dataset")
        train = (
            load_torchvision_dataset(train_name, data_root, image_size, params.get("n_train"), train=True)
            if train_name
            else None
        )
        templates = tuple(params.get("templates", ["a photo of a {name}."]))
        prompts = PromptSpec(
            test.classnames, templates, tuple(params.get("seen_classes", range(len(test.classnames) // 2)))
        )
    return (
        train,
        test.head(params.get("n_test")),
        (transfer.head(params.get("n_transfer")) if transfer else None),
        prompts,
    )


def setup(
    method: str, profile: str = "smoke", overrides: dict[str, Any] | None = None, root: Path | None = None
) -> Context:
    """Load the profile's parameters, seed everything, load the model and the data.

    Args:
        method: the method id (``baseline`` or a catalog id).
        profile: ``smoke``, ``paper``, ``quick`` or any profile of ``reproductions/profiles.yaml``.
        overrides: parameters on top of the profile (as ``vlmdefense run -p KEY=VALUE`` gives them).
        root: the repository root (default: found from the working directory).
    """
    start_time = time.perf_counter()
    started = now_iso()
    root = root or find_root()
    profiles = load_profiles(root)
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r} (one of: {', '.join(profiles)})")
    params = method_parameters(profiles[profile], method, overrides)
    device = params.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"profile {profile!r} needs a GPU (device: cuda) and none is available")
    configure_threads()
    set_seed(int(params.get("seed", 0)))
    model = params["model"]
    clip = load_clip(model["name"], model.get("pretrained"), device=device)
    card = small_clip_card() if model["name"] == SMALL_CLIP and model.get("pretrained") is None else None
    train, test, transfer, prompts = _load_sets(params, clip.image_size, root)
    to = lambda s: s if s is None else ImageSet(s.name, s.images.to(device), s.labels.to(device), s.classnames)  # noqa: E731
    sets = EvalSets(to(test), to(transfer), prompts.seen_classes)
    base = ZeroShotClassifier(clip, prompts).to(device)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return Context(
        method,
        profile,
        params,
        root,
        device,
        clip,
        prompts,
        to(train),
        sets,
        base,
        started,
        start_time,
        model_card=card,
    )


AttackFactory = Callable[[int], Any]


def _measure(
    ctx: Context, defense: Defense, budget: Epsilon, make: AttackFactory, steps: int, eot: int, target: str
) -> RobustRecord:
    """One robust-accuracy row: ``defense`` predicts on images crafted against ``target``."""
    adaptive = target == "defended-pipeline"
    attacked = {"base-model": ctx.base, "defended-model": defense.predict}.get(target) or defense.attack_surface()
    attack = make(eot if adaptive else 1)  # the base model and a static defense are deterministic: no EOT
    name = getattr(attack, "name", type(attack).__name__)
    set_seed(int(ctx.params.get("seed", 0)))
    acc, seconds = robust_accuracy(
        defense.predict,
        attacked,
        attack,
        ctx.sets,
        ctx.params["batch_size"],
        desc=f"{name} {budget.display} ({target})",
    )
    norm = getattr(attack, "norm", "linf")
    return RobustRecord(name, norm, budget.value, budget.display, steps, adaptive, acc, seconds, target)


def _attack_rows(
    ctx: Context, defense: Defense, budget: Epsilon, make: AttackFactory, steps: int
) -> list[RobustRecord]:
    """A static defense is attacked white-box; an inference-time defense twice: through the base model
    (non-adaptive, as many papers report) and through its whole pipeline (adaptive, EOT when randomised)."""
    if defense.kind == "static":
        return [_measure(ctx, defense, budget, make, steps, 1, "defended-model")]
    eot = int(ctx.params.get("eot_samples", 1)) if defense.randomized else 1
    return [_measure(ctx, defense, budget, make, steps, eot, target) for target in ("base-model", "defended-pipeline")]


def robustness(ctx: Context, defense: Defense) -> list[RobustRecord]:
    """The ε sweep with the profile's sweep attack, then the worst case over all attacks at the headline ε."""

    def factory(specs: list[dict[str, Any]], budget: Epsilon) -> AttackFactory:
        def make(eot: int) -> Any:
            attacks = [make_attack(s["name"], budget.value, int(s["steps"]), s.get("norm", "linf"), eot) for s in specs]
            return attacks[0] if len(attacks) == 1 else WorstCase(attacks)

        return make

    rows: list[RobustRecord] = []
    sweep = ctx.params["sweep_attack"]
    for budget in ctx.eps:
        rows += _attack_rows(ctx, defense, budget, factory([sweep], budget), int(sweep["steps"]))
    specs = ctx.params["attacks"]
    if len(specs) > 1 or specs[0] != sweep:
        steps = max(int(s["steps"]) for s in specs)
        rows += _attack_rows(ctx, defense, ctx.headline, factory(specs, ctx.headline), steps)
    return rows


def fit(ctx: Context, defense: Defense) -> Defense:
    """Fit ``defense`` and record its training time."""
    start = time.perf_counter()
    defense.fit(ctx)
    ctx.train_seconds = time.perf_counter() - start
    return defense


def _reported(method: str, root: Path) -> list[dict[str, Any]]:
    from vlmdefense.catalog.validation import load_catalog

    catalog, _ = load_catalog(root / "catalog")
    if catalog is None or method not in catalog.items:
        return []
    return [r.model_dump(mode="json") for r in catalog.items[method].entry.reported]


def evaluate(ctx: Context, defense: Defense) -> Result:
    """Clean and robust accuracy, cost and provenance of a fitted defense, as a result record."""
    clean = clean_accuracy(defense.predict, ctx.sets, ctx.params["batch_size"])
    rows = robustness(ctx, defense)
    timing = time_inference(defense.predict, ctx.sets.test.images, defense.counter, ctx.params["batch_size"])
    headline_rows = [r for r in rows if abs(r.eps - ctx.headline.value) < 1e-12]
    headline = {
        "eps": {"value": ctx.headline.value, "display": ctx.headline.display},
        "clean": round(clean.all, 2),
        "robust": _lowest(r.acc.all for r in headline_rows if not r.adaptive),
        "robust_adaptive": _lowest(r.acc.all for r in headline_rows if r.adaptive),
    }
    model = ctx.params["model"]
    payload = {
        "method": ctx.method,
        "profile": ctx.profile,
        "status": "ok",
        "parameters": ctx.params,
        "model": {
            "name": model["name"],
            "pretrained": ctx.clip.pretrained if model.get("pretrained") else model.get("pretrained"),
            "card": _card_summary(ctx.model_card),
        },
        "dataset": {
            "test": ctx.sets.test.name,
            "test_images": len(ctx.sets.test),
            "transfer": ctx.sets.transfer.name if ctx.sets.transfer else None,
            "transfer_images": len(ctx.sets.transfer) if ctx.sets.transfer else 0,
            "seen_classes": list(ctx.prompts.seen_classes),
        },
        "clean": clean.as_dict(),
        "robust": [r.as_dict() for r in rows],
        "cost": {
            "train_seconds": round(ctx.train_seconds, 2),
            "inference_seconds_per_image": round(timing.seconds_per_image, 6),
            "forward_passes": round(timing.forward_passes, 2),
            "backward_passes": round(timing.backward_passes, 2),
        },
        "headline": headline,
        "reported": _reported(ctx.method, ctx.root),
        "findings": ctx.findings,
        "provenance": provenance(
            ctx.root,
            ctx.device,
            int(ctx.params.get("seed", 0)),
            ctx.started,
            time.perf_counter() - ctx.start_time,
            ctx.prompts.as_dict(),
            os.environ.get("VLMDEFENSE_COMMAND"),
        ),
    }
    return Result.model_validate(payload)


def _lowest(values: Any) -> float | None:
    found = list(values)
    return round(min(found), 2) if found else None


def _card_summary(card: dict[str, Any] | None) -> dict[str, Any] | None:
    if card is None:
        return None
    keys = ("recipe_key", "sha256", "train_seconds", "metrics", "parameters")
    return {k: card[k] for k in keys if k in card}


def save_result(result: Result, path: str | Path | None) -> Path | None:
    """Write ``result`` atomically to ``path`` (nothing when ``path`` is empty)."""
    if not path:
        return None
    target = Path(path)
    atomic_write_json(target, result.model_dump(mode="json"))
    return target


def load_baseline(ctx: Context) -> Result | None:
    """The baseline's result of the same profile, if it exists."""
    from vlmdefense.runs.records import read_result, result_path

    path = result_path(ctx.root, "baseline", ctx.profile)
    if not path.is_file():
        return None
    try:
        return read_result(path)
    except ValueError:
        return None
