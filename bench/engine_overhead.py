"""Engine vs a plain hand-written PyTorch loop: same data, model, init, optimizer, batch size, per-epoch validation.

Both runs are interleaved in one process, several repeats; each side's time per epoch is measured between
consecutive epoch ends (first epoch dropped as warm-up). The plain loop does the same useful work the engine
reports: train loss and accuracy summed on the device, and a validation pass every epoch.

    python bench/engine_overhead.py [--repeats 7] [--epochs 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from core.engine import Callback, train
from core.engine.data import load_data
from core.engine.init import initialize
from core.engine.models import build_model
from core.spec import JobSpec

WORKLOADS = {
    "mnist1d-cnn": {
        "data": {"dataset": "builtin:mnist1d", "normalize": "none"},
        "model": {"arch": "cnn", "conv": [{"channels": 25, "kernel": 5, "stride": 2, "padding": 1},
                                          {"channels": 25, "kernel": 3, "stride": 2, "padding": 1},
                                          {"channels": 25, "kernel": 3, "stride": 2, "padding": 1}],
                  "batch_norm": False},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"batch_size": 100},
    },
    "digits-cnn": {
        "data": {"dataset": "builtin:digits"},
        "model": {"arch": "cnn", "layers": [32, 64], "hidden": [128], "dropout": 0.3},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"batch_size": 64},
    },
}


class EpochClock(Callback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_epoch_end(self, ctx, logs) -> None:
        self.marks.append(time.perf_counter())


def per_epoch(marks: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(marks, marks[1:], strict=False))


def run_engine(spec: JobSpec) -> float:
    clock = EpochClock()
    train(spec, [clock], device="cpu")
    return per_epoch(clock.marks)


def run_plain(spec: JobSpec) -> float:
    torch.manual_seed(spec.train.seed)
    data = load_data(spec.data, "cpu")
    model = build_model(spec.model, data.input_shape, data.n_classes)
    initialize(model, spec.model)
    opt = torch.optim.Adam(model.parameters(), lr=spec.optim.lr)
    gen = torch.Generator().manual_seed(spec.train.seed)
    n, bs, marks = data.x_train.shape[0], spec.train.batch_size, []
    for _ in range(spec.train.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        sums = torch.zeros(3)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            x, y = data.x_train[idx], data.y_train[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                sums += torch.stack((loss * y.shape[0], (logits.argmax(1) == y).sum(), torch.tensor(float(len(y)))))
        model.eval()
        with torch.inference_mode():
            logits = model(data.x_val)
            val = (F.cross_entropy(logits, data.y_val).item(), (logits.argmax(1) == data.y_val).float().mean().item())
        _ = sums.tolist(), val
        marks.append(time.perf_counter())
    return per_epoch(marks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    ratios: list[float] = []
    print(f"{'workload':<14}{'repeat':>7}{'plain s/epoch':>15}{'engine s/epoch':>16}{'ratio':>8}")
    for name, body in WORKLOADS.items():
        spec = JobSpec.model_validate({**body, "train": {**body["train"], "epochs": args.epochs}})
        run_engine(spec), run_plain(spec)  # warm caches (dataset generation, allocator) before measuring
        for r in range(args.repeats):
            first_plain = r % 2 == 0  # alternate the order so drift on a noisy machine hits both sides
            t_plain = run_plain(spec) if first_plain else None
            t_engine = run_engine(spec)
            t_plain = t_plain if t_plain is not None else run_plain(spec)
            ratios.append(t_plain / t_engine)
            print(f"{name:<14}{r:>7}{t_plain:>15.4f}{t_engine:>16.4f}{t_plain / t_engine:>8.3f}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median over {len(ratios)} pairs")
    print(f"engine_vs_plain_throughput_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
