"""Datasets for the engine: read built-in or uploaded data, split, filter, corrupt labels, normalize, move to device.

Input kind follows the array rank: (N,F) vectors, (N,C,L) 1-D signals, (N,C,H,W) images. A 3-D array is always read
as signals, never as 1-channel images: (N,H,W) is ambiguous, so image files must carry their channel axis.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.engine.datacache import cached, package_version
from core.engine.files import KINDS, Raw, read_file
from core.spec import AugmentSpec, DataSpec, SpecError, SyntheticSpec

SPLITS = ("x", "y", "x_test", "y_test")


@dataclass
class DataBundle:
    """Every split as one device tensor, inputs already normalized: x_norm = (x_raw - shift) / scale."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    input_shape: tuple[int, ...]
    kind: str  # image | signal | vector
    n_classes: int
    shift: Tensor  # broadcastable to one example: (C,1,1) images, (C,1) signals, (F,) vectors
    scale: Tensor
    classes: list[str]


def load_data(
    spec: DataSpec, device: torch.device | str = "cpu", path: str | None = None, cache_dir: Path | None = None
) -> DataBundle:
    """Load, split, filter and normalize a dataset; `path`, when given, is the file to read (e.g. an upload), and
    `cache_dir` where built-in datasets are kept once made (none: made every time)."""
    raw = _read(spec, path, cache_dir)
    kind = KINDS[raw.x.ndim]
    check_augment(spec.augment, kind)
    raw = _keep_classes(raw, spec.classes)
    k = len(raw.names)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _split(raw, spec)
    if spec.label_noise > 0:
        rng = np.random.default_rng([spec.split.seed, 1])  # own stream: noise must not move the split
        y_tr, y_va = _corrupt(y_tr, spec.label_noise, k, rng), _corrupt(y_va, spec.label_noise, k, rng)
    shift, scale = _stats(x_tr, spec.normalize, kind)
    shift_t, scale_t = torch.from_numpy(shift).to(device), torch.from_numpy(scale).to(device)

    def x_to(x: np.ndarray) -> Tensor:
        # In place: each split is already a private copy, and this halves the peak memory on the device.
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device).sub_(shift_t).div_(scale_t)

    def y_to(y: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)

    return DataBundle(
        x_to(x_tr), y_to(y_tr), x_to(x_va), y_to(y_va), x_to(x_te), y_to(y_te),
        input_shape=tuple(raw.x.shape[1:]), kind=kind, n_classes=k,
        shift=shift_t, scale=scale_t, classes=raw.names,
    )  # fmt: skip


def check_augment(augment: AugmentSpec, kind: str) -> None:
    """Raise SpecError when an enabled augmentation cannot apply to this kind of input."""
    for name in ("rotate", "crop", "color"):
        if getattr(augment, name) and kind != "image":
            raise SpecError(f"data.augment.{name}", f"needs image data, but the data are {kind}s")
    if augment.flip and augment.flip.vertical and kind != "image":
        raise SpecError("data.augment.flip.vertical", f"needs image data, but the data are {kind}s")
    for name in ("flip", "contrast"):
        if getattr(augment, name) and kind == "vector":
            raise SpecError(f"data.augment.{name}", "needs images or signals, not plain vectors")


# ------------------------------------------------------------------------------------------- sources


def _read(spec: DataSpec, path: str | None, cache_dir: Path | None = None) -> Raw:
    if path is None and spec.dataset in LOADERS:
        return LOADERS[spec.dataset](spec, cache_dir)
    if path is None and not spec.dataset.endswith((".npz", ".csv", ".zip")):
        raise SpecError("data.dataset", f"{spec.dataset} must be resolved to a file by the service")
    return read_file(Path(path or spec.dataset), spec.label_column)


def _digits(cache_dir: Path | None = None) -> Raw:
    # Cached: importing scikit-learn alone costs a second or more in every fresh job process.
    arrays = cached(cache_dir, f"digits-scikit-learn-{package_version('scikit-learn')}", _digits_arrays)
    return _numbered(10, arrays["x"], arrays["y"])


def _digits_arrays() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return {"x": x.reshape(-1, 1, 8, 8).astype(np.float32), "y": y.astype(np.int64)}


def _numbered(k: int, x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None) -> Raw:
    """A dataset whose labels already are 0..k-1."""
    return Raw(x, y, [str(i) for i in range(k)], list(range(k)), test)


def _mnist1d(cache_dir: Path | None = None) -> Raw:
    # Generating the dataset takes seconds: once per machine with a cache folder, else once per process.
    key = f"mnist1d-{package_version('mnist1d')}-default"
    stored = cached(cache_dir, key, lambda: dict(zip(SPLITS, _mnist1d_arrays(), strict=True)))
    x, y, x_test, y_test = (stored[name] for name in SPLITS)  # copies below: the in-process arrays are shared
    return _numbered(10, x[:, None].copy(), y.copy(), (x_test[:, None].copy(), y_test.copy()))


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    # Generated offline (get_dataset would download); cached because generation takes about a second.
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and numpy RNGs; callers must not see that.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = [np.asarray(data[k], dtype=np.int64 if k.startswith("y") else np.float32) for k in SPLITS]
    for a in arrays:
        a.flags.writeable = False  # shared by every later call
    return tuple(arrays)


