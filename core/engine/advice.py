"""The article's good practices as advice on a job spec: warnings returned with the job, never rejections."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from core.engine.init import RELU_LIKE, resolve_init
from core.engine.models import count_blocks
from core.spec import JobSpec, builtin_info, builtin_input_kind

Severity = Literal["info", "warning", "danger"]

DROPOUT_RANGE = (0.2, 0.5)  # the article: "a minimum of 20% and a maximum of 50%"
LITTLE_DATA = 10_000  # training examples below which augmentation and freezing matter most
DEEP = 4  # blocks from which a net counts as deep (more than 3 hidden layers)
MANY_EPOCHS = 30
ADAM_MAX_LR = 0.01


@dataclass
class Advice:
    """One piece of advice: a stable code, one sentence for people, and the spec path it concerns."""

    code: str
    message: str
    path: str
    severity: Severity = "warning"


def advise(spec: JobSpec, n_train: int | None = None) -> list[Advice]:
    """Every good practice the spec departs from; `n_train` (training examples) sharpens the data-size checks."""
    n = n_train if n_train is not None else estimate_train_size(spec)
    return [advice for check in CHECKS if (advice := check(spec, n)) is not None]


def estimate_train_size(spec: JobSpec) -> int | None:
    """Training examples a built-in dataset will give after splits and filters; None for uploaded data."""
    data, info = spec.data, builtin_info(spec.data)
    if info is None:
        return None
    kept = len(data.classes) if data.classes else info.n_classes
    held_out = data.split.val + (0 if info.ships_test_split else data.split.test)
    n = int(info.n_examples * (1 - held_out) * kept / info.n_classes)
    return min(n, data.max_per_class * kept) if data.max_per_class else n


def _dropout_range(spec: JobSpec, n: int | None) -> Advice | None:
    p = spec.model.dropout
    if p > 0 and not DROPOUT_RANGE[0] <= p <= DROPOUT_RANGE[1]:
        return Advice("DROPOUT_RANGE", f"Dropout {p:g} is outside the recommended 0.2-0.5.", "model.dropout")
    return None


def _dropout_unused(spec: JobSpec, n: int | None) -> Advice | None:
    if spec.model.dropout > 0 and spec.model.arch == "linear":
        msg = "A linear model has no hidden units, so dropout has no effect."
        return Advice("DROPOUT_UNUSED", msg, "model.dropout", "info")
    return None


def _init_mismatch(spec: JobSpec, n: int | None) -> Advice | None:
    scheme, act = resolve_init(spec.model), spec.model.activation
    if scheme.startswith("xavier") and act in RELU_LIKE:
        msg = f"Xavier initialization suits tanh/sigmoid; He initialization is preferred with {act}."
        return Advice("XAVIER_WITH_RELU", msg, "model.init")
    if scheme.startswith("he") and act not in RELU_LIKE:
        msg = f"He initialization is derived for ReLU; Xavier initialization suits {act}."
        return Advice("HE_WITH_SATURATING", msg, "model.init")
    return None


def _symmetric_init(spec: JobSpec, n: int | None) -> Advice | None:
    if spec.model.init in ("zeros", "constant") and spec.model.arch != "linear":
        code = "ZERO_INIT" if spec.model.init == "zeros" else "CONSTANT_INIT"
        msg = "Every weight starts equal, so all hidden units get identical updates and stay identical."
        return Advice(code, msg, "model.init", "danger")
    return None


def _no_augmentation(spec: JobSpec, n: int | None) -> Advice | None:
    small = n is not None and n < LITTLE_DATA
    if builtin_input_kind(spec.data) == "image" and small and not spec.data.augment.enabled():
        msg = f"With only about {n} training images, augmentation (rotate, flip, crop, noise) helps generalize."
        return Advice("NO_AUGMENTATION", msg, "data.augment")
    return None


def _unfrozen_transfer(spec: JobSpec, n: int | None) -> Advice | None:
    t = spec.transfer
    if t is None or n is None or n >= LITTLE_DATA or t.early_lr_factor < 1:
        return None
    if t.trainable_last is not None:
        if t.trainable_last < count_blocks(spec.model):
            return None
    elif t.freeze != "large":
        return None
    msg = (
        f"All transferred layers train on only about {n} examples; keep the first layers as they are "
        "with freeze small/medium or early_lr_factor < 1."
    )
    path = "transfer.trainable_last" if t.trainable_last is not None else "transfer.freeze"
    return Advice("UNFROZEN_TRANSFER", msg, path)


def _optimizer(spec: JobSpec, n: int | None) -> Advice | None:
    name = spec.optim.name
    if name == "sgd":
        msg = "Plain SGD without momentum converges slowly; try momentum, nesterov, adam or rmsprop."
        return Advice("SGD_NO_MOMENTUM", msg, "optim.name")
    if name == "adagrad" and (spec.model.arch in ("cnn", "resnet") or count_blocks(spec.model) >= DEEP):
        msg = "Adagrad's learning rate decays too fast for deep or convolutional nets; adam or rmsprop do better."
        return Advice("ADAGRAD_DEEP", msg, "optim.name", "info")
    if name in ("adam", "adamw") and spec.optim.lr > ADAM_MAX_LR:
        msg = f"Learning rate {spec.optim.lr:g} is very high for {name}; 1e-3 is the usual start."
        return Advice("ADAM_HIGH_LR", msg, "optim.lr")
    return None


def _early_stopping(spec: JobSpec, n: int | None) -> Advice | None:
    es = spec.train.early_stopping
    if es is None and spec.train.epochs >= MANY_EPOCHS:
        msg = f"{spec.train.epochs} epochs without early stopping may overfit; stop when val/loss stops improving."
        return Advice("NO_EARLY_STOPPING", msg, "train.early_stopping")
    if es is not None and es.patience > 0 and not es.restore_best_weights:
        msg = "Training ends with the last epoch's weights, not the best ones; set restore_best_weights."
        return Advice("NO_RESTORE_BEST", msg, "train.early_stopping.restore_best_weights", "info")
    return None


def _no_normalization(spec: JobSpec, n: int | None) -> Advice | None:
    info = builtin_info(spec.data)
    already = info is not None and info.normalized  # e.g. MNIST-1D, standardized by its generator
    if spec.data.normalize == "none" and not already:
        msg = "Inputs on different scales make training unstable and slow; normalize them (standardize)."
        return Advice("NO_NORMALIZATION", msg, "data.normalize")
    return None


def _no_batch_norm(spec: JobSpec, n: int | None) -> Advice | None:
    if not spec.model.batch_norm and count_blocks(spec.model) >= DEEP:
        msg = "Batch normalization speeds up and stabilizes the training of deep nets."
        return Advice("NO_BATCH_NORM", msg, "model.batch_norm", "info")
    return None


def _sigmoid_deep(spec: JobSpec, n: int | None) -> Advice | None:
    if spec.model.activation == "sigmoid" and count_blocks(spec.model) >= DEEP:
        msg = "Sigmoid units saturate in deep nets and slow learning; relu or tanh train faster."
        return Advice("SIGMOID_DEEP", msg, "model.activation", "info")
    return None


CHECKS: list[Callable[[JobSpec, int | None], Advice | None]] = [
    _dropout_range,
    _dropout_unused,
    _init_mismatch,
    _symmetric_init,
    _no_augmentation,
    _unfrozen_transfer,
    _optimizer,
    _early_stopping,
    _no_normalization,
    _no_batch_norm,
    _sigmoid_deep,
]
