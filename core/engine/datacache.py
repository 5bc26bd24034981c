"""Built-in datasets kept as arrays in a cache folder, so that they are made once per machine, not once per job.

An entry is named by everything that decides its content (the dataset and the version of the package that makes
it). It is written to a temporary file and renamed into place, so a reader never sees half a file, and two workers
that build the same entry at once both succeed: the second rename replaces the first with the same arrays.
"""

from __future__ import annotations

import os
import secrets
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


def package_version(name: str) -> str:
    """The installed version of a distribution, read from its metadata (no import of the package itself)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def cached(folder: Path | None, key: str, build: Callable[[], Arrays]) -> Arrays:
    """The arrays stored under `key` in `folder`; built (and stored) when absent or unreadable. No folder, no cache."""
    if folder is None:
        return build()
    path = folder / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # absent, or damaged by something outside us (a rename is atomic): make it again
    arrays = build()
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp.npz"
    try:
        np.savez(temporary, allow_pickle=False, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return arrays
