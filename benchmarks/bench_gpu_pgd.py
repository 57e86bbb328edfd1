"""Benchmark: PGD throughput on CLIP ViT-B/32 at 224 px against its floor, in fp32 and bf16.

Run on a GPU machine (one command, a few minutes):

    python benchmarks/bench_gpu_pgd.py                      # cuda, batch 256, PGD-10, random weights
    python benchmarks/bench_gpu_pgd.py --pretrained openai  # the real weights (downloads them once)
    python benchmarks/bench_gpu_pgd.py --device cpu --batch 4 --steps 2 --repeats 1   # a dry run anywhere

For each precision it prints the images/s of the workbench's PGD through the zero-shot classifier, the floor
(``steps`` forward+backward passes of the same batch, measured in the same run), their ratio (goal <= 1.15: the
attack adds little beyond the passes it needs), and the bf16/fp32 speed-up. Random weights time the same as real
ones; nothing is downloaded unless ``--pretrained`` names a tag.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def precision(device: str, name: str) -> Iterator[None]:
    if name == "bf16":
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def main() -> None:
    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.data import PromptSpec
    from vlmdefense.workbench.evaluation import ZeroShotClassifier
    from vlmdefense.workbench.models import load_clip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="open_clip tag (e.g. openai); default: random weights")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no GPU here: pass --device cpu for a dry run")
    torch.manual_seed(0)
    clip = load_clip(args.model, args.pretrained, device=args.device)
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    model = ZeroShotClassifier(clip, PromptSpec(names, ("a photo of a {name}.",), ())).to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    size = clip.image_size
    images = torch.rand(args.batch, 3, size, size, device=args.device)
    labels = torch.randint(0, len(names), (args.batch,), device=args.device)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    weights = args.pretrained or "random weights"
    print(f"{args.model} ({weights}) at {size} px on {device_name}: batch {args.batch}, PGD-{args.steps}")
    speed: dict[str, float] = {}
    for name in args.precisions.split(","):

        def floor(name: str = name) -> None:
            x = images.clone().requires_grad_(True)
            for _ in range(args.steps):
                with precision(args.device, name):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
                (grad,) = torch.autograd.grad(loss, x)
                x = (x.detach() + 1e-3 * grad.sign()).requires_grad_(True)

        def attack(name: str = name) -> None:
            with precision(args.device, name):
                PGD(eps=4 / 255, steps=args.steps)(model, images, labels)

        floor_s = timed(floor, args.device, args.repeats)
        pgd_s = timed(attack, args.device, args.repeats)
        speed[name] = args.batch / pgd_s
        print(
            f"{name:>5}: PGD {args.batch / pgd_s:9.1f} images/s | floor {args.batch / floor_s:9.1f} images/s | "
            f"PGD / floor time {pgd_s / floor_s:5.2f} (goal <= 1.15)"
        )
    if "fp32" in speed and "bf16" in speed:
        print(f"bf16 / fp32 PGD throughput: {speed['bf16'] / speed['fp32']:.2f}x")


if __name__ == "__main__":
    main()
