"""Evaluate any open_clip-loadable model (a released robust checkpoint, a user's own weights, the original CLIP)
zero-shot under a profile's suite: every dataset, every ε, the profile's attacks and its evaluation audit, with
the weights' sha256 in the record.

The checkpoint is evaluated as the undefended zero-shot classifier of its own weights, through the same
measurement as every reproduction (:func:`vlmdefense.workbench.harness.measure`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmdefense.catalog.schema import Reported
from vlmdefense.defenses.baseline import Undefended
from vlmdefense.runs.checkpoint_records import (
    CheckpointResult,
    DatasetScore,
    SuiteAverage,
    Weights,
)
from vlmdefense.runs.profiles import load_profiles, method_parameters
from vlmdefense.runs.provenance import now_iso, provenance
from vlmdefense.runs.records import RobustEntry, RunStatus
from vlmdefense.units import Epsilon
from vlmdefense.workbench.context import Context, budgets
from vlmdefense.workbench.data import ImageSet
from vlmdefense.workbench.evaluation import EvalSets, ZeroShotClassifier
from vlmdefense.workbench.harness import measure
from vlmdefense.workbench.model_cache import file_sha256
from vlmdefense.workbench.models import LoadedClip, configure_threads, load_clip, set_seed
from vlmdefense.workbench.suite import SuiteDataset, SuiteSpec, load_suite_dataset

#: The weights files open_clip reads from a hub repository.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class CheckpointSpec:
    """What to evaluate: an open_clip model name, its pretrained tag or file, optional image-tower weights."""

    model: str
    pretrained: str | None = None
    visual: Path | None = None

    @property
    def shown_pretrained(self) -> str | None:
        """The pretrained tag, or a weights file's name only (records never hold a machine's paths)."""
        if self.pretrained and Path(self.pretrained).is_file():
            return Path(self.pretrained).name
        return self.pretrained


def _cached_weights(model: str, pretrained: str | None) -> Path | None:
    """The file open_clip loaded for a hub name or a pretrained tag (from its cache; nothing is downloaded)."""
    import open_clip

    try:
        if model.startswith("hf-hub:"):
            return _first_cached(model.removeprefix("hf-hub:"), WEIGHT_FILES)
        cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
        if cfg.get("hf_hub"):
            parts = str(cfg["hf_hub"]).strip("/").split("/")
            found = _first_cached("/".join(parts[:2]), tuple(parts[2:3]) or WEIGHT_FILES)
            if found is not None:
                return found
        if cfg.get("url"):
            cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(str(cfg["url"]))
            return cached if cached.is_file() else None
    except (OSError, ValueError):
        return None
    return None


def _first_cached(repo_id: str, names: tuple[str, ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return Path(found)
    return None


def weights_digests(spec: CheckpointSpec) -> dict[str, str]:
    """sha256 of every weights file the evaluation read, keyed by file name."""
    files: list[Path] = []
    if spec.pretrained and Path(spec.pretrained).is_file():
        files.append(Path(spec.pretrained))
    else:
        cached = _cached_weights(spec.model, spec.pretrained)
        if cached is not None:
            files.append(cached)
    if spec.visual is not None:
        files.append(Path(spec.visual))
    return {path.name: file_sha256(path) for path in files}


def load_visual_weights(clip: LoadedClip, path: Path) -> None:
    """Load an image-tower state_dict (as FARE and TeCoA release theirs) over ``clip``'s image tower.

    Accepts a bare state_dict, one under ``state_dict``, and keys prefixed by ``module.`` and/or ``visual.``.

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: the keys or shapes do not fit the model's image tower.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"image-tower weights {path} not found")
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    cleaned = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in cleaned):
        cleaned = {k.removeprefix("visual."): v for k, v in cleaned.items() if k.startswith("visual.")}
    clip.model.visual.load_state_dict(cleaned, strict=True)


def matching_entry(root: Path, spec: CheckpointSpec) -> tuple[str | None, list[Reported]]:
    """The catalog entry whose released checkpoints include these weights (hub name or file name), and the
    reported numbers of those weights (the rows whose ``model`` is the checkpoint's ``reported_as``)."""
    from vlmdefense.catalog.validation import load_catalog

    catalog, _ = load_catalog(root / "catalog")
    if catalog is None:
        return None, []
    names = {spec.model}
    names |= {Path(p).name for p in (spec.pretrained, spec.visual) if p}
    for entry_id, item in sorted(catalog.items.items()):
        for checkpoint in item.entry.checkpoints:
            keys = {checkpoint.hub_id} if checkpoint.hub_id else set()
            keys.add(str(checkpoint.url).rstrip("/").rsplit("/", 1)[-1])
            if names & keys:
                rows = [r for r in item.entry.reported if checkpoint.reported_as and r.model == checkpoint.reported_as]
                return entry_id, rows
    return None, []


