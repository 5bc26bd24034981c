"""Optimizers and learning-rate schedules from the spec.

The schedule is a small closed-form function of (step, epoch) rather than a chain of torch schedulers:
warm-up followed by plateau or one-cycle does not compose with torch's `SequentialLR`, and a closed form
makes resume exact with a state of three numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from core.spec import OptimSpec, ScheduleSpec

WARMUP_START = 0.01  # warm-up starts at lr/100
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_PCT = 25.0, 1e4, 0.3  # torch OneCycleLR defaults
PLATEAU_MIN_DELTA = 1e-4  # Keras ReduceLROnPlateau default, absolute


def build_optimizer(groups: list[dict[str, Any]], spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer named by the spec over the given parameter groups (each with its own `lr`)."""
    wd = spec.weight_decay
    if spec.name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if spec.name == "sgd" else spec.momentum
        return torch.optim.SGD(groups, lr=spec.lr, momentum=momentum, nesterov=spec.name == "nesterov", weight_decay=wd)
    if spec.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=spec.lr, eps=spec.eps, weight_decay=wd)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=spec.lr, alpha=spec.alpha, eps=spec.eps, weight_decay=wd)
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=wd)


class Schedule:
    """Sets every group's lr to its base lr times a factor; `step()` per optimizer step, `epoch_end()` per epoch."""

    def __init__(self, spec: ScheduleSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
        self.spec, self.optimizer = spec, optimizer
        self.total = max(1, steps_per_epoch * epochs)
        self.steps_per_epoch = steps_per_epoch
        self.warmup = min(spec.warmup_epochs * steps_per_epoch, self.total - 1)
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
        self.plateau_factor, self.plateau_wait = 1.0, 0
        self.plateau_best: float | None = None
        self.static = spec.name in ("constant", "plateau") and self.warmup == 0  # lr changes only at epoch ends
        self._apply(0)

    def factor(self, step: int) -> float:
        """The multiplier of the base lr at a global optimizer step."""
        s, base_min = self.spec, self.spec.min_lr / max(self._top_lr(), 1e-12)
        if s.name == "onecycle":
            return self._onecycle(step)
        warm = 1.0
        if step < self.warmup:
            warm = WARMUP_START + (1 - WARMUP_START) * step / self.warmup
        t = max(0, step - self.warmup)
        if s.name == "step":
            return warm * s.gamma ** ((t // self.steps_per_epoch) // s.step_size)
        if s.name == "cosine":
            progress = min(1.0, t / max(1, self.total - 1 - self.warmup))  # the last step uses the final lr
            return warm * (base_min + (1 - base_min) * 0.5 * (1 + math.cos(math.pi * progress)))
        if s.name == "plateau":
            return warm * self.plateau_factor
        return warm

    def _onecycle(self, step: int) -> float:
        rise = self.warmup or max(1, int(ONECYCLE_PCT * self.total))
        lo, end = 1 / ONECYCLE_DIV, 1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        if step < rise:
            return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * step / rise))
        progress = min(1.0, (step - rise) / max(1, self.total - 1 - rise))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    def _top_lr(self) -> float:
        return max(g["base_lr"] for g in self.optimizer.param_groups)

    def apply(self, step: int) -> None:
        """Set the lr for the optimizer step that follows global step `step`."""
        if not self.static:
            self._apply(step)

    def _apply(self, step: int) -> None:
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = max(g["base_lr"] * f, self.spec.min_lr if self.spec.name == "plateau" else 0.0)

    def epoch_end(self, logs: dict[str, float]) -> None:
        """Keras ReduceLROnPlateau rule (reduce once `wait >= patience`, cooldown 0) for the plateau schedule."""
        current = logs.get(self.spec.monitor)
        if self.spec.name != "plateau" or current is None or not math.isfinite(current):
            return
        better = (
            (lambda a, b: a < b - PLATEAU_MIN_DELTA)
            if self.spec.monitor.endswith("loss")
            else (lambda a, b: a > b + PLATEAU_MIN_DELTA)
        )
        if self.plateau_best is None or better(current, self.plateau_best):
            self.plateau_best, self.plateau_wait = current, 0
            return
        self.plateau_wait += 1
        if self.plateau_wait >= self.spec.patience:
            self.plateau_factor *= self.spec.factor
            self.plateau_wait = 0
            self._apply(0)

    def lr(self) -> float:
        """The current learning rate of the last group (the head's)."""
        return float(self.optimizer.param_groups[-1]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.plateau_factor, "best": self.plateau_best, "wait": self.plateau_wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_factor, self.plateau_best, self.plateau_wait = state["factor"], state["best"], state["wait"]
        self._apply(0)
