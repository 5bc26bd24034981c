"""The checkpoint snapshots the database points at, and the test-only crash hook's selection rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import faults, reporting
from worker.reporting import snapshot_file


def _rewrite(path: Path, content: bytes) -> None:
    """As the engine writes its checkpoint: a new file renamed over the old one."""
    tmp = path.with_name(".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


@pytest.mark.parametrize("links", [True, False])
def test_a_snapshot_keeps_its_content_when_the_checkpoint_is_rewritten(tmp_path, monkeypatch, links):
    if not links:  # a filesystem without hard links: the snapshot is a copy
        monkeypatch.setattr(reporting.os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links here")))
    path = tmp_path / "checkpoint.pt"
    _rewrite(path, b"epoch 1")
    first = snapshot_file(path, 0)
    _rewrite(path, b"epoch 2")
    second = snapshot_file(path, 1)
    _rewrite(path, b"epoch 3")  # written, then the process dies before its pointer moves
    assert (first.name, second.name) == ("checkpoint.0.pt", "checkpoint.1.pt")
    assert first.read_bytes() == b"epoch 1" and second.read_bytes() == b"epoch 2"
    assert snapshot_file(path, 0).read_bytes() == b"epoch 3"  # the slot the database no longer points at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.0.pt", "checkpoint.1.pt", "checkpoint.pt"]


def test_crash_hooks_are_off_unless_the_job_and_attempt_are_named(monkeypatch):
    assert faults.crash_hooks("job_a", 1) == []
    monkeypatch.setenv(faults.JOB_VAR, "job_a")
    assert faults.crash_hooks("job_b", 1) == []
    [hook] = faults.crash_hooks("job_a", 1)
    assert (hook.point, hook.k) == ("step", 1)
    monkeypatch.setenv(faults.AT_VAR, "checkpoint:2")
    monkeypatch.setenv(faults.ATTEMPTS_VAR, "1,3")
    [hook] = faults.crash_hooks("job_a", 3)
    assert (hook.point, hook.k) == ("checkpoint", 2) and faults.crash_hooks("job_a", 2) == []
    monkeypatch.setenv(faults.AT_VAR, "epoch:1")
    with pytest.raises(ValueError, match="unknown point"):
        faults.crash_hooks("job_a", 1)
