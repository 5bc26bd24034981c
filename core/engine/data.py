"""Datasets for the engine: read built-in or uploaded data, split, filter, corrupt labels, normalize, move to device.

Input kind follows the array rank: (N,F) vectors, (N,C,L) 1-D signals, (N,C,H,W) images. A 3-D array is always read
as signals, never as 1-channel images: (N,H,W) is ambiguous, so image files must carry their channel axis.
"""

from __future__ import annotations

import csv
import functools
import io
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from core.spec import AugmentSpec, DataSpec, SpecError, SyntheticSpec

KINDS = {2: "vector", 3: "signal", 4: "image"}
MAX_ZIP_ENTRIES = 200_000
MAX_ZIP_BYTES = 2 << 30  # decompressed, as declared by the archive (zipfile never reads past a declared size)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
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


@dataclass
class _Raw:
    """Examples as read: labels are indices into `names`; `values` are what `DataSpec.classes` refers to."""

    x: np.ndarray
    y: np.ndarray
    names: list[str]
    values: list[int]
    test: tuple[np.ndarray, np.ndarray] | None = None  # the dataset's own test split (x, y)


def load_data(spec: DataSpec, device: torch.device | str = "cpu", path: str | None = None) -> DataBundle:
    """Load, split, filter and normalize a dataset; `path`, when given, is the file to read (e.g. an upload)."""
    raw = _read(spec, path)
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


def describe_dataset(path: str | Path, label_column: str = "label") -> dict:
    """Summary of a dataset file, for validating uploads; raises SpecError when it cannot be used."""
    raw = _read_file(Path(path), label_column)
    n_test = 0 if raw.test is None else len(raw.test[1])
    return {"shape": list(raw.x.shape[1:]), "kind": KINDS[raw.x.ndim], "n_examples": len(raw.y) + n_test,
            "n_classes": len(raw.names), "classes": raw.names, "has_test_split": raw.test is not None}  # fmt: skip


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


def _read(spec: DataSpec, path: str | None) -> _Raw:
    if path is None and spec.dataset == "builtin:digits":
        return _digits()
    if path is None and spec.dataset == "builtin:mnist1d":
        x, y, x_test, y_test = _mnist1d_arrays()  # copies below: the cached arrays are shared
        return _numbered(10, x[:, None].copy(), y.copy(), (x_test[:, None].copy(), y_test.copy()))
    if path is None and spec.dataset == "builtin:synthetic":
        return _synthetic(spec.synthetic)
    if path is None and not spec.dataset.endswith((".npz", ".csv", ".zip")):
        raise SpecError("data.dataset", f"{spec.dataset} must be resolved to a file by the service")
    return _read_file(Path(path or spec.dataset), spec.label_column)


def _digits() -> _Raw:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _numbered(10, x.reshape(-1, 1, 8, 8).astype(np.float32), y.astype(np.int64))


def _numbered(k: int, x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None) -> _Raw:
    """A dataset whose labels already are 0..k-1."""
    return _Raw(x, y, [str(i) for i in range(k)], list(range(k)), test)


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


def _synthetic(s: SyntheticSpec) -> _Raw:
    # Class centres differ by about class_sep in every feature; each example is its centre plus unit noise.
    rng = np.random.default_rng(s.seed)
    shape = tuple(s.shape) if s.shape else (s.n_features,)
    n_feat = int(np.prod(shape))
    centres = rng.normal(0.0, s.class_sep / np.sqrt(2), (s.n_classes, n_feat)).astype(np.float32)
    y = rng.permutation(np.arange(s.n_samples) % s.n_classes)
    x = centres[y] + rng.standard_normal((s.n_samples, n_feat), dtype=np.float32)
    return _numbered(s.n_classes, x.reshape(-1, *shape), y.astype(np.int64))


def _read_file(p: Path, label_column: str) -> _Raw:
    if not p.is_file():
        raise SpecError("data.dataset", f"no such file: {p.name}")
    readers = {".npz": _read_npz, ".csv": lambda p: _read_csv(p, label_column), ".zip": _read_zip}
    if p.suffix.lower() not in readers:
        raise SpecError("data.dataset", "use a .npz, .csv or .zip file")
    try:
        raw = readers[p.suffix.lower()](p)
    except SpecError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as e:
        # Corrupt, encrypted or oddly compressed uploads are the user's to fix, not a server fault.
        raise SpecError("data.dataset", f"cannot read {p.name}: {e}") from e
    _validate(raw)
    return raw


def _read_npz(p: Path) -> _Raw:
    with np.load(p, allow_pickle=False) as f:  # pickles would run code from the upload
        missing = [k for k in ("x", "y") if k not in f.files]
        if missing:
            raise SpecError("data.dataset", f"a .npz needs arrays x and y; missing {missing}, found {f.files}")
        has_test = "x_test" in f.files and "y_test" in f.files
        x, y = f["x"], f["y"]
        x_test, y_test = (f["x_test"], f["y_test"]) if has_test else (None, None)
    if x.dtype.kind not in "biuf" or (x_test is not None and x_test.dtype.kind not in "biuf"):
        raise SpecError("data.dataset", f"x must be numeric, not {x.dtype}")
    y, y_test, names, values = _encode_labels(y, y_test)
    test = None if x_test is None or y_test is None else (x_test.astype(np.float32), y_test)
    return _Raw(x.astype(np.float32), y, names, values, test)


