"""Running out of disk: recognise a full disk behind any error (file writes, SQLite, PostgreSQL) and measure the
free space of the service's folders."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL: "database or disk is full"
POSTGRES_DISK_FULL = "53100"  # SQLSTATE disk_full
# Some writers (safetensors, torch's zip writer) wrap the OSError in their own text.
FULL_MESSAGES = ("no space left on device", "database or disk is full", "disk quota exceeded")


class StorageFull(Exception):
    """A folder the service writes to has less free space than it needs; `path` names it."""

    def __init__(self, path: Path, free_bytes: int, message: str | None = None):
        mib = free_bytes / 2**20
        super().__init__(message or f"the disk is full: {path} has {mib:.1f} MiB free")
        self.path, self.free_bytes = path, free_bytes


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an error it wraps (its cause, its context, a database driver's original error), says that
    the disk or the database's storage is full."""
    return any(_says_full(e) for e in _chain(exc))


def _says_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return True
    if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
        return True
    if getattr(exc, "sqlstate", None) == POSTGRES_DISK_FULL:  # psycopg.errors.DiskFull
        return True
    return any(text in str(exc).lower() for text in FULL_MESSAGES)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)  # sqlalchemy.exc.DBAPIError keeps the driver's error here
        todo += [e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None]


def free_bytes(path: Path) -> int:
    """Free bytes of the filesystem holding `path` (or its nearest existing parent), for unprivileged writers."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


@dataclass(frozen=True)
class FreeSpace:
    """The folder with the least free space among those checked, and that space."""

    path: Path
    free_bytes: int


def least_free(folders: Iterable[Path]) -> FreeSpace:
    """The folder of `folders` whose filesystem has the least free space."""
    return min((FreeSpace(p, free_bytes(p)) for p in folders), key=lambda f: f.free_bytes)


def check_free_space(folders: Iterable[Path], min_free_mb: int) -> None:
    """Raise StorageFull unless every folder's filesystem has at least `min_free_mb` MiB free."""
    least = least_free(folders)
    if least.free_bytes < min_free_mb * 2**20:
        raise StorageFull(least.path, least.free_bytes)
