"""Transfer learning: load a finished run's weights, freeze its first blocks, give early blocks smaller LRs.

Frozen means unchanged. A frozen block has requires_grad False on all its parameters (weights, biases, BatchNorm
gamma/beta) and its BatchNorm layers stay in eval mode, so their running statistics stop updating too: after
training, a frozen block's parameters and buffers are bit-identical to the source's. fastai instead keeps BN
trainable inside frozen groups (train_bn=True); we don't, because a user who freezes a layer expects it untouched.
Dropout inside a frozen block stays active in training: it has no state and regularizes the layers above it.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file

from core.engine.models import Net
from core.spec import SpecError, TransferSpec

HEAD_PREFIX = "head."


def load_pretrained(model: Net, weights_path: str) -> dict[str, Any]:
    """Load a .safetensors state dict into `model`; the body must match exactly, the head only if shapes agree."""
    source = load_file(weights_path)  # safetensors only: never unpickle a file that came from elsewhere
    # A model saved while wrapped by torch.compile carries this prefix on every name.
    source = {k.removeprefix("_orig_mod."): v for k, v in source.items()}
    target = model.state_dict()
    _check_body(source, target)
    head = [k for k in target if k.startswith(HEAD_PREFIX)]
    new_head = any(k not in source or source[k].shape != target[k].shape for k in head)
    names = [k for k in target if not (new_head and k.startswith(HEAD_PREFIX))]
    with torch.no_grad():
        for name in names:
            target[name].copy_(source[name])
    n_classes = model.head.out_features
    message = f"new head: {n_classes} classes" if new_head else f"head loaded: {n_classes} classes"
    return {"loaded": len(names), "new_head": new_head, "message": message}


def _check_body(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    body = [k for k in target if not k.startswith(HEAD_PREFIX)]
    extra = [k for k in source if not k.startswith(HEAD_PREFIX) and k not in target]
    for name in body:
        if name not in source:
            _differs(f"{name} is missing from the source")
        if source[name].shape != target[name].shape:
            _differs(f"{name} has shape {tuple(source[name].shape)} there, {tuple(target[name].shape)} here")
    if extra:
        _differs(f"the source has {extra[0]}, which this model lacks")


def _differs(detail: str) -> None:
    raise SpecError("transfer", f"the model's architecture differs from the source: {detail}")


def frozen_block_count(model: Net, spec: TransferSpec) -> int:
    """How many leading blocks to freeze: small all, medium all but the last, large none; trainable_last wins."""
    n = len(model.blocks())
    if spec.trainable_last is not None:
        return max(0, n - spec.trainable_last)
    return {"small": n, "medium": max(0, n - 1), "large": 0}[spec.freeze]


def param_groups(model: Net, base_lr: float, spec: TransferSpec | None) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters; with early_lr_factor < 1, LRs rise geometrically to the head."""
    if spec is None or spec.early_lr_factor >= 1:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": base_lr, "name": "all"}]
    groups: list[dict[str, Any]] = [
        {"params": trainable, "name": f"block{i}"}
        for i, block in enumerate(model.blocks())
        if (trainable := [p for p in block.parameters() if p.requires_grad])
    ]
    groups.append({"params": [p for p in model.head.parameters() if p.requires_grad], "name": "head"})
    # fastai's even_mults(lo, hi, n) = lo * (hi/lo) ** (i/(n-1)) with lo = factor * hi, written so the head gets
    # exactly base_lr.
    n = len(groups)
    for i, group in enumerate(groups):
        group["lr"] = base_lr * spec.early_lr_factor ** (1 - i / (n - 1)) if n > 1 else base_lr
    return groups
