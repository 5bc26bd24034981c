"""Early stopping with the exact semantics of Keras 3 `EarlyStopping` (see the module notes below).

- The improvement test is strict: `current + min_delta < best` for min, `current - min_delta > best` for max;
  NaN is never an improvement.
- `wait` counts monitored epochs since the last reset; the run stops when `wait >= patience`, never at the
  first epoch, and never on an improving epoch.
- With a baseline, the count resets only when an epoch beats both the best and the baseline.
- Epochs before `start_from_epoch` are ignored entirely.
- `restore_best_weights` restores the best epoch's weights when training ends, stopped early or not.
- Every epoch_end event carries `early_stopping/wait`, `early_stopping/patience` and `early_stopping/best` as they
  stand once that epoch is counted.
Epochs are 0-based inside this class, as in Keras; events and results speak 1-based epochs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from core.engine.callbacks import Callback, RunContext
from core.engine.events import EventKind
from core.spec import EarlyStoppingSpec


class EarlyStopping(Callback):
    def __init__(self, spec: EarlyStoppingSpec):
        self.spec = spec
        self.monitor = spec.monitor
        self.mode = spec.resolved_mode()
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: dict[str, torch.Tensor] | None = None

    def _is_improvement(self, current: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.mode == "min":
            return current + self.spec.min_delta < reference
        return current - self.spec.min_delta > reference

    def on_train_begin(self, ctx: RunContext) -> None:
        self._reset()  # a callback reused across runs starts clean (Keras #20533)

    def _counted(self, ctx: RunContext, logs: dict[str, float]) -> tuple[int, float | None, bool] | None:
        """(wait, best, improved) once the epoch that just ended is counted; None when it is not counted."""
        current = logs.get(self.monitor)
        epoch = ctx.epoch - 1  # Keras' 0-based index of the epoch that just ended
        if current is None or epoch < self.spec.start_from_epoch:
            return None
        if not self._is_improvement(current, self.best):
            return self.wait + 1, self.best, False
        if self.spec.baseline is None or self._is_improvement(current, self.spec.baseline):
            return 0, current, True
        return self.wait + 1, current, True

    def epoch_report(self, ctx: RunContext, logs: dict[str, float]) -> dict[str, Any]:
        wait, best, _ = self._counted(ctx, logs) or (self.wait, self.best, False)
        return {"early_stopping/wait": wait, "early_stopping/patience": self.spec.patience, "early_stopping/best": best}

    def on_epoch_end(self, ctx: RunContext, logs: dict[str, float]) -> None:
        counted = self._counted(ctx, logs)
        if counted is None:
            return
        epoch, current = ctx.epoch - 1, logs[self.monitor]
        if self.spec.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = _snapshot(ctx.model), epoch
        self.wait, self.best, improved = counted
        if improved:
            self.best_epoch = epoch
            if self.spec.restore_best_weights:
                self.best_weights = _snapshot(ctx.model)
            return
        if self.wait >= self.spec.patience and epoch > 0:
            self.stopped_epoch = epoch
            ctx.stop("early_stop")
            ctx.emit(EventKind.early_stop, self._numbers(current))

    def on_train_end(self, ctx: RunContext) -> None:
        if self.spec.restore_best_weights and self.best_weights is not None:
            ctx.model.load_state_dict(self.best_weights)
            restored = {"best_epoch": self.best_epoch + 1, "monitor": self.monitor, "best": self.best}
            ctx.emit(EventKind.restored, restored)

    def _numbers(self, current: float) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "current": _finite_or_none(current),
            "best": self.best,
            "best_epoch": self.best_epoch + 1,
            "stopped_epoch": self.stopped_epoch + 1,
            "wait": self.wait,
            "patience": self.spec.patience,
            "min_delta": self.spec.min_delta,
            "baseline": self.spec.baseline,
            "restore_best_weights": self.spec.restore_best_weights,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_weights = state["best_weights"]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
