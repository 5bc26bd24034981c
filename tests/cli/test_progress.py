"""The progress bar of `trickserve train` and `submit --watch`, fed events as the stream delivers them: what the
terminal shows."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from cli.progress import ProgressBar
from core.engine import train
from core.spec import JobSpec


def bar() -> tuple[ProgressBar, io.StringIO]:
    screen = io.StringIO()
    return ProgressBar("digits-mlp", 5, console=Console(file=screen, force_terminal=False, width=150)), screen


def last_frame(bar: ProgressBar) -> str:
    """The bar as it is drawn now."""
    screen = io.StringIO()
    Console(file=screen, force_terminal=False, width=150).print(bar.progress.get_renderable())
    return screen.getvalue()


def test_epoch_end_shows_the_epoch_and_its_train_and_val_metrics():
    progress, _ = bar()
    progress.show("epoch_end", 2, {"train/loss": 0.71234, "train/acc": 0.8, "val/loss": 0.912, "val/acc": 0.75,
                                   "lr": 0.001})  # fmt: skip
    frame = last_frame(progress)
    assert "digits-mlp" in frame and "epoch 2/5" in frame
    assert "train/loss 0.7123  train/acc 0.8000  val/loss 0.9120  val/acc 0.7500" in frame
    assert "lr" not in frame.split("digits-mlp", 1)[1]  # only losses and accuracies
    assert progress.progress.tasks[0].completed == 2


def test_a_missing_validation_split_shows_only_what_there_is():
    progress, _ = bar()
    progress.show("epoch_end", 1, {"train/loss": 0.5, "train/acc": 0.9})
    frame = last_frame(progress)
    assert "train/loss 0.5000  train/acc 0.9000" in frame and "val/" not in frame


def test_progress_shows_the_fraction_of_the_epoch_the_running_loss_and_the_speed():
    progress, _ = bar()
    progress.show("progress", 3, {"step_in_epoch": 5, "steps_per_epoch": 20, "train/loss": 0.25,
                                  "samples_per_s": 1234.4})  # fmt: skip
    frame = last_frame(progress)
    assert "epoch 3/5" in frame and "loss 0.2500  1234 samples/s" in frame
    assert progress.progress.tasks[0].completed == 2.25


def test_early_stop_prints_a_line_with_the_monitor_patience_and_best():
    progress, screen = bar()
    with progress:
        progress.show("epoch_end", 4, {"train/loss": 0.3, "val/loss": 0.6})
        progress.show("early_stop", 4, {"stopped_epoch": 4, "monitor": "val/loss", "wait": 2, "patience": 2,
                                        "best": 0.55, "best_epoch": 2})  # fmt: skip
        progress.show("status", 4, {"from": "running", "to": "early_stopped"})  # not for the bar: nothing shown
    assert (
        "early stop at epoch 4: val/loss did not improve for 2 epochs (patience 2); best 0.5500 at epoch 2"
        in screen.getvalue()
    )
    assert "early_stopped" not in screen.getvalue()


def test_warnings_and_resumes_are_printed():
    progress, screen = bar()
    with progress:
        progress.show("resumed", 3, {"from_epoch": 3})
        progress.show("warning", 3, {"message": "loss is nan"})
    assert (
        "resumed: {'from_epoch': 3}" in screen.getvalue() and "warning: {'message': 'loss is nan'}" in screen.getvalue()
    )


# ------------------------------------------------------------------------------- early-stopping patience


def render(events: list[tuple[str, int, dict[str, Any]]]) -> str:
    """The bar's last frame after these events, given as `trickserve submit --watch` reads them from SSE."""
    out = io.StringIO()
    with ProgressBar("digits", 5, console=Console(file=out, width=120)) as bar:
        for kind, epoch, data in events:
            bar.show(kind, epoch, data)
    return out.getvalue()


def epoch_end(wait: int) -> dict[str, Any]:
    return {"val/loss": 0.5, "early_stopping/wait": wait, "early_stopping/patience": 3, "early_stopping/best": 0.4}


def test_streamed_epochs_show_the_early_stopping_patience():
    text = render([("epoch_end", 1, epoch_end(0)), ("epoch_end", 2, epoch_end(2))])
    assert "digits (patience 2/3)" in text and "epoch 2/5" in text and "val/loss 0.5000" in text


def test_no_patience_without_early_stopping():
    assert "patience" not in render([("epoch_end", 1, {"val/loss": 0.5})])


def test_a_local_run_shows_the_patience_its_last_epoch_left():
    spec = JobSpec.model_validate(
        {
            "data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 200, "n_features": 8, "n_classes": 2}},
            "model": {"arch": "mlp", "layers": [8]},
            "train": {"epochs": 30, "early_stopping": {"monitor": "val/loss", "patience": 1, "min_delta": 100.0}},
            "resources": {"device": "cpu"},
        }
    )
    out = io.StringIO()
    with ProgressBar(spec.name, spec.train.epochs, console=Console(file=out, width=120)) as bar:
        result = train(spec, [bar])
    assert result.epochs_run == 2 and "(patience 1/1)" in out.getvalue()
