"""`trickserve train` end to end in a process of its own, and `trickserve validate`: what a user sees on the
terminal and finds in the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from cli import main as cli

REPO = Path(__file__).resolve().parents[2]

TINY = """\
name: tiny-cli
data:
  dataset: builtin:synthetic
  synthetic: {n_samples: 300, n_features: 8, n_classes: 3}
model: {arch: mlp, layers: [16]}
train:
  epochs: 3
  batch_size: 32
  early_stopping: {monitor: val_loss, patience: 1}
resources: {device: cpu}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def trickserve(*argv: str) -> subprocess.CompletedProcess[str]:
    """`trickserve ARGV...` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def read_result(out: Path) -> dict[str, Any]:
    return json.loads((out / "result.json").read_text())


def test_train_writes_a_complete_run_directory_and_resuming_a_finished_run_changes_nothing(tmp_path: Path):
    spec, out = write(tmp_path, TINY), tmp_path / "run"
    done = trickserve("train", spec, "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = read_result(out)
    assert result["status"] in ("succeeded", "early_stopped") and 1 <= result["epochs_run"] <= 3
    assert [h["epoch"] for h in result["history"]] == list(range(1, result["epochs_run"] + 1))
    assert {"train/loss", "val/loss", "val/acc", "test/loss", "test/acc"} <= set(result["metrics"])
    assert done.stdout.startswith(f"{result['status']} after {result['epochs_run']} epochs")
    assert f"test/acc={result['metrics']['test/acc']:.4f}" in done.stdout
    assert "NO_RESTORE_BEST" in done.stderr  # the advice comes first, on stderr
    assert load_file(out / "model.safetensors")["head.weight"].shape == (3, 16)
    assert (out / "checkpoint.pt").stat().st_size > 0
    assert json.loads((out / "spec.json").read_text())["name"] == "tiny-cli"

    again = trickserve("train", spec, "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stderr
    resumed = read_result(out)
    assert resumed["epochs_run"] == result["epochs_run"] and resumed["history"] == result["history"]
    assert resumed["metrics"]["test/acc"] == result["metrics"]["test/acc"]


def test_resume_without_a_checkpoint_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as refused:
        cli.main(["train", write(tmp_path, TINY), "--out", str(tmp_path / "new"), "--resume"])
    assert "nothing to resume" in str(refused.value) and "checkpoint.pt" in str(refused.value)


def test_train_with_a_bad_spec_exits_non_zero_naming_the_field(tmp_path: Path):
    bad = TINY.replace("patience: 1", "patience: -1")
    refused = trickserve("train", write(tmp_path, bad), "--out", str(tmp_path / "run"))
    assert refused.returncode != 0
    assert "train.early_stopping.patience" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "run").exists()


def test_validate_prints_the_resolved_spec_and_the_advice(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["validate", write(tmp_path, TINY)]) == 0
    printed = capsys.readouterr()
    resolved = json.loads(printed.out)
    assert resolved["train"]["early_stopping"]["monitor"] == "val/loss"  # val_loss, spelled as the engine names it
    assert resolved["optim"]["name"] and resolved["train"]["seed"] == 0  # defaults filled in
    assert "[info] NO_RESTORE_BEST (train.early_stopping.restore_best_weights)" in printed.err


def test_validate_of_a_bad_spec_names_every_wrong_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = TINY.replace("layers: [16]", "layers: [16], dropout: 2").replace("batch_size: 32", "batch_size: 0")
    with pytest.raises(SystemExit) as refused:
        cli.main(["validate", write(tmp_path, bad)])
    message = str(refused.value)
    assert message.startswith("error: invalid spec")
    assert "model.dropout:" in message and "train.batch_size:" in message
    assert capsys.readouterr().out == ""  # nothing that looks like a resolved spec
