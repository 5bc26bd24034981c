"""Readers for the dataset files users provide: .npz arrays, .csv tables and .zip folders of class-named images.

Uploads are untrusted: no pickles, no paths outside the archive, bounded entry counts and unpacked sizes.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from core.spec import SpecError

KINDS = {2: "vector", 3: "signal", 4: "image"}
MAX_ZIP_ENTRIES = 200_000
MAX_ZIP_BYTES = 2 << 30  # decompressed, as declared by the archive (zipfile never reads past a declared size)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Raw:
    """Examples as read: labels are indices into `names`; `values` are what `DataSpec.classes` refers to."""

    x: np.ndarray
    y: np.ndarray
    names: list[str]
    values: list[int]
    test: tuple[np.ndarray, np.ndarray] | None = None  # the dataset's own test split (x, y)


def read_file(p: Path, label_column: str) -> Raw:
    """Read and validate one dataset file; anything wrong with it is a SpecError naming data.dataset."""
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


def _read_npz(p: Path) -> Raw:
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
    return Raw(x.astype(np.float32), y, names, values, test)


def _read_csv(p: Path, label_column: str) -> Raw:
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
    return Raw(np.stack(features, axis=1), y, names, values)


def _read_zip(p: Path) -> Raw:
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
    return Raw(np.ascontiguousarray(x), y, names, values)


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


def _validate(raw: Raw) -> None:
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
