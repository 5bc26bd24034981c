"""What reading an untrusted dataset file may cost: a memory budget checked against what the file declares before
it is decoded, and bounds on zip archives checked before zipfile parses them."""

from __future__ import annotations

import zipfile
from pathlib import Path

from core.spec import SpecError

MAX_ZIP_ENTRIES = 200_000
MAX_ZIP_BYTES = 2 << 30  # decompressed, as declared by the archive (zipfile never reads past a declared size)
# zipfile parses the whole central directory into objects (~0.5 KiB an entry) before the entries can be counted.
MAX_ZIP_DIRECTORY_BYTES = 24 << 20
# bzip2 and LZMA members are decompressed a whole read at a time, thousands of times larger than what was read.
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}


class DatasetTooLarge(SpecError):
    """A dataset file that would take more memory to read than its budget allows."""

    def __init__(self, message: str):
        super().__init__("data.dataset", message)


def check_budget(nbytes: int, max_bytes: int | None, what: str) -> None:
    """DatasetTooLarge, naming `what` takes `nbytes`, when that is over `max_bytes` (None: no budget)."""
    if max_bytes is not None and nbytes > max_bytes:
        limit = f"a dataset may take at most {size(max_bytes)} of memory to read"
        raise DatasetTooLarge(f"{what}: {size(nbytes)} once decoded; {limit}")


def size(n: int) -> str:
    """A byte count for people: 3.6 TiB, 740.0 MiB."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = min(max(0, (n.bit_length() - 1) // 10), len(units) - 1)
    return f"{n} bytes" if i == 0 else f"{n / 1024**i:.1f} {units[i]}"


def open_zip(p: Path) -> zipfile.ZipFile:
    """The archive, once its central directory, entry count, methods and unpacked size are known to be bounded."""
    with p.open("rb") as f:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the end record, which ZipFile itself reads
    if end and end[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY_BYTES:  # type: ignore[attr-defined]
        raise SpecError("data.dataset", f"the zip's directory is over {size(MAX_ZIP_DIRECTORY_BYTES)}")
    zf = zipfile.ZipFile(p)
    try:
        _check_entries(zf.infolist())
    except BaseException:
        zf.close()
        raise
    return zf


def _check_entries(infos: list[zipfile.ZipInfo]) -> None:
    if len(infos) > MAX_ZIP_ENTRIES:
        raise SpecError("data.dataset", f"the zip has {len(infos)} entries; at most {MAX_ZIP_ENTRIES}")
    unpacked = sum(i.file_size for i in infos)
    if unpacked > MAX_ZIP_BYTES:
        raise DatasetTooLarge(f"the zip's members unpack to {size(unpacked)}; at most {size(MAX_ZIP_BYTES)}")
    odd = next((i for i in infos if i.compress_type not in ZIP_METHODS), None)
    if odd is not None:
        message = f"{odd.filename}: compression method {odd.compress_type}; use {' or '.join(ZIP_METHODS.values())}"
        raise SpecError("data.dataset", message)
