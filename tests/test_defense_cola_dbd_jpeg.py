"""Training-free input and feature purification: JPEG re-compression (with its differentiable
approximation), DBD and COLA, on the quick profile's scale."""

from __future__ import annotations

from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_free.cola import COLA, COLAConfig, sinkhorn_cost, text_subspace
from vlmdefense.defenses.training_free.common import TrainingFreeDefense
from vlmdefense.defenses.training_free.dbd import DBD, to_8bit
from vlmdefense.defenses.training_free.differentiable_jpeg import (
    CHROMA_TABLE,
    LUMA_TABLE,
    DifferentiableJPEG,
    cubic_round,
    dct_matrix,
    hard_round,
    pillow_jpeg,
    pillow_tables,
    quality_table,
)
from vlmdefense.defenses.training_free.jpeg_compression import JPEGCompression, approximation_bpda
from vlmdefense.workbench import harness

N = 12
T = TypeVar("T", bound=TrainingFreeDefense)


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("jpeg-compression", "quick")


@pytest.fixture(scope="session")
def batch(ctx: harness.Context) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.sets.test.images[:N], ctx.sets.test.labels[:N]


@pytest.fixture(scope="session")
def jpeg(ctx: harness.Context) -> JPEGCompression:
    defense = JPEGCompression.from_params(ctx.params)
    harness.fit(ctx, defense)
    assert isinstance(defense, JPEGCompression)
    return defense


# ---- JPEG ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quality", [10, 50, 75, 95])
def test_quantisation_tables_are_the_ones_pillow_writes(quality: int) -> None:
    tables = pillow_tables(quality)
    assert tables[0] == [int(v) for v in quality_table(LUMA_TABLE, quality).flatten()]
    assert tables[1] == [int(v) for v in quality_table(CHROMA_TABLE, quality).flatten()]


def test_dct_is_orthonormal_and_cubic_round_is_close_with_a_slope() -> None:
    d = dct_matrix()
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    y = cubic_round(x)
    assert (y - torch.round(x)).abs().max() <= 0.125 + 1e-6
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert (grad > 0).float().mean() > 0.9 and grad.max() <= 0.75 + 1e-5


