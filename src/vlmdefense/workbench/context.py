"""A reproduction's context: the profile's parameters, the model, the data and the undefended classifier,
and fitting a defense on what the protocol allows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmdefense.defenses.base import Defense
from vlmdefense.defenses.fit_data import FitData
from vlmdefense.paths import find_root
from vlmdefense.runs.detection import DetectionSection
from vlmdefense.runs.profiles import load_profiles, method_parameters
from vlmdefense.runs.provenance import now_iso
from vlmdefense.units import Epsilon
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
    ZeroShotClassifier,
)
from vlmdefense.workbench.models import SMALL_CLIP, LoadedClip, configure_threads, load_clip, set_seed, small_clip_card


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
    detection: dict[str, DetectionSection] = field(default_factory=dict)  # Result.detection, by variant

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

    def fit_data(self) -> FitData:
        """What a defense may fit on: the frozen base model, the seen-class training images, the
        evaluation sets (for findings), the headline ε and the parameters."""
        return FitData(
            base=self.base,
            clip=self.clip,
            prompts=self.prompts,
            train=self.seen_train if self.train is not None else None,
            sets=self.sets,
            headline=self.headline,
            params=self.params,
            device=self.device,
        )


def _load_sets(
    params: dict[str, Any], image_size: int, root: Path
) -> tuple[ImageSet | None, ImageSet, ImageSet | None, PromptSpec]:
    dataset = params["dataset"]
    train: ImageSet | None
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

    def to(s: ImageSet) -> ImageSet:
        return ImageSet(s.name, s.images.to(device), s.labels.to(device), s.classnames)

    sets = EvalSets(to(test), to(transfer) if transfer else None, prompts.seen_classes)
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
        to(train) if train else None,
        sets,
        base,
        started,
        start_time,
        model_card=card,
    )


def fit(ctx: Context, defense: Defense) -> Defense:
    """Fit ``defense`` on :meth:`Context.fit_data`, add its findings to ``ctx.findings`` and record
    its training time."""
    data = ctx.fit_data()
    start = time.perf_counter()
    findings = defense.fit(data)
    ctx.train_seconds = time.perf_counter() - start
    ctx.findings.update(findings or {})
    return defense