def _dataset_context(
    base_params: dict[str, Any],
    profile: str,
    root: Path,
    clip: LoadedClip,
    data: SuiteDataset,
    sets: EvalSets,
    base: ZeroShotClassifier,
    budget: Epsilon,
) -> Context:
    params = {**base_params, "eps": [budget.display], "headline_eps": budget.display}
    if abs(budget.value - Epsilon.parse(base_params["headline_eps"]).value) > 1e-12:
        params["audit"] = False  # the audit runs once per dataset, at the headline ε
    return Context(
        data.name,
        profile,
        params,
        root,
        clip.device,
        clip,
        data.prompts,
        None,
        sets,
        base,
        now_iso(),
        time.perf_counter(),
    )


def score_dataset(
    base_params: dict[str, Any], profile: str, root: Path, clip: LoadedClip, data: SuiteDataset
) -> DatasetScore:
    """Clean accuracy, every attack at every ε of the profile and the audit at its headline ε, on one dataset."""
    rows: list[RobustEntry] = []
    worst: dict[str, float | None] = {}
    clean: float | None = None
    audit = None
    base = ZeroShotClassifier(clip, data.prompts).to(clip.device)  # the class prompts are encoded once per dataset
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    test = data.images
    on_device = ImageSet(test.name, test.images.to(clip.device), test.labels.to(clip.device), test.classnames)
    sets = EvalSets(on_device, None, ())  # moved to the device once, shared by every ε
    for budget in budgets(base_params["eps"]):
        if len(data.images) == 0:
            worst[budget.display] = None
            continue
        ctx = _dataset_context(base_params, profile, root, clip, data, sets, base, budget)
        measured = measure(ctx, Undefended(ctx.base))
        clean = measured.clean.all
        rows += measured.rows
        worst[budget.display] = measured.headline.robust
        audit = measured.audit or audit
    return DatasetScore(
        dataset=data.name,
        images=len(data.images),
        split_size=data.size,
        classes=len(data.prompts.classnames),
        clean=clean,
        robust=rows,
        worst=worst,
        audit=audit,
    )


def suite_averages(scores: list[DatasetScore], eps: list[Epsilon]) -> list[SuiteAverage]:
    """The mean over datasets (each weighing the same) of clean and worst-case robust accuracy, per ε."""
    out = []
    for budget in eps:
        pairs = [(s.clean, s.worst.get(budget.display)) for s in scores]
        robust = [r for _, r in pairs if r is not None]
        clean = [c for c, _ in pairs if c is not None]
        out.append(
            SuiteAverage(
                eps=budget,
                clean=round(sum(clean) / len(clean), 2) if clean else None,
                robust=round(sum(robust) / len(robust), 2) if robust else None,
                datasets=len(robust),
            )
        )
    return out


def evaluate_checkpoint(
    spec: CheckpointSpec,
    profile: str,
    slug: str,
    root: Path,
    overrides: dict[str, Any] | None = None,
    data_root: Path | None = None,
) -> CheckpointResult:
    """Evaluate ``spec`` on every dataset of ``profile``'s suite and return the record (not yet written).

    Raises:
        ValueError: unknown profile, or a profile without a suite.
        FileNotFoundError: weights or a dataset missing on disk.
        RuntimeError: the profile needs a GPU and none is available.
    """
    started, start = now_iso(), time.perf_counter()
    profiles = load_profiles(root)
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r} (one of: {', '.join(profiles)})")
    params = method_parameters(profiles[profile], "checkpoint", overrides)
    params["model"] = {"name": spec.model, "pretrained": spec.shown_pretrained}
    suite = SuiteSpec.from_params(params, root, data_root)
    device = str(params.get("device", "cpu"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"profile {profile!r} needs a GPU (device: cuda) and none is available")
    configure_threads()
    seed = int(params.get("seed", 0))
    set_seed(seed)
    clip = load_clip(spec.model, spec.pretrained, device=device)
    if spec.visual is not None:
        load_visual_weights(clip, spec.visual)
    entry, reported = matching_entry(root, spec)
    scores = []
    for name in tqdm(suite.datasets, desc=f"{slug} on {profile}", unit="dataset"):
        data = load_suite_dataset(name, suite, clip.image_size, seed)
        scores.append(score_dataset(params, profile, root, clip, data))
    return CheckpointResult(
        slug=slug,
        profile=profile,
        status=RunStatus.OK,
        parameters=params,
        weights=Weights(
            model=spec.model,
            pretrained=spec.shown_pretrained,
            visual=Path(spec.visual).name if spec.visual else None,
            sha256=weights_digests(spec),
            catalog_entry=entry,
        ),
        datasets=scores,
        averages=suite_averages(scores, budgets(params["eps"])),
        headline_eps=Epsilon.parse(params["headline_eps"]),
        reported=reported,
        provenance=provenance(
            root, device, seed, started, time.perf_counter() - start, None, os.environ.get("VLMDEFENSE_COMMAND")
        ),
    )