def test_jpeg_path_quantises_with_the_real_codec(
    jpeg: JPEGCompression, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = batch
    compressed = jpeg.compress(x)
    assert compressed.shape == x.shape and not torch.allclose(compressed, x, atol=1 / 255)
    assert torch.equal(compressed, pillow_jpeg(x, 75))
    # idempotent up to the codec's rounding: a decoded JPEG re-encodes to (nearly) itself
    assert (pillow_jpeg(compressed, 75) - compressed).abs().mean() < (compressed - x).abs().mean()
    # lower quality removes more
    assert (pillow_jpeg(x, 10) - x).abs().mean() > (compressed - x).abs().mean()
    with torch.no_grad():
        assert torch.allclose(jpeg.predict(x), jpeg._base()(pillow_jpeg(x, 75)))


def test_approximation_is_close_to_the_codec(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = batch
    noisy = (x + torch.empty_like(x).uniform_(-8 / 255, 8 / 255, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    for images in (x, noisy, torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))):
        real = pillow_jpeg(images, 75)
        change = (real - images).abs().mean()
        for rounding in (hard_round, cubic_round):
            gap = (DifferentiableJPEG(75, rounding)(images) - real).abs().mean()
            assert gap < 0.2 * change, (rounding.__name__, float(gap * 255), float(change * 255))


def test_bpda_surfaces_forward_the_codec_and_pass_gradients(
    jpeg: JPEGCompression, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    with torch.no_grad():
        defended = jpeg.predict(x)
    grads = {}
    for name, surface in jpeg.surfaces().items():
        x_ = x.clone().requires_grad_(True)
        logits = surface(x_)
        assert torch.allclose(logits, defended, atol=1e-4), name
        (grads[name],) = torch.autograd.grad(F.cross_entropy(logits, y), x_)
        assert torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0
    # the identity surface's gradient is the base model's gradient at the compressed image
    c = jpeg.compress(x).requires_grad_(True)
    (at_compressed,) = torch.autograd.grad(F.cross_entropy(jpeg._base()(c), y), c)
    assert torch.allclose(grads["bpda-identity"], at_compressed, atol=1e-6)
    assert not torch.allclose(grads["bpda-approx"], grads["bpda-identity"], atol=1e-6)
    # BPDA with an approximation: its gradient is the approximation's own
    approx = DifferentiableJPEG(75)
    x_ = x.clone().requires_grad_(True)
    (via_bpda,) = torch.autograd.grad(approximation_bpda(jpeg.compress, approx)(x_).sum(), x_)
    x_ = x.clone().requires_grad_(True)
    (direct,) = torch.autograd.grad(approx(x_).sum(), x_)
    assert torch.allclose(via_bpda, direct)
    assert (
        jpeg.attack_surface is not None and JPEGCompression.from_params({"bpda": "identity"}).config.bpda == "identity"
    )
    with pytest.raises(ValueError):
        JPEGCompression.from_params({"bpda": "none"})


# ---- DBD -------------------------------------------------------------------------------------------


def fitted_fast(ctx: harness.Context, cls: type[T]) -> T:
    """``cls`` with its quick-profile budget, fitted on ``ctx``."""
    defense = cls.from_params({**ctx.params, "fast": True})
    harness.fit(ctx, defense)
    assert isinstance(defense, cls)
    return defense


@pytest.fixture(scope="session")
def dbd(ctx: harness.Context) -> DBD:
    return fitted_fast(ctx, DBD)


def test_dbd_copies_forward_the_real_operations(dbd: DBD, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = batch
    x8 = (x * 255).round() / 255
    views = dbd.views(x)
    cfg = dbd.config
    assert views.shape == (1 + dbd.n_views, *x.shape) and dbd.n_views == cfg.n_crops + 3 + 3 + cfg.n_noise + 3
    assert torch.equal(views[0], x8)
    on_grid = (views * 255 - (views * 255).round()).abs().max()
    assert on_grid < 1e-4  # every copy is an 8-bit image
    start = 1 + cfg.n_crops
    levels = (views[start : start + 3] * 255).round()
    assert ((levels % 32 == 0) | (levels == 255)).all()  # 3 bits: multiples of 32 (ceil clipped at 255)
    jpeg_start = start + 3
    for i, q in enumerate(dbd.qualities):
        assert torch.allclose(views[jpeg_start + i], pillow_jpeg(x8, q), atol=1e-6)
    median = views[-3]
    padded = F.pad(x8, (1, 1, 1, 1), mode="replicate")
    direct = F.unfold(padded, 3).view(len(x), 3, 9, 16, 16).median(dim=2).values
    assert torch.allclose(median, direct)


def test_dbd_correction_and_gate(dbd: DBD) -> None:
    torch.manual_seed(0)
    v, n, d, k = 1 + dbd.n_views, 3, 64, 10
    embeddings = F.normalize(torch.randn(v, n, d), dim=-1)
    logits = torch.randn(v, n, k)
    # image 0: every copy shifted the same way -> DB-score 1 -> amplified; image 1: independent shifts
    shift = torch.zeros(d)
    shift[0] = 0.3
    embeddings[1:, 0] = embeddings[0, 0] + shift
    embeddings[1:, 1] = embeddings[0, 1] + 0.1 * torch.randn(v - 1, d)
    corrected, score = dbd.correct(embeddings, logits)
    assert score[0] == pytest.approx(1.0, abs=1e-5) and score[1] < dbd.config.threshold
    assert torch.allclose(corrected[0], embeddings[0, 0] + dbd.config.alpha * shift, atol=1e-5)
    entropy = -(logits[1:].softmax(-1) * logits[1:].log_softmax(-1)).sum(-1)
    picked = entropy[:, 1].argsort()[: dbd.config.keep] + 1
    expected = embeddings[0, 1] + (embeddings[picked, 1] - embeddings[0, 1]).mean(0)
    assert torch.allclose(corrected[1], expected, atol=1e-5)


def test_dbd_predicts_randomly_and_its_surface_has_gradients(
    dbd: DBD, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    dbd.counter.forward = dbd.counter.backward = dbd.counter.images = 0
    with torch.no_grad():
        first, second = dbd.predict(x), dbd.predict(x)
    assert first.shape == (N, 10) and not torch.equal(first, second)  # fresh crops and noise per call
    assert dbd.counter.per_image() == (1 + dbd.n_views, 0)
    x_ = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(dbd.attack_surface()(x_), y), x_)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert DBD.randomized and DBD.kind == "inference"


# ---- COLA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cola(ctx: harness.Context) -> COLA:
    return fitted_fast(ctx, COLA)


def test_cola_projection_onto_the_text_span(cola: COLA, ctx: harness.Context) -> None:
    assert cola.basis is not None and cola.prompt_embeddings is not None
    u = cola.basis
    assert u.shape == (ctx.base.text_weights.shape[1], 10)
    assert torch.allclose(u.T @ u, torch.eye(10), atol=1e-5)
    # class embeddings lie in the subspace: projecting them changes nothing
    assert torch.allclose(cola.project(ctx.base.text_weights), ctx.base.text_weights, atol=1e-5)
    e = F.normalize(torch.randn(5, u.shape[0], generator=torch.Generator().manual_seed(0)), dim=-1)
    p = cola.project(e)
    residual = p * (e @ u @ u.T).norm(dim=-1, keepdim=True) - e
    assert torch.allclose(residual @ u, torch.zeros(5, 10), atol=1e-5)  # what is removed is orthogonal to the span
    assert text_subspace(ctx.base.text_weights, rank=3).shape[1] == 3


def test_sinkhorn_plan_marginals_and_uniform_costs() -> None:
    cost = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    transported = sinkhorn_cost(cost, eps=0.05, iters=200)
    assert transported.shape == (2, 3)
    # the transport cost lies between the cheapest and the mean coupling's cost
    assert (transported <= cost.mean(dim=(-2, -1)) + 1e-6).all() and (
        transported >= cost.amin(dim=(-2, -1)) - 1e-6
    ).all()
    # constant costs per row: every plan costs the same, the mean
    rows = torch.rand(5, 1).expand(5, 4)
    assert sinkhorn_cost(rows, eps=0.1, iters=50) == pytest.approx(float(rows.mean()), abs=1e-5)
    # large eps tends to the independent coupling (mean cost); small eps to the optimal assignment
    square = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert sinkhorn_cost(square, eps=0.01, iters=200) == pytest.approx(0.0, abs=1e-3)
    assert sinkhorn_cost(square, eps=100.0, iters=200) == pytest.approx(0.5, abs=1e-2)


def test_cola_one_view_without_projection_is_the_prompt_mean_classifier(
    cola: COLA, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    plain = COLA(COLAConfig(n_views=1, project=False))
    plain.bind(cola._base())
    assert plain.prompt_embeddings is not None
    with torch.no_grad():
        logits = plain.predict(x)
        e = cola._base().embed(to_8bit(x))
        expected = cola._base().logit_scale * (e @ plain.prompt_embeddings.mean(dim=1).T)
    assert torch.allclose(logits, expected, atol=1e-3)
    cola.counter.forward = cola.counter.images = 0
    with torch.no_grad():
        first, second = cola.predict(x), cola.predict(x)
    assert not torch.equal(first, second) and cola.counter.per_image() == (cola.config.n_views, 0)
    x_ = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(cola.attack_surface()(x_), y), x_)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert COLA.randomized and COLA.kind == "inference"
