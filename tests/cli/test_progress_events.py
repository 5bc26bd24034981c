"""The terminal progress bar shows what the event stream says, for a local run and a watched job alike."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from cli.progress import ProgressBar
from core.engine import train
from core.spec import JobSpec


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
    spec = JobSpec.model_validate({
        "data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 200, "n_features": 8, "n_classes": 2}},
        "model": {"arch": "mlp", "layers": [8]},
        "train": {"epochs": 30, "early_stopping": {"monitor": "val/loss", "patience": 1, "min_delta": 100.0}},
        "resources": {"device": "cpu"},
    })
    out = io.StringIO()
    with ProgressBar(spec.name, spec.train.epochs, console=Console(file=out, width=120)) as bar:
        result = train(spec, [bar])
    assert result.epochs_run == 2 and "(patience 1/1)" in out.getvalue()
