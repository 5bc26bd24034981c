"""Hostile dataset files for tests: small to send, huge once decoded, or lying in their headers."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

ZEROS = bytes(1 << 20)


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A .npy header (format 1.0) declaring `shape` and `dtype`, without the data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz_declaring(shape: tuple[int, ...], dtype: str = "<f4", data: bytes = bytes(16)) -> bytes:
    """An .npz whose x.npy header declares `shape` but holds only `data`; y is a small valid array."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", npy_header(shape, dtype) + data)
        zf.writestr("y.npy", npy_header((4,), "<i8") + bytes(32))
    return buf.getvalue()


def zeros_npz(x_shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A deflated .npz whose x is all zeros, consistent in every header and checksum: a few MB that unpack to
    whatever `x_shape` says (1000 x 10**6 float32: 3.9 MB for 4 GB). Built from one compressed chunk repeated,
    because compressing gigabytes of zeros would take the test a minute."""
    n = len(x_shape) and x_shape[0]
    x_bytes = int(np.prod(x_shape)) * np.dtype(dtype).itemsize
    members = {"x.npy": (npy_header(x_shape, dtype), x_bytes), "y.npy": (npy_header((n,), "<i8"), 8 * n)}
    return _deflated_zip(members)


def png_bomb_zip(side: int = 8000, count: int = 4) -> bytes:
    """A zip of `count` black 1-bit PNGs of side x side pixels in two class folders (about 60 KB each)."""
    png = io.BytesIO()
    Image.new("1", (side, side)).save(png, format="PNG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(count):
            zf.writestr(f"{'ab'[i % 2]}/{i}.png", png.getvalue())
    return buf.getvalue()


def _deflated_zip(members: dict[str, tuple[bytes, int]]) -> bytes:
    """A zip of deflated members, each `prefix` followed by `n_zeros` zero bytes (sizes below 4 GiB: no ZIP64)."""
    out, directory = io.BytesIO(), []
    for name, (prefix, n_zeros) in members.items():
        data, crc = _deflated(prefix, n_zeros)
        size, offset = len(prefix) + n_zeros, out.tell()
        fields = (20, 0, zipfile.ZIP_DEFLATED, 0, 0x21, crc, len(data), size, len(name), 0)
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields) + name.encode() + data)
        directory.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, offset) + name.encode())
    start = out.tell()
    out.write(b"".join(directory))
    n = len(directory)
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, out.tell() - start, start, 0))
    return out.getvalue()


def _deflated(prefix: bytes, n_zeros: int) -> tuple[bytes, int]:
    """Raw deflate of prefix + zeros, and its CRC-32. A fully flushed block depends on nothing before it, so the
    compressed megabyte of zeros is repeated as is."""
    whole, rest = divmod(n_zeros, len(ZEROS))
    block = _flushed(ZEROS)
    crc = zlib.crc32(prefix)
    for _ in range(whole):
        crc = zlib.crc32(ZEROS, crc)
    crc = zlib.crc32(ZEROS[:rest], crc)
    data = _flushed(prefix) + block * whole + _flushed(ZEROS[:rest]) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    return data, crc


def _flushed(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)
