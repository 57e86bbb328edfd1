"""Hierarchically Robust VLM — adversarial fine-tuning over a class hierarchy in hyperbolic space
(Dong et al., CVPR 2026).

The classes are the leaves of one or more class trees (root-to-leaf paths; WordNet in the paper, here
hand-written trees over the digits, :data:`DIGIT_TREES`). Text and image embeddings are mapped into the
Poincaré ball (curvature 1) by the exponential map at the origin, where the norm encodes depth:

* a leaf class sits at ``exp₀(ρ·t_c)``, ``t_c`` its unit (prompt-ensembled, frozen) text embedding;
  a parent is the gyromidpoint (hyperbolic average) of its children, which lies closer to the origin;
* the image embedding is placed at each level's depth: ``exp₀(r_ℓ·f̂)``, ``r_ℓ`` the mean tangent norm
  of that level's nodes.

At every level of every tree, the logits of an image are its negative hyperbolic distances to the
level's nodes over a temperature, with the nodes of the next finer level outside the image's ancestor as
extra negatives; the training label is the image's ancestor at that level. The objective is
the level-weighted sum of these cross-entropies plus ``lambda_align`` times the distance of the leaf-level
image point to its class; PGD maximises it (one perturbation against every level's margin at once) and
the image tower is fine-tuned to minimise it on the shared loop. Inference: the plain zero-shot
classifier (at equal radii the leaf level ranks classes as the cosine does).

No code has been released; the trees, radii, temperature and weights are assumptions (catalog entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData

Tree = list[list[list[int]]]
"""A class tree as its levels below the root, coarse to fine: each level a list of nodes, each node the
leaf classes under it (the last level holds one node per class)."""

DIGIT_TREES: dict[str, Tree] = {
    # parity, then the residue modulo 4, then the digit
    "parity": [
        [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]],
        [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]],
        [[d] for d in range(10)],
    ],
    # digits written with a closed loop or with open strokes only, then the digit
    "shape": [[[0, 4, 6, 8, 9], [1, 2, 3, 5, 7]], [[d] for d in range(10)]],
}


# ---- the Poincaré ball (curvature 1) -------------------------------------------------------------------

MAX_NORM = 1.0 - 1e-5


def project(x: torch.Tensor) -> torch.Tensor:
    """Points pulled back inside the ball (norm below ``MAX_NORM``)."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-15)
    return torch.where(norm > MAX_NORM, x / norm * MAX_NORM, x)


def expmap0(v: torch.Tensor) -> torch.Tensor:
    """The exponential map at the origin: tangent vectors → points of the ball."""
    norm = v.norm(dim=-1, keepdim=True).clamp_min(1e-15)
    return project(torch.tanh(norm) * v / norm)


def tangent_norm(x: torch.Tensor) -> torch.Tensor:
    """``artanh(‖x‖)``: the norm of ``x``'s tangent vector at the origin (half its distance to it)."""
    return torch.atanh(x.norm(dim=-1).clamp(max=MAX_NORM))


def mobius_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Möbius addition ``x ⊕ y`` (broadcasting)."""
    xy = (x * y).sum(dim=-1, keepdim=True)
    x2 = x.pow(2).sum(dim=-1, keepdim=True)
    y2 = y.pow(2).sum(dim=-1, keepdim=True)
    return ((1 + 2 * xy + y2) * x + (1 - x2) * y) / (1 + 2 * xy + x2 * y2).clamp_min(1e-15)


def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hyperbolic distance ``2·artanh(‖(−x) ⊕ y‖)`` (broadcasting)."""
    return 2 * torch.atanh(mobius_add(-x, y).norm(dim=-1).clamp(max=MAX_NORM))


def gyromidpoint(points: torch.Tensor) -> torch.Tensor:
    """The gyromidpoint (hyperbolic average) of ``points`` ``(n, d)``: ``½ ⊗ Σλᵢxᵢ / Σ(λᵢ − 1)`` with
    the conformal factors ``λ = 2 / (1 − ‖x‖²)``."""
    lam = 2.0 / (1.0 - points.pow(2).sum(dim=-1, keepdim=True))
    mean = (lam * points).sum(dim=0) / (lam - 1).sum(dim=0)
    norm = mean.norm().clamp_min(1e-15)
    return project(torch.tanh(0.5 * torch.atanh(norm.clamp(max=MAX_NORM))) * mean / norm)


# ---- the hierarchy ---------------------------------------------------------------------------------------


