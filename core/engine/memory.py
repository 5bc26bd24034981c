"""How much memory a job needs, estimated before it runs: its dataset as the engine holds it (every split as one
float32 tensor), the model's parameters, their gradients and optimizer state, and the activations of one batch.

The estimate is coarse (within a factor of about two of the measured peak on the CPU) and leaves out the fixed cost
of the PyTorch runtime itself (about 100 MB for a process that trains)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from core.engine.models import build_model
from core.spec import JobSpec

FLOAT_BYTES, LABEL_BYTES = 4, 8  # inputs are float32, labels int64
# State tensors the size of the parameters that each optimizer keeps (momentum buffers, moment estimates).
OPTIMIZER_COPIES = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2}
# Loading holds the raw arrays and their split copies at once; standardizing adds a float64 working copy of the
# training inputs (numpy's std), twice their float32 size.
LOAD_COPIES = 2
STANDARDIZE_COPIES = 2


@dataclass(frozen=True)
class DataSize:
    """What is known of a dataset before it is loaded: example count (all splits), shape of one example, classes."""

    n_examples: int
    input_shape: tuple[int, ...]
    n_classes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job needs, part by part; `total_bytes` is the peak, while loading or while training."""

    loading_bytes: int  # while the dataset is read, split and normalized
    data_bytes: int  # every split's inputs and labels, kept while training
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int  # optimizer state, and the temporaries of one optimizer step
    activation_bytes: int  # the larger of one training batch (forward and backward) and one evaluation batch
    activation_path: str  # the spec field that sizes that batch

    @property
    def model_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def training_bytes(self) -> int:
        return self.data_bytes + self.model_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        return max(self.loading_bytes, self.training_bytes)

    def parts(self) -> dict[str, int]:
        """The estimate as plain numbers, for an API answer."""
        keys = ("total", "loading", "data", "parameter", "gradient", "optimizer", "activation")
        return {f"{key}_bytes": getattr(self, f"{key}_bytes") for key in keys}


def estimate_memory(spec: JobSpec, size: DataSize) -> MemoryEstimate:
    """The memory `spec` needs on a dataset of `size`; raises what build_model raises for a model that cannot be
    built for these inputs."""
    per_example = math.prod(size.input_shape)
    raw_bytes = size.n_examples * (per_example * FLOAT_BYTES + LABEL_BYTES)
    kept = len(spec.data.classes) / size.n_classes if spec.data.classes else 1.0
    data_bytes = int(raw_bytes * min(kept, 1.0))
    copies = LOAD_COPIES + (STANDARDIZE_COPIES if spec.data.normalize == "standardize" else 0)
    model = _meta_model(spec, size)
    n_params = sum(p.numel() for p in model.parameters())
    state = OPTIMIZER_COPIES[spec.optim.name]
    n_optimizer = state + 1 if state else 0  # a stateful optimizer's step also makes a temporary copy
    activation_bytes, activation_path = _activations(spec, size, model)
    return MemoryEstimate(
        loading_bytes=raw_bytes * copies,
        data_bytes=data_bytes,
        parameter_bytes=n_params * FLOAT_BYTES,
        gradient_bytes=n_params * FLOAT_BYTES,
        optimizer_bytes=n_params * FLOAT_BYTES * n_optimizer,
        activation_bytes=activation_bytes,
        activation_path=activation_path,
    )


def driving_path(spec: JobSpec, estimate: MemoryEstimate) -> str:
    """The spec field behind the largest part of the estimate: the dataset's size, the model's or the batch's."""
    data_path = "data.synthetic.n_samples" if spec.data.dataset == "builtin:synthetic" else "data.dataset"
    model_path = "model.conv" if spec.model.conv else ("model.layers" if spec.model.arch != "linear" else "model")
    if estimate.loading_bytes >= estimate.training_bytes:
        return data_path
    parts = {data_path: estimate.data_bytes, model_path: estimate.model_bytes}
    parts[estimate.activation_path] = estimate.activation_bytes
    return max(parts, key=lambda path: parts[path])


def _meta_model(spec: JobSpec, size: DataSize) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, however large the model
        return build_model(spec.model, size.input_shape, len(spec.data.classes or ()) or size.n_classes)


def _activations(spec: JobSpec, size: DataSize, model: nn.Module) -> tuple[int, str]:
    """Bytes of the activations of one training batch (every layer's output is kept for the backward pass, which
    adds the gradients of the two largest) or of one evaluation batch (no autograd: a layer's input and output)."""
    total, largest = _layer_outputs(model, size.input_shape)
    per_example = math.prod(size.input_shape)
    augment = 2 * per_example if spec.data.augment.enabled() else 0  # augmented copies of the batch
    split = spec.data.split
    n_train = max(1, round((1 - split.val - split.test) * size.n_examples))
    n_eval = max(1, round(max(split.val, split.test) * size.n_examples))  # the larger held-out split
    batch = min(spec.train.batch_size, n_train)
    train = batch * (per_example + augment + total + 2 * largest) * FLOAT_BYTES
    eval_batch = min(spec.train.eval_batch_size, n_eval)
    evaluate = eval_batch * (2 * largest) * FLOAT_BYTES  # the split is sliced, not copied
    return (train, "train.batch_size") if train >= evaluate else (evaluate, "train.eval_batch_size")


def _layer_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """The sum and the largest of the element counts that the model's layers output for one example."""
    sizes: list[int] = []
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel())) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(sizes), max(sizes, default=0)