def _read_csv(p: Path, label_column: str) -> _Raw:
    with p.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if len(rows) < 2:
        raise SpecError("data.dataset", "a .csv needs a header row and at least one example")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if label_column not in header:
        raise SpecError("data.label_column", f"no column {label_column!r}; the columns are {header[:20]}")
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise SpecError("data.dataset", f"line {i + 2} has {len(row)} fields; the header has {len(header)}")
    cols = list(zip(*body, strict=True))
    features = []
    for name, col in zip(header, cols, strict=True):
        if name == label_column:
            continue
        try:
            features.append(np.array(col, dtype=np.float32))
        except ValueError:
            raise SpecError("data.dataset", f"column {name!r} is not numeric") from None
    if not features:
        raise SpecError("data.dataset", "the .csv has no feature columns besides the label")
    y, _, names, values = _encode_labels(_numeric_if_possible([s.strip() for s in cols[header.index(label_column)]]))
    return _Raw(np.stack(features, axis=1), y, names, values)


def _read_zip(p: Path) -> _Raw:
    from PIL import Image

    with zipfile.ZipFile(p) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise SpecError("data.dataset", f"the zip has {len(infos)} entries; at most {MAX_ZIP_ENTRIES}")
        if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            raise SpecError("data.dataset", f"the zip unpacks to more than {MAX_ZIP_BYTES >> 30} GiB")
        labels, images = [], []
        for info in sorted(infos, key=lambda i: i.filename):
            parts = _safe_parts(info.filename)
            name = parts[-1].lower()
            if info.is_dir() or "__MACOSX" in parts or name.startswith(".") or not name.endswith(IMAGE_SUFFIXES):
                continue  # folders, macOS resource forks and hidden files, files that are not images
            if len(parts) < 2:
                raise SpecError("data.dataset", f"{info.filename}: images must sit in class-named folders")
            try:
                img = Image.open(io.BytesIO(zf.read(info)))
                img.load()
            except (OSError, Image.DecompressionBombError) as e:
                raise SpecError("data.dataset", f"{info.filename}: not a readable image ({e})") from None
            labels.append(parts[-2])
            images.append(img)
    if not images:
        raise SpecError("data.dataset", "the zip holds no .png or .jpg images")
    mode, size = ("L" if all(i.mode == "L" for i in images) else "RGB"), images[0].size
    x = np.stack([np.asarray(i.convert(mode).resize(size), dtype=np.float32) for i in images])
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    y, _, names, values = _encode_labels(_numeric_if_possible(labels))
    return _Raw(np.ascontiguousarray(x), y, names, values)


def _safe_parts(name: str) -> tuple[str, ...]:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise SpecError("data.dataset", f"unsafe path in the zip: {name!r}")
    return parts


def _numeric_if_possible(labels: list[str]) -> np.ndarray:
    # Text labels "2", "10" are numbers: `classes: [10]` must mean label 10, and 10 must sort after 2.
    try:
        return np.array([int(s) for s in labels], dtype=np.int64)
    except ValueError:
        return np.array(labels)


def _encode_labels(y: np.ndarray, y_test: np.ndarray | None = None):
    """Map labels (integers or strings) to indices 0..k-1 over all splits, in sorted order."""
    both = y if y_test is None else np.concatenate([y, y_test])
    if both.ndim != 1:
        raise SpecError("data.dataset", f"labels must be one per example, got shape {both.shape}")
    if both.dtype.kind == "f" and np.all(np.isfinite(both)) and np.all(both == np.round(both)):
        both = both.astype(np.int64)
    if both.dtype.kind not in "biuU":
        raise SpecError("data.dataset", f"labels must be integers or strings, not {both.dtype}")
    uniq, idx = np.unique(both, return_inverse=True)
    numeric = uniq.dtype.kind in "biu"
    values = [int(u) for u in uniq] if numeric else list(range(len(uniq)))
    idx = idx.astype(np.int64).reshape(-1)
    return idx[: len(y)], (None if y_test is None else idx[len(y) :]), [str(u) for u in uniq], values


def _validate(raw: _Raw) -> None:
    if raw.x.ndim not in KINDS:
        raise SpecError("data.dataset", f"x must be (N,F), (N,C,L) or (N,C,H,W); got shape {raw.x.shape}")
    if len(raw.x) != len(raw.y):
        raise SpecError("data.dataset", f"{len(raw.x)} examples but {len(raw.y)} labels")
    if raw.test is not None and (raw.test[0].shape[1:] != raw.x.shape[1:] or len(raw.test[0]) != len(raw.test[1])):
        raise SpecError("data.dataset", "x_test/y_test must match x in example shape and in length")
    inputs = [raw.x] if raw.test is None else [raw.x, raw.test[0]]
    if not all(np.isfinite(a).all() for a in inputs):
        raise SpecError("data.dataset", "x holds NaN or infinite values")
    if len(raw.names) < 2:
        raise SpecError("data.dataset", f"needs at least 2 classes; found {raw.names}")


# -------------------------------------------------------------------------------- splits and labels


def _keep_classes(raw: _Raw, classes: list[int] | None) -> _Raw:
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
    return _Raw(x, y, names, list(range(len(classes))), test)


def _split(raw: _Raw, spec: DataSpec) -> list[tuple[np.ndarray, np.ndarray]]:
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
