"""A live terminal progress bar fed by engine events, used by `trickserve train` and `trickserve submit --watch`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from core.engine.callbacks import Callback, Event, RunContext


class ProgressBar(Callback):
    """Shows epoch, fraction of the epoch, losses, accuracies and early-stopping patience."""

    def __init__(self, name: str, epochs: int, console: Console | None = None):
        self.name, self.epochs = name, epochs
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )
        self.task = self.progress.add_task(name, total=epochs, epoch=0, epochs=epochs, metrics="")

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def on_event(self, ctx: RunContext | None, event: Event) -> None:
        self.show(event.kind, event.epoch, event.data)

    def show(self, kind: str, epoch: int, data: dict[str, Any]) -> None:
        """Update from one event, given as its parts (so streamed events work too)."""
        if kind == "progress":
            frac = data["step_in_epoch"] / max(1, data["steps_per_epoch"])
            self.progress.update(
                self.task,
                completed=epoch - 1 + frac,
                epoch=epoch,
                metrics=f"loss {_f(data.get('train/loss'))}  {data['samples_per_s']:.0f} samples/s",
            )
        elif kind == "epoch_end":
            self.progress.update(
                self.task,
                completed=epoch,
                epoch=epoch,
                metrics=_epoch_text(data),
                description=self.name + _patience_text(data),
            )
        elif kind == "early_stop":
            self.progress.console.print(
                f"early stop at epoch {data['stopped_epoch']}: {data['monitor']} did not improve for "
                f"{data['wait']} epochs (patience {data['patience']}); best {_f(data['best'])} "
                f"at epoch {data['best_epoch']}"
            )
        elif kind in ("diverged", "resumed", "warning"):
            self.progress.console.print(f"{kind}: {data}")


def _epoch_text(d: dict[str, Any]) -> str:
    parts = [f"{k} {_f(d.get(k))}" for k in ("train/loss", "train/acc", "val/loss", "val/acc") if k in d]
    return "  ".join(parts)


def _patience_text(d: dict[str, Any]) -> str:
    if "early_stopping/patience" not in d:
        return ""
    return f" (patience {d['early_stopping/wait']}/{d['early_stopping/patience']})"


def _f(v: float | None) -> str:
    return "nan" if v is None else f"{v:.4f}"
