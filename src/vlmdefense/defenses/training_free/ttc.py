"""TTC — test-time counterattacks (Xing et al., CVPR 2025).

A short PGD *counterattack* from the input pushes the image embedding away from the input's own
embedding, inside a 4/255 L∞ ball, starting from uniform noise. The relative embedding change caused by
that initial noise, τ, gates it: images with τ ≥ ``tau_thres`` count as clean and keep only the noise;
the others receive the iterates' perturbations combined with weights ∝ exp(β·step), as in the official
code. Adaptive attack: BPDA over the counterattack (its perturbation is a constant offset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense, tau_quantiles

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class TTCConfig:
    """TTC's hyperparameters (official defaults; the profile's parameters of the same names override).

    Attributes:
        ttc_eps: L∞ radius of the counterattack (official ``--ttc_eps 4``, in /255).
        ttc_steps: counterattack steps (official ``--ttc_numsteps 2``).
        ttc_step_size: step size (official ``--ttc_stepsize 1``, in /255).
        tau_thres: τ threshold (official 0.2), or ``"calibrate"``: the ``tau_quantile`` quantile of τ
            on the clean seen-class training images.
        tau_quantile: quantile used by ``tau_thres: calibrate``.
        beta: weight of later steps in the combination, weights ∝ exp(beta · step).
        calibration_images: at most this many training images are used to measure τ in ``fit``.
    """

    ttc_eps: float = 4 / 255
    ttc_steps: int = 2
    ttc_step_size: float = 1 / 255
    tau_thres: float | str = 0.2
    tau_quantile: float = 0.05
    beta: float = 2.0
    calibration_images: int = 720


@dataclass
class CounterattackOutput:
    """One TTC pass: the perturbation that is added, τ, and which images were counterattacked."""

    delta: torch.Tensor
    tau: torch.Tensor
    counterattacked: torch.Tensor


class TTC(TrainingFreeDefense):
    """Test-time counterattacks (Xing et al., CVPR 2025), τ-thresholded and β-weighted."""

    id = "ttc"
    randomized = True  # the initial uniform noise (which also defines τ) is drawn at every prediction
    config_class = TTCConfig
    config: TTCConfig

    def __init__(self, config: TTCConfig | None = None) -> None:
        super().__init__(config)
        self.threshold: float | None = None if self.config.tau_thres == "calibrate" else float(self.config.tau_thres)
        self.calibration: dict[str, Any] = {}

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"calibration_images": 64}

    def raw_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (the official code measures τ and the L2 loss on them)."""
        clip = self.clip
        return clip.model.encode_image(clip.normalize(images))

    def counterattack(self, images: torch.Tensor, threshold: float | None = None) -> CounterattackOutput:
        """The τ-gated, β-weighted counterattack perturbation of ``images`` (no graph to ``images``)."""
        cfg = self.config
        thres = self.threshold if threshold is None else threshold
        if thres is None:
            raise RuntimeError("TTC: tau_thres is 'calibrate' and fit has not run")
        x = images.detach()
        eps, alpha = cfg.ttc_eps, cfg.ttc_step_size
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = torch.max(torch.min(delta, 1 - x), -x)  # x + delta stays in [0, 1]
        with torch.no_grad():
            reference = self.raw_embed(x)
        iterates = [delta]
        tau = None
        with torch.enable_grad():
            for step in range(cfg.ttc_steps):
                d = delta.detach().requires_grad_(True)
                embedding = self.raw_embed(x + d)
                if step == 0:  # τ is the relative change caused by the initial noise alone
                    tau = (embedding.detach() - reference).norm(dim=-1) / reference.norm(dim=-1)
                loss = (embedding - reference).pow(2).sum()
                grad = torch.autograd.grad(loss, d)[0]
                delta = (d.detach() + alpha * grad.sign()).clamp(-eps, eps)  # ascent: away from the input
                delta = torch.max(torch.min(delta, 1 - x), -x)
                iterates.append(delta)
        if tau is None:
            with torch.no_grad():
                tau = (self.raw_embed(x + delta) - reference).norm(dim=-1) / reference.norm(dim=-1)
        stacked = torch.stack(iterates, dim=1)  # (N, steps + 1, C, H, W)
        steps = torch.arange(cfg.ttc_steps + 1, device=x.device, dtype=x.dtype)
        soft = torch.softmax(cfg.beta * steps, dim=0).expand(len(x), -1)
        hard = torch.zeros_like(soft)
        hard[:, 0] = 1.0
        counter = tau < thres  # falsely stable: counterattack; otherwise keep the initial noise only
        weights = torch.where(counter.unsqueeze(1), soft, hard)
        combined = (weights.view(*weights.shape, 1, 1, 1) * stacked).sum(dim=1)
        return CounterattackOutput(combined.detach(), tau.detach(), counter)

    def tau(self, images: torch.Tensor) -> torch.Tensor:
        """τ of ``images`` for one draw of the initial noise (one extra forward pass, no gradients)."""
        x = images.detach()
        eps = self.config.ttc_eps
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = torch.max(torch.min(delta, 1 - x), -x)
        with torch.no_grad():
            reference = self.raw_embed(x)
            return (self.raw_embed(x + delta) - reference).norm(dim=-1) / reference.norm(dim=-1)

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base model and measure τ on clean seen-class training images (calibrating the
        threshold from them when ``tau_thres`` is ``calibrate``)."""
        self.bind(data.base)
        if data.train is None:
            if self.threshold is None:
                raise RuntimeError("TTC: tau_thres 'calibrate' needs a training split")
            return {}
        train = data.seen_train
        generator = torch.Generator().manual_seed(data.seed)
        n = min(self.config.calibration_images, len(train))
        index = torch.randperm(len(train), generator=generator)[:n]
        taus = torch.cat([self.tau(train.images[index[i : i + 256]]) for i in range(0, n, 256)]).cpu()
        quantile = float(torch.quantile(taus, self.config.tau_quantile))
        if self.threshold is None:
            self.threshold = quantile
        self.calibration = {
            "images": n,
            "tau_mean": round(float(taus.mean()), 5),
            "tau_std": round(float(taus.std()), 5),
            "tau_quantiles": tau_quantiles(taus),
            "calibrated_threshold": round(quantile, 5),
            "threshold_in_use": round(float(self.threshold), 5),
            "fraction_below_threshold": round(float((taus < self.threshold).float().mean()), 4),
        }
        return {"tau_clean_train": self.calibration}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n, steps = len(images), self.config.ttc_steps
        self.counter.images += n
        self.counter.forward += n * (steps + 2)  # input embedding, one per step, final prediction
        self.counter.backward += n * steps
        out = self.counterattack(images)
        with torch.no_grad():
            return self._base()(images + out.delta)

    def attack_surface(self) -> Predictor:
        """BPDA: the counterattack perturbation is recomputed for the current input (fresh noise) and
        added as a constant, so the gradient reaches the input through the frozen encoder only."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            delta = self.counterattack(images.detach()).delta
            return self._base()(images + delta)

        return surface
