"""Checkpoints (everything needed to resume a run) and trained-weight export as safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.safetensors"
FORMAT = 1
TMP_PREFIX = ".ckpt-"


def code_version() -> str:
    """The installed trickserve version, recorded in every checkpoint and model file."""
    try:
        return metadata.version("trickserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> str:
    """Write `state` atomically (temp file + rename), so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "code_version": code_version(), **state}
    for stale in path.parent.glob(f"{TMP_PREFIX}*"):  # left by a process killed mid-write; one writer per folder
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors and plain containers, never arbitrary pickles."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
    return state


def save_model(model: torch.nn.Module, path: str | Path, spec_json: str, extra: dict[str, str] | None = None) -> str:
    """Export trained weights (and buffers) as safetensors with the resolved spec in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"spec": spec_json, "code_version": code_version(), "format": "trickserve-model/1", **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return str(path)


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata (spec parsed) of a model file written by `save_model`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "spec" in meta:
        meta["spec"] = json.loads(meta["spec"])
    return load_file(str(path)), meta
