"""Benchmark: our PGD-10 against torchattacks.PGD and against its floor, on one model and batch.

Run: python benchmarks/bench_attacks.py [--repeats 5] [--batch 360]
Prints images/s of both, their ratio (goal >= 1.0), and our PGD-10 time divided by 10 forward+backward
passes of the image tower (the floor; goal <= 1.15). All figures are measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.manual_seed(0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    import torchattacks

    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.data import digit_prompts, load_digits_split
    from vlmdefense.workbench.evaluation import ZeroShotClassifier
    from vlmdefense.workbench.models import SMALL_CLIP, configure_threads, load_clip

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=360)
    args = parser.parse_args()
    configure_threads()
    model = ZeroShotClassifier(load_clip(SMALL_CLIP, device="cpu"), digit_prompts())
    for p in model.parameters():
        p.requires_grad_(False)
    _, test = load_digits_split(16)
    x, y = test.images[: args.batch], test.labels[: args.batch]
    eps, alpha, steps = 4 / 255, 1 / 255, 10

    ours = PGD(eps=eps, steps=steps, alpha=alpha)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)

    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)  # PGD's inputs are perturbed images

    def floor() -> None:
        for _ in range(steps):
            xi = start.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xi), y, reduction="sum")
            torch.autograd.grad(loss, xi)

    for fn in (lambda: ours(model, x, y), lambda: theirs(x, y), floor):  # warm-up
        fn()
    t_ours, m_ours = best_of(lambda: ours(model, x, y), args.repeats)
    t_theirs, m_theirs = best_of(lambda: theirs(x, y), args.repeats)
    t_floor, _ = best_of(floor, args.repeats)
    n = len(y)
    print(f"batch {n} images, {torch.get_num_threads()} threads, best of {args.repeats} (median in brackets)")
    print(f"ours PGD-10:          {n / t_ours:8.1f} images/s ({n / m_ours:.1f})")
    print(f"torchattacks PGD-10:  {n / t_theirs:8.1f} images/s ({n / m_theirs:.1f})")
    print(f"speed ratio ours / torchattacks: {t_theirs / t_ours:.3f}  (goal >= 1.0)")
    print(f"ours / floor (10 x forward+backward): {t_ours / t_floor:.3f}  (goal <= 1.15)")


if __name__ == "__main__":
    main()
