"""Checkpoints are written atomically and read back without pickles; model files carry their spec."""

import pickle

import pytest
import torch

from core.engine.checkpoint import load_checkpoint, save_checkpoint


def test_save_replaces_atomically_and_cleans_what_a_killed_writer_left(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    (tmp_path / ".ckpt-left-by-a-crash").write_bytes(b"half a checkpoint")
    save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    state = load_checkpoint(path)
    assert state["step"] == 2 and torch.equal(state["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_load_refuses_arbitrary_pickles(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "x": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_checkpoint(path)
