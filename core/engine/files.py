"""Readers for the dataset files users provide: .npz arrays, .csv tables and .zip folders of class-named images.

Uploads are untrusted: no pickles, no paths outside the archive, bounded archives (core.engine.budget), and what a
file declares (array shapes, rows, image sizes) is checked against a memory budget before anything is decoded.
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from core.engine.budget import check_budget, open_zip, size
from core.engine.images import read_images
from core.spec import SpecError

KINDS = {2: "vector", 3: "signal", 4: "image"}
NPZ_ARRAYS = ("x", "y", "x_test", "y_test")
NUMERIC = "biuf"
LABEL_BYTES = 32  # per label while labels are encoded: int64 indices and their copies
CSV_ROW_BYTES = 100  # per .csv row besides its features: the label's str object and its slot in a list
CSV_CHUNK_ROWS = 4096


@dataclass
class Raw:
    """Examples as read: labels are indices into `names`; `values` are what `DataSpec.classes` refers to."""

    x: np.ndarray
    y: np.ndarray
    names: list[str]
    values: list[int]
    test: tuple[np.ndarray, np.ndarray] | None = None  # the dataset's own test split (x, y)


def read_file(p: Path, label_column: str, max_bytes: int | None = None) -> Raw:
    """Read and validate one dataset file; anything wrong with it is a SpecError naming data.dataset. A file that
    would take more than `max_bytes` of memory to read is refused (budget.DatasetTooLarge) before it is decoded."""
    if not p.is_file():
        raise SpecError("data.dataset", f"no such file: {p.name}")
    readers: dict[str, Callable[[Path, int | None], Raw]] = {
        ".npz": _read_npz,
        ".csv": lambda p, max_bytes: _read_csv(p, label_column, max_bytes),
        ".zip": _read_zip,
    }
    if p.suffix.lower() not in readers:
        raise SpecError("data.dataset", "use a .npz, .csv or .zip file")
    try:
        raw = readers[p.suffix.lower()](p, max_bytes)
    except SpecError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as e:
        # Corrupt, encrypted or oddly compressed uploads are the user's to fix, not a server fault.
        raise SpecError("data.dataset", f"cannot read {p.name}: {e}") from e
    _validate(raw)
    return raw


def describe_dataset(path: str | Path, label_column: str = "label", max_bytes: int | None = None) -> dict:
    """Summary of a dataset file, for validating uploads; raises SpecError when it cannot be used."""
    raw = read_file(Path(path), label_column, max_bytes)
    n_test = 0 if raw.test is None else len(raw.test[1])
    return {"shape": list(raw.x.shape[1:]), "kind": KINDS[raw.x.ndim], "n_examples": len(raw.y) + n_test,
            "n_classes": len(raw.names), "classes": raw.names, "has_test_split": raw.test is not None}  # fmt: skip


# ----------------------------------------------------------------------------------------------- npz


@dataclass(frozen=True)
class _NpyHeader:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    def describe(self) -> str:
        return f"{self.name} declares shape {self.shape} of {self.dtype}"


def _read_npz(p: Path, max_bytes: int | None) -> Raw:
    with open_zip(p) as zf:
        members = _npz_members(zf)
        headers = {key: _npy_header(zf, info) for key, info in members.items()}
        _check_npz(headers, max_bytes)
        arrays = {key: _load_npy(zf, info) for key, info in members.items()}
    x, y = arrays["x"], arrays["y"]
    x_test, y_test = arrays.get("x_test"), arrays.get("y_test")
    y, y_test, names, values = _encode_labels(y, y_test)
    test = None if x_test is None or y_test is None else (x_test.astype(np.float32, copy=False), y_test)
    return Raw(x.astype(np.float32, copy=False), y, names, values, test)


def _npz_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The members holding x, y and, when both are there, x_test and y_test; named as np.load names them."""
    names = set(zf.namelist())
    found = {key: (key if key in names else f"{key}.npy") for key in NPZ_ARRAYS}
    found = {key: member for key, member in found.items() if member in names}
    missing = [k for k in ("x", "y") if k not in found]
    if missing:
        arrays = sorted(n.removesuffix(".npy") for n in names)
        raise SpecError("data.dataset", f"a .npz needs arrays x and y; missing {missing}, found {arrays}")
    if not ("x_test" in found and "y_test" in found):
        found = {k: v for k, v in found.items() if k in ("x", "y")}
    return {key: zf.getinfo(member) for key, member in found.items()}


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _NpyHeader:
    """What a member's .npy header declares, checked against the member's size; its data is not read."""
    with zf.open(info) as f:
        try:
            shape, dtype = _read_npy_header(f)
        except ValueError as e:
            raise SpecError("data.dataset", f"{info.filename} is not a readable .npy array: {e}") from None
        data_start = f.tell()
    header = _NpyHeader(info.filename, tuple(shape), dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise SpecError("data.dataset", f"{header.describe()}; only plain numbers or strings can be read")
    if info.file_size != data_start + header.nbytes:
        held = info.file_size - data_start
        message = f"{header.describe()} ({size(header.nbytes)}) but holds {size(max(held, 0))}"
        raise SpecError("data.dataset", message)
    return header


def _read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    shape, _, dtype = readers[version](f)
    return shape, dtype


def _check_npz(headers: dict[str, _NpyHeader], max_bytes: int | None) -> None:
    """Refuse non-numeric inputs and arrays that would not fit the budget, from their headers alone."""
    inputs = [h for key, h in headers.items() if key.startswith("x")]
    for h in inputs:
        if h.dtype.kind not in NUMERIC:
            raise SpecError("data.dataset", f"x must be numeric; {h.describe()}")
    converted = sum(4 * h.count for h in inputs if h.dtype != np.float32)  # the float32 copy beside the original
    labels = sum(h.nbytes + h.count * LABEL_BYTES for key, h in headers.items() if key.startswith("y"))  # sorted
    largest = max(headers.values(), key=lambda h: h.nbytes)
    total = sum(h.nbytes for h in headers.values()) + converted + labels
    check_budget(total, max_bytes, f"the arrays ({largest.describe()}) take")


def _load_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)  # pickles would run code from the upload


