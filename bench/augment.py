"""Engine Augmenter versus the equivalent kornia.augmentation pipeline, same batches, interleaved in one process.

Run: .venv/bin/python bench/augment.py [--device cpu|cuda] [--repeats 7] [--calls 10]
Prints a table and `augment_vs_kornia_speedup=<median>` (kornia time / engine time; above 1 means the engine is faster).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import kornia.augmentation as K
import torch
from torch import nn

from core.engine.augment import Augmenter
from core.spec import AugmentSpec

# Same parameters on both sides. kornia's crop `p` is one coin per batch, so the crop runs on
# every example (p=1) on both sides; kornia's ColorJiggle/RandomContrast defaults are no-ops, so ranges are explicit.
DEGREES, SCALE, RATIO, P = 15.0, (0.8, 1.0), (0.75, 1.3333), 0.5
BRIGHT, SAT, HUE, CONTRAST, STD = 0.2, 0.2, 0.02, (0.8, 1.2), 0.05
CASES = {"rgb 512x3x32x32": (512, 3, 32), "digits 512x1x8x8": (512, 1, 8)}


def engine_pipeline(channels: int) -> Augmenter:
    rgb = channels == 3
    spec = AugmentSpec.model_validate(
        {
            "crop": {"scale": SCALE, "ratio": RATIO, "p": 1.0},
            "rotate": {"degrees": DEGREES, "p": P},
            "flip": {"horizontal": True, "p": P},
            "color": {"brightness": BRIGHT, "saturation": SAT if rgb else 0, "hue": HUE if rgb else 0, "p": P},
            "contrast": {"range": CONTRAST, "p": P},
            "noise": {"std": STD, "p": P},
        }
    )
    return Augmenter(spec, "image", torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1))


def kornia_pipeline(channels: int, size: int) -> nn.Module:
    rgb = channels == 3
    return nn.Sequential(
        K.RandomResizedCrop((size, size), scale=SCALE, ratio=RATIO, p=1.0, same_on_batch=False),
        K.RandomRotation(degrees=DEGREES, p=P, same_on_batch=False),
        K.RandomHorizontalFlip(p=P, same_on_batch=False),
        K.ColorJiggle(brightness=BRIGHT, saturation=SAT if rgb else 0.0, hue=HUE if rgb else 0.0, p=P),
        K.RandomContrast(contrast=CONTRAST, clip_output=False, p=P, same_on_batch=False),
        K.RandomGaussianNoise(std=STD, p=P, same_on_batch=False),
    )


def seconds_per_call(fn, x: torch.Tensor, calls: int) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    runs = {}  # case -> (batch, engine fn, kornia fn)
    for case, (b, c, s) in CASES.items():
        engine = engine_pipeline(c)
        gen = torch.Generator(device).manual_seed(0)
        runs[case] = (torch.rand(b, c, s, s, device=device), functools.partial(engine, generator=gen),
                      kornia_pipeline(c, s).to(device))  # fmt: skip
        for fn in runs[case][1:]:  # warm-up: allocator, kernels, kornia's lazy set-up
            seconds_per_call(fn, runs[case][0], 3)
    times = {(case, side): [] for case in CASES for side in ("engine", "kornia")}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both sides alike
        for case, (x, run_engine, run_kornia) in runs.items():
            times[case, "engine"].append(seconds_per_call(run_engine, x, args.calls))
            times[case, "kornia"].append(seconds_per_call(run_kornia, x, args.calls))
    print(f"{'case':<20}{'engine ms':>11}{'kornia ms':>11}{'speedup':>9}")
    for case in CASES:
        e, k = times[case, "engine"], times[case, "kornia"]
        speedup = statistics.median(b / a for a, b in zip(e, k, strict=True))
        print(f"{case:<20}{1e3 * statistics.median(e):>11.3f}{1e3 * statistics.median(k):>11.3f}{speedup:>8.2f}x")
    # Headline: per repeat, kornia's time over the engine's for the whole workload (all cases), then the median.
    ratios = [
        sum(times[c, "kornia"][r] for c in CASES) / sum(times[c, "engine"][r] for c in CASES)
        for r in range(args.repeats)
    ]
    print(f"augment_vs_kornia_speedup={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
