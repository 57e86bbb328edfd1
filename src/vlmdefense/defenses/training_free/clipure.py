"""CLIPure — purification in CLIP's latent space (Zhang et al., ICLR 2025), both variants.

The unit image embedding is moved on the sphere by normalised gradient steps (official ``purify_zi``:
10 steps of size 30, ``u ← normalise(u + s · d/‖d‖)``, norm kept), then classified against the class
embeddings. CLIPure-Cos (``variant="cos"``) ascends the cosine similarity to the embedding of the class-free
templates ("a photo of the digit ."); CLIPure-Diff (``variant="diff"``) descends a diffusion prior's
denoising loss over embeddings at a random late timestep (one per step, 900-999, fresh noise each step), so
its prediction is random. The prior is the small embedding prior of :mod:`vlmdefense.workbench.embedding_prior`
(the paper: DALL-E 2's prior for ViT-L/14).

Adaptive surfaces: ``full`` differentiates through the ten unrolled steps, the update directions included
(for CLIPure-Diff the inner gradient is taken with a graph, so the attack sees second derivatives of the
prior's loss; EOT over its draws); ``bpda`` holds the purification's displacement of the embedding constant.
``official`` (diagnostic) differentiates as the released evaluation does: directions constant, the
re-projection onto the sphere differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.embedding_prior import EmbeddingPrior, EmbeddingPriorRecipe
    from vlmdefense.workbench.evaluation import ZeroShotClassifier

VARIANTS = ("cos", "diff")
GRAPHS = ("none", "official", "full")
SURFACES = ("full", "bpda")


@dataclass
class CLIPureConfig:
    """CLIPure's hyperparameters (official code: 10 steps of size 30; Diff: timesteps 900-999).

    Attributes:
        variant: ``cos`` (CLIPure-Cos) or ``diff`` (CLIPure-Diff).
        steps: purification steps on the sphere.
        step_size: length of each normalised step (before re-projection onto the sphere).
        norm_scope: ``sample`` normalises each image's gradient by its own L2 norm; ``batch`` by the
            norm of the whole batch's gradient tensor, as the official code does (then the step each
            image receives depends on the batch it is classified in).
        blank: ``ensemble`` — the mean of the unit embeddings of every prompt template with an empty
            class name (the official code's choice); any other string is used as the single blank prompt.
        t_min, t_max: Diff: the range of the random timestep drawn at each step (inclusive, 0-based).
        prior: Diff: empty for the small embedding prior of the small CLIP; else a local prior folder.
        prior_steps: Diff: training steps of the small prior (0: its recipe's).
        adaptive: the harness' adaptive surface: ``full``, ``bpda``, or ``auto`` (Cos: ``bpda``, as its
            earlier record; Diff: ``full``).
    """

    variant: str = "cos"
    steps: int = 10
    step_size: float = 30.0
    norm_scope: str = "sample"
    blank: str = "ensemble"
    t_min: int = 900
    t_max: int = 999
    prior: str = ""
    prior_steps: int = 0
    adaptive: str = "auto"


class CLIPure(TrainingFreeDefense):
    """CLIPure (Zhang et al., ICLR 2025): purification of the image embedding in CLIP's latent space."""

    id = "clipure"
    config_class = CLIPureConfig
    config: CLIPureConfig

    def __init__(self, config: CLIPureConfig | None = None) -> None:
        super().__init__(config)
        if self.config.variant not in VARIANTS:
            raise ValueError(f"CLIPure: variant must be one of {VARIANTS}, not {self.config.variant!r}")
        # CLIPure-Diff draws a timestep and noise per step: the instance is random (the class default is Cos)
        vars(self)["randomized"] = self.config.variant == "diff"
        self.blank_embedding: torch.Tensor | None = None
        self.blank_prompts: list[str] = []
        self.prior: EmbeddingPrior | None = None

    def bind(self, classifier: ZeroShotClassifier) -> None:
        super().bind(classifier)
        prompts = classifier.prompts
        if self.config.blank == "ensemble":
            self.blank_prompts = [t.format(name="", digit="") for t in prompts.templates]
        else:
            self.blank_prompts = [self.config.blank]
        with torch.no_grad():
            embeddings = classifier.clip.encode_texts(self.blank_prompts)
        self.blank_embedding = embeddings.mean(dim=0).detach()  # cosine ignores the norm of the mean

    def attach_prior(self, prior: EmbeddingPrior) -> None:
        """Use ``prior`` (frozen) as CLIPure-Diff's likelihood model."""
        self.prior = prior

    def prior_recipe(self) -> EmbeddingPriorRecipe:
        """The small embedding prior's recipe (its training steps replaced when ``prior_steps`` is set)."""
        from dataclasses import replace

        from vlmdefense.workbench.embedding_prior import EmbeddingPriorRecipe

        steps = int(self.config.prior_steps or 0)
        return replace(EmbeddingPriorRecipe(), steps=steps) if steps > 0 else EmbeddingPriorRecipe()

    def load_prior(self, device: str = "cpu") -> EmbeddingPrior:
        """The prior the config names: a local folder, or the small prior over the bound small CLIP's embeddings.

        Raises:
            ValueError: no prior is named and the CLIP is not the small CLIP (CLIPure-Diff on a real CLIP
                needs a prior over its embeddings; the paper's is DALL-E 2's, which cannot be loaded here).
        """
        from vlmdefense.workbench.embedding_prior import load_embedding_prior
        from vlmdefense.workbench.models import SMALL_CLIP

        if self.config.prior:
            return load_embedding_prior(self.config.prior, device=device)
        clip = self.clip
        if clip.name != SMALL_CLIP:
            raise ValueError(
                f"CLIPure-Diff on {clip.name} needs a diffusion prior over its image embeddings, given as a local "
                "folder in `prior`. The paper uses DALL-E 2's prior for ViT-L/14, which no installed library can "
                "load; the small prior exists only for the small CLIP. Use variant=cos on this profile."
            )
        return load_embedding_prior(None, clip=clip, device=device, recipe=self.prior_recipe())

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the frozen classifier, embed the blank prompts and (Diff) load the prior; nothing is learned."""
        self.bind(data.base)
        findings: dict[str, Any] = {"hyperparameters": self.hyperparameters()}
        if self.config.variant == "diff":
            if self.prior is None:
                self.attach_prior(self.load_prior(data.device))
            card = self._prior().card
            keys = ("model", "recipe_key", "sha256", "parameters", "train_seconds", "train_cpu_seconds")
            findings["prior"] = {k: card[k] for k in (*keys, "final_loss", "metrics") if k in card}
        return findings

    def _prior(self) -> EmbeddingPrior:
        if self.prior is None:
            raise RuntimeError("CLIPure-Diff: call fit (or attach_prior) before purifying")
        return self.prior

    def _blank(self, like: torch.Tensor) -> torch.Tensor:
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit before purifying")
        return F.normalize(self.blank_embedding.to(like.dtype), dim=-1)

    def prior_loss(self, embeddings: torch.Tensor, steps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising loss of the prior at the embeddings scaled to its space (``p_losses``)."""
        prior = self._prior()
        return prior.loss(embeddings * prior.scale, steps.to(embeddings.device), noise)

    def _descent(self, e: torch.Tensor, r: torch.Tensor, graph: bool) -> torch.Tensor:
        """CLIPure-Diff's direction −r·∇loss (w.r.t. the scaled embedding) at one random timestep, fresh noise."""
        cfg = self.config
        prior = self._prior()
        step = torch.randint(cfg.t_min, cfg.t_max + 1, ()).expand(len(e))  # one timestep per step, as official
        noise = torch.randn_like(e)
        graph = graph and e.requires_grad  # a surface called without gradients runs as the prediction does
        with torch.enable_grad():
            x = e if graph else e.detach().requires_grad_(True)
            scaled = x * prior.scale
            loss = prior.loss(scaled, step.to(e.device), noise).sum()
            (grad,) = torch.autograd.grad(loss, scaled, create_graph=graph)
        return -r * grad

    def purify(
        self,
        embeddings: torch.Tensor,
        steps: int | None = None,
        step_size: float | None = None,
        graph: str = "none",
    ) -> torch.Tensor:
        """The purified embeddings (N, D), each step ``u ← normalise(u + s · d/‖d‖)``, norm ``r`` kept.

        Cos: ``d`` is the gradient of the cosine to the blank embedding scaled by ``r`` (the tangent
        ``t − cos·u``). Diff: ``d`` is −r times the gradient of the prior's denoising loss at a random timestep
        in [t_min, t_max] (fresh noise), taken w.r.t. the scaled embedding as the official code does.
        ``graph``: ``none`` (no graph), ``official`` (each direction a constant, the rest differentiated) or
        ``full`` (every step differentiated, the directions included)."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        step_size = cfg.step_size if step_size is None else step_size
        if graph not in GRAPHS:
            raise ValueError(f"CLIPure: graph must be one of {GRAPHS}, not {graph!r}")
        e = embeddings if graph != "none" else embeddings.detach()
        t = self._blank(e)
        for _ in range(steps):
            r = e.norm(dim=-1, keepdim=True)
            u = e / r
            if cfg.variant == "cos":
                # gradient of cos(e, t) w.r.t. e is (t - cos u) / r; scaled by r it is the tangent t - cos u
                direction = t - (u * t).sum(dim=-1, keepdim=True) * u
            else:
                direction = self._descent(e, r, graph == "full")
            if graph == "official":
                direction = direction.detach()
            if cfg.norm_scope == "batch":
                norm = direction.norm().clamp_min(1e-12)
            else:
                norm = direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            u = F.normalize(u + step_size * direction / norm, dim=-1)
            e = r * u
        return e if graph != "none" else e.detach()

    def purify_with_official_graph(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The purification as the official evaluation differentiates it (each step's direction a constant,
        as ``autograd.grad`` without a graph makes it; norm, step and re-projection in the graph)."""
        return self.purify(embeddings, graph="official")

    def official_graph_surface(self) -> Predictor:
        """``images -> logits`` differentiated through :meth:`purify_with_official_graph` (diagnostic)."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            return base.logits_from_embeddings(self.purify_with_official_graph(base.embed(images)))

        return surface

    def blank_similarity(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of embeddings to the blank-template embedding."""
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit first")
        return F.cosine_similarity(embeddings, self.blank_embedding.to(embeddings.dtype).unsqueeze(0), dim=-1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        base = self._base()
        self.counter.images += len(images)
        self.counter.forward += len(images)  # purification needs no extra pass of the image tower
        with torch.no_grad():
            return base.logits_from_embeddings(self.purify(base.embed(images)))

    def surfaces(self) -> dict[str, Predictor]:
        """The adaptive surfaces keyed by :data:`SURFACES`; each forward is the defended pipeline's."""

        def full(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            return base.logits_from_embeddings(self.purify(base.embed(images), graph="full"))

        def bpda(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            embedding = base.embed(images)
            offset = (self.purify(embedding.detach()) - embedding.detach()).detach()
            return base.logits_from_embeddings(embedding + offset)

        return {"full": full, "bpda": bpda}

    def adaptive_surface_name(self) -> str:
        """The surface the config's ``adaptive`` names (``auto``: Cos ``bpda``, Diff ``full``)."""
        mode = str(self.config.adaptive)
        if mode == "auto":
            return "full" if self.config.variant == "diff" else "bpda"
        if mode not in SURFACES:
            raise ValueError(f"CLIPure: adaptive must be auto or one of {SURFACES}, not {mode!r}")
        return mode

    def attack_surface(self) -> Predictor:
        """The harness' adaptive surface (see :meth:`adaptive_surface_name`)."""
        return self.surfaces()[self.adaptive_surface_name()]


def rotation_per_step(step_size: float) -> float:
    """Degrees a normalised tangent step of ``step_size`` turns a unit vector (CLIPure's update)."""
    return math.degrees(math.atan(step_size))