@dataclass
class Hierarchy:
    """One tree's node points per level and each class's ancestor index per level."""

    nodes: list[torch.Tensor]  # per level (nodes, d), coarse to fine
    ancestors: list[torch.Tensor]  # per level (classes,): the index of each class's node at that level
    radii: list[float]  # per level: the mean tangent norm of its nodes
    parents: list[torch.Tensor]  # per level (nodes,): each node's parent index one level up (-1 at the top)


def build_hierarchy(text: torch.Tensor, tree: Tree, leaf_radius: float) -> Hierarchy:
    """Leaves at ``exp₀(leaf_radius·t_c)``; every coarser node the gyromidpoint of its children."""
    n_classes = len(text)
    leaves = tree[-1]
    if sorted(c for node in leaves for c in node) != list(range(n_classes)) or any(len(n) != 1 for n in leaves):
        raise ValueError("the last level of a tree must hold one node per class")
    leaf_points = expmap0(leaf_radius * F.normalize(text, dim=-1))
    points = torch.stack([leaf_points[node[0]] for node in leaves])
    nodes = [points]
    for level in reversed(tree[:-1]):
        finer = tree[len(tree) - len(nodes)]
        children = [[j for j, child in enumerate(finer) if set(child) <= set(node)] for node in level]
        if any(not c for c in children) or sorted(j for c in children for j in c) != list(range(len(finer))):
            raise ValueError("every node's classes must be the union of some nodes of the next level")
        points = torch.stack([gyromidpoint(nodes[0][c]) for c in children])
        nodes.insert(0, points)
    ancestors = []
    for level in tree:
        index = torch.empty(n_classes, dtype=torch.long)
        for k, node in enumerate(level):
            index[node] = k
        ancestors.append(index.to(text.device))
    parents = [torch.full((len(tree[0]),), -1, dtype=torch.long, device=text.device)]
    for depth in range(1, len(tree)):
        parents.append(torch.stack([ancestors[depth - 1][node[0]] for node in tree[depth]]))
    return Hierarchy(nodes, ancestors, [float(tangent_norm(p).mean()) for p in nodes], parents)


def level_logits(features: torch.Tensor, hierarchy: Hierarchy, level: int, temperature: float) -> torch.Tensor:
    """Negative distances over ``temperature`` from the image placed at ``level``'s depth to the nodes
    of that level, then to the nodes of the next finer level (extra negatives; none at the leaves)."""
    image = expmap0(hierarchy.radii[level] * F.normalize(features, dim=-1))
    candidates = hierarchy.nodes[level : level + 2]
    return -distance(image[:, None, :], torch.cat(candidates)[None, :, :]) / temperature


def level_loss(
    features: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, level: int, temperature: float
) -> torch.Tensor:
    """Cross-entropy at ``level`` with the image's ancestor as the label; on the finer level only the
    nodes outside that ancestor are negatives (its own descendants are masked)."""
    logits = level_logits(features, hierarchy, level, temperature)
    target = hierarchy.ancestors[level][labels]
    if level + 1 < len(hierarchy.nodes):
        own = len(hierarchy.nodes[level])
        descendant = hierarchy.parents[level + 1][None, :] == target[:, None]
        mask = torch.cat([torch.zeros(len(labels), own, dtype=torch.bool, device=logits.device), descendant], 1)
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, target)


@dataclass
class HierRobustConfig(FineTuneConfig):
    """The fine-tuning budget plus the hierarchy.

    Attributes:
        trees: names of :data:`DIGIT_TREES` to align over (several trees sharing the leaves).
        leaf_radius: tangent norm of the leaf class points (their point norm is ``tanh`` of it).
        temperature: of the distance logits.
        lambda_align: weight of the leaf-level distance between the image and its class text.
        train_text: the hierarchy needs every class name (images still come from the seen classes).
    """

    trees: list[str] = field(default_factory=lambda: ["parity", "shape"])
    leaf_radius: float = 1.0
    temperature: float = 0.1
    lambda_align: float = 0.1
    train_text: str = "all"


