"""MirrorCheck — detecting adversarial inputs by regenerating the model's own description (Fares, Ziu, Aremu et
al., arXiv 2406.09250, CVPR Workshops 2026; official code github.com/klea-ziu/MirrorCheck).

The victim describes the input; a text-to-image model renders the description; frozen image encoders, separate
from the victim, embed the input and the rendering, and the input is flagged when their cosine similarity,
averaged over the encoders, falls below a threshold τ set on held-out clean and adversarial scores. For a
classifier the description is the predicted label. Here the victim is the small zero-shot CLIP, the generator
the class-conditional small prior (:mod:`vlmdefense.workbench.conditional_prior`, DDIM with classifier-free
guidance) and the encoders the image towers of small CLIPs trained by the same recipe with other seeds. The
stochastic variant (the released ``StochasticMirrorCheckDetector``) draws a subset of the encoders per query
and adds one-time-use Gaussian noise to the drawn encoders' weights.

The detector does not change the classification: :meth:`MirrorCheck.predict` returns the victim's logits, and
:meth:`MirrorCheck.detect` the scores and flags. The joint adaptive attack (:meth:`MirrorCheck.joint_attack`)
must make the victim output a wrong label *and* keep the score above τ. The rendering depends on the input only
through the predicted label, a discrete step: the attack fixes a target label t, so that the rendering is a
random picture of class t whatever the perturbation (its gradient with respect to the input is exactly zero, so
there is nothing to unroll) and the score's gradient runs through the encoders alone; EOT averages over
renderings of t (and, for the stochastic variant, over encoder draws and weight noise). Each of the victim's
most likely wrong classes is tried as t, and the per-example best outcome for the attacker is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense
from vlmdefense.workbench import detection as metrics

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.runs.detection import DetectionRow
    from vlmdefense.units import Epsilon
    from vlmdefense.workbench.conditional_prior import ConditionalPrior, ConditionalRecipe
    from vlmdefense.workbench.models import LoadedClip

THRESHOLD_RULES = ("equal_tpr_tnr", "fpr5")


@dataclass
class MirrorCheckConfig:
    """MirrorCheck's settings (released code: Stable Diffusion v1.5, 50 steps, guidance 7.5; OTU noise 5e-6).

    Attributes:
        sampler_steps: DDIM steps of the rendering (10 and guidance 4 separate clean from attacked training
            images best among 10/20 steps and guidance 1/2/4/7.5; chosen on training images only).
        guidance: classifier-free guidance scale of the rendering.
        encoder_seeds: training seeds of the detector's small CLIPs, comma-separated (the victim's is 0).
        stochastic: draw ``n_encoders`` of them per query and jitter their weights (Stochastic MirrorCheck).
        n_encoders: encoders per query of the stochastic variant.
        otu_noise: standard deviation of the one-time-use weight noise (stochastic variant).
        threshold_rule: ``equal_tpr_tnr`` (the released evaluation's rule) or ``fpr5`` (5 % clean FPR).
        calibration_images: training images (seen classes) whose clean and attacked scores set τ.
        calibration_steps: PGD steps of the calibration attack (on the undefended model, at the headline ε).
        attack_targets: wrong labels the joint attack tries per image (the victim's most likely ones).
        attack_margin: the joint attack aims at a score of τ + margin.
        attack_weight: weight of the detector's hinge against the classifier's (both in cosine units).
        attack_bank: renderings of each target class the joint attack averages over (cycled through EOT).
        prior: empty for the small class-conditional prior; else a local diffusers class-conditional UNet.
        prior_steps: training steps of the small prior (0: its recipe's).
        encoder_epochs: training epochs of the detector's small CLIPs (0: the small CLIP recipe's).
    """

    sampler_steps: int = 10
    guidance: float = 4.0
    encoder_seeds: str = "1,2"
    stochastic: bool = False
    n_encoders: int = 1
    otu_noise: float = 5e-6
    threshold_rule: str = "equal_tpr_tnr"
    calibration_images: int = 200
    calibration_steps: int = 10
    attack_targets: int = 3
    attack_margin: float = 0.02
    attack_weight: float = 1.0
    attack_bank: int = 4
    prior: str = ""
    prior_steps: int = 0
    encoder_epochs: int = 0


class MirrorCheck(TrainingFreeDefense):
    """MirrorCheck beside the zero-shot classifier: the classification is the victim's, the detector flags."""

    id = "mirrorcheck"
    config_class = MirrorCheckConfig
    config: MirrorCheckConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.prior: ConditionalPrior | None = None
        self.encoders: list[LoadedClip] = []
        self.threshold: float | None = None

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"sampler_steps": 4, "prior_steps": 40, "encoder_epochs": 2, "calibration_images": 40}

    # --- components -------------------------------------------------------------------------------------

    def prior_recipe(self) -> ConditionalRecipe:
        """The small prior's recipe (its training steps replaced when ``prior_steps`` is set)."""
        from dataclasses import replace

        from vlmdefense.workbench.conditional_prior import ConditionalRecipe

        steps = int(self.config.prior_steps or 0)
        return replace(ConditionalRecipe(), steps=steps) if steps > 0 else ConditionalRecipe()

    def load_components(self, device: str = "cpu") -> None:
        """Load the generator and the encoders the config names (training the small ones on first use)."""
        from vlmdefense.workbench.conditional_prior import load_conditional_prior
        from vlmdefense.workbench.models import SMALL_CLIP, Recipe, ensure_small_clip, load_clip

        if self.prior is None:
            self.prior = load_conditional_prior(self.config.prior or None, device=device, recipe=self.prior_recipe())
        if not self.encoders:
            epochs = int(self.config.encoder_epochs or 0)
            for seed in self.encoder_seeds():
                recipe = Recipe(seed=seed, epochs=epochs) if epochs > 0 else Recipe(seed=seed)
                clip = load_clip(SMALL_CLIP, ensure_small_clip(recipe), device=device)
                clip.model.requires_grad_(False)
                self.encoders.append(clip)

    def encoder_seeds(self) -> list[int]:
        """The detector encoders' training seeds."""
        return [int(s) for s in str(self.config.encoder_seeds).split(",") if s.strip()]

    def _prior(self) -> ConditionalPrior:
        if self.prior is None or not self.encoders:
            raise RuntimeError("MirrorCheck: call fit (or load_components) first")
        return self.prior

    def render(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One rendering of each label's class in [0, 1] (the caption → image step)."""
        cfg = self.config
        return self._prior().sample(labels, cfg.sampler_steps, cfg.guidance, generator)

    def _embed(self, clip: LoadedClip, images: torch.Tensor, noise: float) -> torch.Tensor:
        """Unit embeddings by ``clip``'s image tower, its weights jittered by N(0, noise²) for this call."""
        inputs = clip.normalize(images)
        if noise <= 0:
            return F.normalize(clip.model.visual(inputs), dim=-1)
        params = {name: p + noise * torch.randn_like(p) for name, p in clip.model.visual.named_parameters()}
        return F.normalize(functional_call(clip.model.visual, params, (inputs,)), dim=-1)

    def similarity(self, images: torch.Tensor, renderings: torch.Tensor) -> torch.Tensor:
        """Per-image score: the cosine between input and rendering, averaged over the encoders (all of them, or
        for the stochastic variant ``n_encoders`` drawn per image, each call with fresh weight noise)."""
        cfg = self.config
        noise = float(cfg.otu_noise) if cfg.stochastic else 0.0
        sims = []
        for clip in self.encoders:
            both = self._embed(clip, torch.cat([images, renderings]), noise)
            first, second = both.chunk(2)
            sims.append((first * second).sum(-1))
        table = torch.stack(sims, dim=1)  # (n, encoders)
        if not cfg.stochastic or cfg.n_encoders >= len(self.encoders):
            return table.mean(1)
        order = torch.rand(table.shape, device=table.device).argsort(dim=1)
        chosen = torch.zeros_like(table).scatter_(1, order[:, : cfg.n_encoders], 1.0)
        return (table * chosen).sum(1) / cfg.n_encoders

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, scores, flagged)`` of [0, 1] images (flagged: score below τ)."""
        with torch.no_grad():
            logits = self._base()(images)
            scores = self.similarity(images, self.render(logits.argmax(-1)))
        if self.threshold is None:
            raise RuntimeError("MirrorCheck: no threshold (call fit or calibrate)")
        return logits, scores, scores < self.threshold

    # --- the defense interface --------------------------------------------------------------------------

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the victim, load generator and encoders, and calibrate τ on the seen-class training images
        (clean, and attacked by PGD on the undefended model at the headline ε): never on test images."""
        self.bind(data.base)
        self.load_components(data.device)
        if data.train is None:
            raise RuntimeError("MirrorCheck: calibration needs the training split")
        n = min(int(self.config.calibration_images), len(data.train))
        images, labels = data.train.images[:n], data.train.labels[:n]
        calibration = self.calibrate(images, labels, data.headline.value, int(data.params.get("seed", 0)))
        prior = self._prior().card
        keys = ("model", "recipe_key", "sha256", "parameters", "train_seconds", "final_loss", "metrics")
        return {
            "prior": {k: prior[k] for k in keys if k in prior},
            "encoders": [{"seed": s, "checkpoint": c.pretrained.split("/")[-2]} for s, c in self._encoders_named()],
            "calibration": calibration,
            "hyperparameters": self.hyperparameters(),
        }

    def _encoders_named(self) -> list[tuple[int, LoadedClip]]:
        return list(zip(self.encoder_seeds(), self.encoders, strict=True))

    def calibrate(self, images: torch.Tensor, labels: torch.Tensor, eps: float, seed: int) -> dict[str, Any]:
        """Set τ from the scores of ``images`` and of their PGD adversarials on the undefended model."""
        from vlmdefense.workbench.attacks import PGD
        from vlmdefense.workbench.models import set_seed

        rule = str(self.config.threshold_rule)
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"MirrorCheck: threshold_rule must be one of {THRESHOLD_RULES}, not {rule!r}")
        set_seed(seed)
        attacked = PGD(eps=eps, steps=int(self.config.calibration_steps))(self._base(), images, labels)
        self.threshold = 0.0
        _, clean, _ = self.detect(images)
        logits, adv, _ = self.detect(attacked)
        fooled = logits.argmax(-1) != labels
        adv = adv[fooled] if bool(fooled.any()) else adv
        tau = metrics.equal_error_threshold(clean, adv) if rule == "equal_tpr_tnr" else metrics.threshold_at_fpr(clean)
        self.threshold = tau
        tpr, fpr = metrics.rates(clean, adv, tau)
        return {
            "threshold": round(tau, 5),
            "rule": rule,
            "images": len(images),
            "adversarial_images": len(adv),
            "auroc": round(metrics.auroc(clean, adv), 4),
            "tpr": round(100 * tpr, 2),
            "fpr": round(100 * fpr, 2),
        }

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The victim's logits: a detector does not change the classification."""
        self.counter.images += len(images)
        self.counter.forward += len(images)
        with torch.no_grad():
            return self._base()(images)

    def attack_surface(self) -> Predictor:
        """The classifier (differentiable): the harness' adaptive rows attack the labels a detector leaves as
        they are; the detector is attacked jointly by :meth:`joint_attack`."""
        return self._base()

    def pipeline(self, images: torch.Tensor) -> torch.Tensor:
        """Classification plus detection (what one defended query costs), counting image-tower passes."""
        n = len(images)
        self.counter.images += n
        per_image = self.config.n_encoders if self.config.stochastic else len(self.encoders)
        self.counter.forward += n * (1 + 2 * min(per_image, len(self.encoders)))
        return self.detect(images)[0]

    def unet_calls(self) -> int:
        """UNet evaluations per rendering (guidance doubles each step)."""
        return self.config.sampler_steps * (1 if self.config.guidance == 1.0 else 2)

    # --- the joint adaptive attack ----------------------------------------------------------------------

    def joint_objective(self, target: torch.Tensor, bank: list[torch.Tensor]) -> Any:
        """The attacker's objective for target labels ``target``: minus the classifier's hinge (the target's
        logit must lead by ``attack_margin``, in cosine units) minus ``attack_weight`` times the detector's hinge
        (the score must reach τ + ``attack_margin``); each call uses the next rendering of ``bank`` (EOT)."""
        cfg, base = self.config, self._base()
        tau = float(self.threshold if self.threshold is not None else 0.0)
        calls = [0]

        def objective(x: torch.Tensor) -> torch.Tensor:
            rendering = bank[calls[0] % len(bank)]
            calls[0] += 1
            logits = base(x) / base.logit_scale
            others = logits.scatter(1, target.unsqueeze(1), float("-inf")).amax(1)
            classifier = F.relu(others - logits.gather(1, target.unsqueeze(1)).squeeze(1) + cfg.attack_margin)
            detector = F.relu(tau + cfg.attack_margin - self.similarity(x, rendering))
            return -(classifier + cfg.attack_weight * detector).sum()

        return objective

    def joint_attack(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        steps: int,
        eot: int = 1,
        extra: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Adversarial images that aim to be misclassified and unflagged: L∞ PGD with EOT per target label (the
        victim's ``attack_targets`` most likely wrong classes), and any ``extra`` candidates (e.g. the transfer
        attack's images); per image, the attacker's best outcome on a separate draw of the detector: evading
        first, then misclassified with the highest score."""
        from vlmdefense.workbench.attacks import PGD

        with torch.no_grad():
            logits = self._base()(images)
        ranked = logits.scatter(1, labels.unsqueeze(1), float("-inf")).argsort(1, descending=True)
        best, rank = images.clone(), torch.full((len(images),), -1.0, device=images.device)

        def keep(candidate: torch.Tensor) -> None:
            out, scores, flags = self.detect(candidate)
            fooled = out.argmax(-1) != labels
            value = fooled.float() * (1 + (~flags).float()) + scores.clamp(-1, 1) / 4  # evading > fooled > not
            better = value > rank
            best[better], rank[better] = candidate[better], value[better]

        for candidate in extra or []:
            keep(candidate.detach())
        for k in range(min(int(self.config.attack_targets), logits.shape[1] - 1)):
            target = ranked[:, k]
            bank = [self.render(target) for _ in range(max(1, int(self.config.attack_bank)))]
            attack = PGD(eps=eps, steps=steps, eot_samples=eot)
            keep(attack.maximise(self.joint_objective(target, bank), images))
        return best


def detection_row(
    defense: MirrorCheck,
    clean: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    attacked: torch.Tensor,
    labels: torch.Tensor,
    attack: str,
    eps: Epsilon,
    steps: int,
    adaptive: bool,
    seconds: float | None = None,
) -> tuple[DetectionRow, torch.Tensor]:
    """The detection record of one attack (fresh detector draws on ``attacked``) and the adversarial scores.

    Args:
        clean: ``(clean scores, clean correct, clean flagged)`` of the same test images.
    """
    from vlmdefense.runs.detection import DetectionRow

    clean_scores, clean_correct, _ = clean
    logits, scores, flags = defense.detect(attacked)
    correct = logits.argmax(-1).cpu() == labels.cpu()
    adversarial = clean_correct.cpu() & ~correct
    adv_scores = scores.cpu()[adversarial]
    has = bool(adversarial.any())
    tpr, tau5 = metrics.tpr_at_fpr(clean_scores, adv_scores) if has else (None, None)
    row = DetectionRow(
        attack=attack,
        eps=eps,
        steps=steps,
        adaptive=adaptive,
        target="classifier-and-detector" if adaptive else "base-model",
        attacked_images=len(labels),
        adversarial_images=int(adversarial.sum()),
        attack_success=round(100 * float(adversarial.sum()) / max(1, int(clean_correct.sum())), 2),
        auroc=round(metrics.auroc(clean_scores, adv_scores), 4) if has else None,
        tpr_at_5_fpr=round(100 * tpr, 2) if tpr is not None else None,
        threshold_at_5_fpr=round(tau5, 5) if tau5 is not None else None,
        detection_rate=round(100 * float(flags.cpu()[adversarial].double().mean()), 2) if has else None,
        evading=round(100 * float((~correct & ~flags.cpu()).double().mean()), 2),
        accuracy_after_rejection=round(100 * metrics.attacked_accuracy_after_rejection(correct, flags), 2),
        mean_score=round(float(adv_scores.mean()), 4) if has else None,
        seconds=round(seconds, 2) if seconds is not None else None,
    )
    return row, adv_scores


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    """``(function(*args), seconds)``."""
    start = time.perf_counter()
    out = function(*args)
    return out, time.perf_counter() - start