# ----------------------------------------------------------------------------------------------- csv


def _read_csv(p: Path, label_column: str, max_bytes: int | None) -> Raw:
    header, n_rows, label_chars = _scan_csv(p, label_column)
    n_features = len(header) - 1
    row_bytes = 4 * n_features + 8 * label_chars + CSV_ROW_BYTES  # float32 features; labels as a str array, sorted
    check_budget(n_rows * row_bytes, max_bytes, f"{n_rows} rows of {n_features} features")
    x, labels = _parse_csv(p, header, header.index(label_column), n_rows)
    y, _, names, values = _encode_labels(_numeric_if_possible(labels))
    return Raw(x, y, names, values)


def _csv_rows(p: Path) -> Iterator[tuple[int, list[str]]]:
    """The non-empty rows with their line numbers; a malformed line is a SpecError naming it."""
    with p.open(newline="") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if row:
                    yield reader.line_num, row
        except csv.Error as e:
            # e.g. a field over csv.field_size_limit(), 128 KiB unless raised process-wide: no number is that long.
            raise SpecError("data.dataset", f"line {reader.line_num}: {e}") from None


def _scan_csv(p: Path, label_column: str) -> tuple[list[str], int, int]:
    """The header, the number of rows after it and the longest label, reading one row at a time; every row must
    have as many fields as the header."""
    rows = _csv_rows(p)
    header = [h.strip() for h in next(rows, (0, []))[1]]
    if header and label_column not in header:
        raise SpecError("data.label_column", f"no column {label_column!r}; the columns are {header[:20]}")
    n_rows, longest = 0, 0
    for line, row in rows:
        if len(row) != len(header):
            raise SpecError("data.dataset", f"line {line} has {len(row)} fields; the header has {len(header)}")
        n_rows, longest = n_rows + 1, max(longest, len(row[header.index(label_column)]))
    if n_rows == 0:
        raise SpecError("data.dataset", "a .csv needs a header row and at least one example")
    if len(header) < 2:
        raise SpecError("data.dataset", "the .csv has no feature columns besides the label")
    return header, n_rows, longest


def _parse_csv(p: Path, header: list[str], label_at: int, n_rows: int) -> tuple[np.ndarray, list[str]]:
    """The features as one float32 array, filled a chunk of rows at a time, and the labels as text."""
    x = np.empty((n_rows, len(header) - 1), dtype=np.float32)
    features = [h for j, h in enumerate(header) if j != label_at]
    labels: list[str] = []
    chunk: list[list[str]] = []
    rows = _csv_rows(p)
    next(rows)  # the header
    for i, (_, row) in enumerate(rows, start=1):
        labels.append(row.pop(label_at).strip())
        chunk.append(row)
        if len(chunk) == CSV_CHUNK_ROWS or i == n_rows:
            _fill(x[i - len(chunk) : i], chunk, features)
            chunk = []
    return x, labels


def _fill(out: np.ndarray, rows: list[list[str]], names: list[str]) -> None:
    """Parse a chunk of rows into `out`; a SpecError names the first column that is not numeric."""
    try:
        out[:] = rows
    except ValueError:
        for j, name in enumerate(names):
            try:
                np.array([row[j] for row in rows]).astype(np.float32)
            except ValueError:
                raise SpecError("data.dataset", f"column {name!r} is not numeric") from None
        raise


def _read_zip(p: Path, max_bytes: int | None) -> Raw:
    with open_zip(p) as zf:
        x, labels = read_images(zf, max_bytes)
    y, _, names, values = _encode_labels(_numeric_if_possible(labels))
    return Raw(x, y, names, values)


# -------------------------------------------------------------------------------------------- labels


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
    if not all(_all_finite(a) for a in inputs):
        raise SpecError("data.dataset", "x holds NaN or infinite values")
    if len(raw.names) < 2:
        raise SpecError("data.dataset", f"needs at least 2 classes; found {raw.names}")


def _all_finite(a: np.ndarray) -> bool:
    # min and max carry NaN and the infinities through without a mask as large as the array.
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))