class HierRobust(AdversarialFineTuning):
    """Hierarchically robust adversarial fine-tuning: every level of every class tree at once."""

    id = "hier-robust"
    config_class: ClassVar[type] = HierRobustConfig
    config: HierRobustConfig

    def __init__(self, config: HierRobustConfig | None = None) -> None:
        super().__init__(config)
        unknown = [t for t in self.config.trees if t not in DIGIT_TREES]
        if unknown or not self.config.trees:
            raise ValueError(f"unknown trees {unknown}: use some of {sorted(DIGIT_TREES)}")
        if self.config.train_text != "all":
            raise ValueError("the class hierarchy needs every class name: train_text must be 'all'")
        self.hierarchies: dict[str, Hierarchy] = {}

    def build(self, data: FitData) -> None:
        """The hierarchies over the frozen class text embeddings."""
        text = data.base.text_weights
        if len(text) != 10:
            raise ValueError("the digit trees need the ten digit classes")
        self.hierarchies = {
            name: build_hierarchy(text, DIGIT_TREES[name], self.config.leaf_radius) for name in self.config.trees
        }

    def fit(self, data: FitData) -> dict[str, Any]:
        """Build the hierarchies, then fine-tune the image tower on every level at once."""
        self.build(data)
        out = super().fit(data)
        out["hierarchy"] = {
            name: {
                "nodes_per_level": [len(n) for n in h.nodes],
                "tangent_radius_per_level": [round(r, 4) for r in h.radii],
            }
            for name, h in self.hierarchies.items()
        }
        return out

    def restore(self, data: FitData, state: dict[str, torch.Tensor]) -> None:
        """Take the image tower of an earlier :meth:`fit`; the hierarchies are rebuilt (deterministic)."""
        self.build(data)
        super().restore(data, state)

    @staticmethod
    def weights(levels: int) -> list[float]:
        """The level weights of a tree with ``levels`` levels: equal, summing to one."""
        return [1.0 / levels] * levels

    def hierarchical_loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The level-weighted cross-entropies of every tree (averaged over trees) and the alignment term;
        ``labels`` are class indices."""
        c = self.config
        total = features.new_zeros(())
        parts: dict[str, float] = {}
        for name, hierarchy in self.hierarchies.items():
            levels = len(hierarchy.nodes)
            for level, weight in enumerate(self.weights(levels)):
                loss = level_loss(features, labels, hierarchy, level, c.temperature)
                total = total + weight * loss / len(self.hierarchies)
                parts[f"{name}_level{level}"] = loss.item()
        first = next(iter(self.hierarchies.values()))
        image = expmap0(first.radii[-1] * F.normalize(features, dim=-1))
        align = distance(image, first.nodes[-1][first.ancestors[-1][labels]]).mean()
        parts["align"] = align.item()
        return total + c.lambda_align * align, parts

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return self.hierarchical_loss(self._features(x_adv), batch["labels"])[0]

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.hierarchical_loss(self._features(x_adv), batch["labels"])


def superclass_robustness(
    defense: HierRobust, data: FitData, tree: str = "parity", steps: int | None = None
) -> dict[str, Any]:
    """Accuracy of the coarsest level of ``tree`` (a class's superclass: the one whose leaves get the
    most zero-shot probability), clean and under L∞ PGD at the headline ε that maximises the superclass
    cross-entropy — the attack on superclasses that flat fine-tuning leaves open — for the original and
    the fine-tuned model, on seen and unseen test digits."""
    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.data import seen_mask
    from vlmdefense.workbench.models import set_seed

    assert defense.classifier is not None
    level = DIGIT_TREES[tree][0]
    member = torch.zeros(len(level), 10, device=data.sets.test.images.device)
    for k, node in enumerate(level):
        member[k, node] = 1.0
    parent = torch.empty(10, dtype=torch.long, device=member.device)
    for k, node in enumerate(level):
        parent[node] = k
    test = data.sets.test
    truth = parent[test.labels]
    mask = seen_mask(test.labels.cpu(), data.prompts.seen_classes).to(member.device)
    attack = PGD(eps=data.headline.value, steps=data.sweep_steps if steps is None else steps)
    out: dict[str, Any] = {"tree": tree, "eps": data.headline.display, "attack": attack.name}
    for name, model in (("original", data.base), ("fine_tuned", defense.classifier)):

        def superclass_logits(x: torch.Tensor, model: Any = model) -> torch.Tensor:
            return torch.log(F.softmax(model(x), dim=-1) @ member.T + 1e-12)

        set_seed(data.seed)
        x_adv = attack(superclass_logits, test.images, truth)
        with torch.no_grad():
            clean = superclass_logits(test.images).argmax(-1) == truth
            robust = superclass_logits(x_adv).argmax(-1) == truth
        out[name] = {
            split: {
                "clean": round(100 * clean[m].float().mean().item(), 2),
                "robust": round(100 * robust[m].float().mean().item(), 2),
            }
            for split, m in (("seen", mask), ("unseen", ~mask))
        }
    return out