def _synthetic(s: SyntheticSpec) -> Raw:
    # Class centres differ by about class_sep in every feature; each example is its centre plus unit noise.
    rng = np.random.default_rng(s.seed)
    shape = tuple(s.shape) if s.shape else (s.n_features,)
    n_feat = int(np.prod(shape))
    centres = rng.normal(0.0, s.class_sep / np.sqrt(2), (s.n_classes, n_feat)).astype(np.float32)
    y = rng.permutation(np.arange(s.n_samples) % s.n_classes)
    x = centres[y] + rng.standard_normal((s.n_samples, n_feat), dtype=np.float32)
    if s.scale_range is not None:  # tabular features in units of their own: years, kilometres, grams...
        low, high = s.scale_range
        scales = rng.permutation(np.geomspace(low, high, n_feat)).astype(np.float32)
        x = x * scales + 2 * scales
    return _numbered(s.n_classes, x.reshape(-1, *shape), y.astype(np.int64))


# One loader for each entry of core.spec.BUILTINS, which describes what it returns.
# Synthetic data is made from the spec in milliseconds, so it is never cached.
LOADERS: dict[str, Callable[[DataSpec, Path | None], Raw]] = {
    "builtin:digits": lambda spec, cache_dir: _digits(cache_dir),
    "builtin:mnist1d": lambda spec, cache_dir: _mnist1d(cache_dir),
    "builtin:synthetic": lambda spec, cache_dir: _synthetic(spec.synthetic),
}


# -------------------------------------------------------------------------------- splits and labels


def _keep_classes(raw: Raw, classes: list[int] | None) -> Raw:
    if classes is None:
        return raw
    missing = [c for c in classes if c not in raw.values]
    if missing:
        raise SpecError("data.classes", f"labels {missing} are not in the dataset; it has {raw.values[:50]}")
    lut = np.full(len(raw.names), -1, dtype=np.int64)
    for new, c in enumerate(classes):
        lut[raw.values.index(c)] = new

    def keep(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = lut[y] >= 0
        return x[mask], lut[y[mask]]

    x, y = keep(raw.x, raw.y)
    test = None if raw.test is None else keep(*raw.test)
    names = [raw.names[raw.values.index(c)] for c in classes]
    return Raw(x, y, names, list(range(len(classes))), test)


def _split(raw: Raw, spec: DataSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train, val and test as (x, y); a dataset's own test split is kept and only val is carved out."""
    n, split = len(raw.y), spec.split
    perm = np.random.default_rng(split.seed).permutation(n)
    n_test = 0 if raw.test is not None else _count(split.test, n)
    n_val = _count(split.val, n)
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    if len(train) < 2:
        raise SpecError("data.split", f"{n} examples leave {len(train)} for training; need more data")
    if spec.max_per_class is not None:
        train = _cap_per_class(train, raw.y, spec.max_per_class)
    own_test = raw.test if raw.test is not None else (raw.x[test], raw.y[test])
    return [(raw.x[train], raw.y[train]), (raw.x[val], raw.y[val]), own_test]


def _count(fraction: float, n: int) -> int:
    # A requested split never ends up empty, however small the dataset.
    return max(1, round(fraction * n)) if fraction > 0 else 0


def _cap_per_class(idx: np.ndarray, y: np.ndarray, cap: int) -> np.ndarray:
    # idx is in shuffled order, so "first `cap` of each class" is a random sample per class.
    keep = np.zeros(len(idx), dtype=bool)
    labels = y[idx]
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:cap]] = True
    return idx[keep]


def _corrupt(y: np.ndarray, fraction: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """Replace `fraction` of the labels by a uniformly random other class."""
    y = y.copy()
    n = round(fraction * len(y))
    pick = rng.choice(len(y), n, replace=False)
    y[pick] = (y[pick] + rng.integers(1, k, n)) % k
    return y


def _stats(x: np.ndarray, mode: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Shift and scale from the training inputs: per feature for vectors, per channel otherwise."""
    axes = (0,) if kind == "vector" else (0, *range(2, x.ndim))
    shape = x.shape[1:] if kind == "vector" else (x.shape[1],) + (1,) * (x.ndim - 2)
    if mode == "standardize":
        shift, scale = x.mean(axis=axes, dtype=np.float64), x.std(axis=axes, dtype=np.float64)
    elif mode == "minmax":
        shift, scale = x.min(axis=axes), x.max(axis=axes) - x.min(axis=axes)
    else:
        shift, scale = np.zeros(shape), np.ones(shape)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature would divide by zero
    return shift.reshape(shape).astype(np.float32), scale.reshape(shape).astype(np.float32)
