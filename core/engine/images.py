"""Image datasets: a .zip of images in class-named folders. Every image's size comes from its header, and the whole
is checked against the memory budget before any image is decoded."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from core.engine.budget import DatasetTooLarge, check_budget
from core.spec import SpecError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BYTES_PER_PIXEL = 24  # decoding one image: PIL's 4-byte pixels, a converted copy and float32 channels


def read_images(zf: zipfile.ZipFile, max_bytes: int | None) -> tuple[np.ndarray, list[str]]:
    """The images as one float32 array (N, C, H, W), each resized to the first one's size, and their labels.
    Grayscale when every image is, RGB otherwise."""
    entries = _image_entries(zf)
    if not entries:
        raise SpecError("data.dataset", "the zip holds no .png or .jpg images")
    sizes, modes = zip(*(_header(zf, info) for info, _ in entries), strict=True)
    mode, (w, h) = ("L" if all(m == "L" for m in modes) else "RGB"), sizes[0]
    channels = 1 if mode == "L" else 3
    largest = max(sizes, key=lambda s: s[0] * s[1])
    what = f"{len(entries)} images of {channels}x{h}x{w} (the largest {largest[0]}x{largest[1]} pixels)"
    check_budget(len(entries) * channels * h * w * 4 + largest[0] * largest[1] * BYTES_PER_PIXEL, max_bytes, what)
    x = np.empty((len(entries), channels, h, w), dtype=np.float32)
    for i, (info, _) in enumerate(entries):
        with _image(zf, info) as img:
            pixels = np.asarray(img.convert(mode).resize((w, h)), dtype=np.float32)
        x[i] = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    return x, [label for _, label in entries]


def _image_entries(zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """The image members in name order, each with its label (the name of its folder)."""
    entries = []
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        parts = _safe_parts(info.filename)
        name = parts[-1].lower()
        if info.is_dir() or "__MACOSX" in parts or name.startswith(".") or not name.endswith(IMAGE_SUFFIXES):
            continue  # folders, macOS resource forks and hidden files, files that are not images
        if len(parts) < 2:
            raise SpecError("data.dataset", f"{info.filename}: images must sit in class-named folders")
        entries.append((info, parts[-2]))
    return entries


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, int], str]:
    """An image's size and mode, from its header: Image.open decodes no pixels."""
    with _image(zf, info) as img:
        return img.size, img.mode


@contextmanager
def _image(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[Image.Image]:
    """An image of the zip, opened (its header read) but not decoded; errors while decoding it name it too."""
    from PIL import Image

    try:
        with zf.open(info) as f, Image.open(f) as img:
            yield img
    except Image.DecompressionBombError as e:
        raise DatasetTooLarge(f"{info.filename}: {e}") from None
    except OSError as e:
        raise SpecError("data.dataset", f"{info.filename}: not a readable image ({e})") from None


def _safe_parts(name: str) -> tuple[str, ...]:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise SpecError("data.dataset", f"unsafe path in the zip: {name!r}")
    return parts
