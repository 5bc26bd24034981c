"""Reading untrusted dataset files: what a file declares is checked against the memory budget before it is decoded,
and malformed or hostile files are a SpecError naming data.dataset, never an exception of numpy, csv or PIL."""

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.engine import budget, files
from core.engine.budget import DatasetTooLarge
from core.engine.files import describe_dataset
from core.spec import SpecError
from tests.bombs import npz_declaring, png_bomb_zip, zeros_npz

MiB = 2**20


def write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_an_npz_bomb_is_refused_from_its_header_without_decoding(tmp_path):
    path = write(tmp_path, "bomb.npz", zeros_npz((256, MiB)))  # 1 GiB of float32 zeros in about 1 MB
    tracemalloc.start()
    try:
        with pytest.raises(DatasetTooLarge) as e:
            describe_dataset(path, max_bytes=64 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.path == "data.dataset"
    assert "x.npy declares shape (256, 1048576) of float32" in e.value.message
    assert "1.0 GiB" in e.value.message and "64.0 MiB" in e.value.message
    assert peak < 8 * MiB  # numpy reports its allocations to tracemalloc: the array was never allocated


def test_the_budget_counts_the_float32_copy_of_other_dtypes(tmp_path):
    x, y = np.zeros((1000, 1000)), np.arange(1000) % 2  # 7.6 MiB of float64, converted to 3.8 MiB of float32
    np.savez(tmp_path / "a.npz", x=x, y=y)
    with pytest.raises(DatasetTooLarge):
        describe_dataset(tmp_path / "a.npz", max_bytes=10 * MiB)
    assert describe_dataset(tmp_path / "a.npz", max_bytes=12 * MiB)["n_examples"] == 1000


def test_an_npz_header_that_declares_more_than_its_member_holds_is_refused_without_a_budget(tmp_path):
    path = write(tmp_path, "lies.npz", npz_declaring((10**12,)))
    with pytest.raises(SpecError) as e:
        describe_dataset(path)  # the command line reads local files with no budget: still no 3.6 TiB allocation
    assert "x.npy declares shape (1000000000000,) of float32 (3.6 TiB) but holds 16 bytes" in e.value.message


@pytest.mark.parametrize(
    ("x", "complaint"),
    [
        (np.array([{"a": 1}] * 4, dtype=object), "only plain numbers or strings"),
        (np.zeros(4, dtype=[("a", "<f4"), ("b", "<i4")]), "only plain numbers or strings"),
        (np.array(["a", "b", "c", "d"]), "x must be numeric"),
        (np.ones((4, 2), dtype=np.complex64), "x must be numeric"),
    ],
)
def test_npz_arrays_of_the_wrong_kind_are_refused_from_their_header(tmp_path, x, complaint):
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(4) % 2)  # object arrays are pickled: never unpickled on reading
    with pytest.raises(SpecError, match=complaint):
        describe_dataset(tmp_path / "a.npz")


def test_an_npz_member_that_is_not_an_npy_array_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as zf:
        zf.writestr("x", b"not an array")
        zf.writestr("y.npy", b"\x93NUMPY junk")
    with pytest.raises(SpecError, match="x is not a readable .npy array"):
        describe_dataset(tmp_path / "a.npz")


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_inputs_are_refused(tmp_path, bad):
    x = np.ones((6, 2), dtype=np.float32)
    x[4, 1] = bad
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(6) % 2)
    with pytest.raises(SpecError, match="NaN or infinite"):
        describe_dataset(tmp_path / "a.npz")


# ----------------------------------------------------------------------------------------------- csv


def test_a_csv_field_over_the_csv_module_limit_is_a_spec_error_naming_its_line(tmp_path):
    path = write(tmp_path, "big.csv", f"f1,label\n1.0,0\n{'9' * 200 * 1024},1\n")
    with pytest.raises(SpecError) as e:
        describe_dataset(path)
    assert e.value.path == "data.dataset" and e.value.message.startswith("line 3: field larger than field limit")


def test_csv_rows_are_counted_against_the_budget_before_they_are_parsed(tmp_path):
    path = write(tmp_path, "rows.csv", "a,b,label\n" + "1,2,x\n" * 100_000 + "3,4,y\n")
    with pytest.raises(DatasetTooLarge, match="100001 rows of 2 features"):
        describe_dataset(path, max_bytes=MiB)
    assert describe_dataset(path, max_bytes=64 * MiB)["n_examples"] == 100_001


def test_one_long_label_counts_for_every_row(tmp_path):
    # The labels become one string array as wide as the longest: 1000 rows x 100 KB each.
    path = write(tmp_path, "labels.csv", "a,label\n" + "1,x\n" * 999 + f"2,{'y' * 100_000}\n")
    with pytest.raises(DatasetTooLarge):
        describe_dataset(path, max_bytes=64 * MiB)


def test_csv_is_parsed_in_chunks_with_the_same_values_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CSV_CHUNK_ROWS", 4)
    rows = "".join(f"{i},{i / 2},{'ab'[i % 2]}\n\n" for i in range(10))  # blank lines are skipped
    raw = files.read_file(write(tmp_path, "a.csv", f"a, b ,label\n{rows}"), "label")
    assert raw.x.tolist() == [[i, i / 2] for i in range(10)] and raw.names == ["a", "b"]
    assert raw.y.tolist() == [i % 2 for i in range(10)]
    with pytest.raises(SpecError, match="column 'b' is not numeric"):
        describe_dataset(write(tmp_path, "a.csv", f"a,b,label\n{rows}7,seven,a\n"))


# ----------------------------------------------------------------------------------------------- zip


def test_images_are_measured_from_their_headers_against_the_budget(tmp_path):
    path = write(tmp_path, "bomb.zip", png_bomb_zip(side=8000, count=4))  # about 1 KB
    with pytest.raises(DatasetTooLarge) as e:
        describe_dataset(path, max_bytes=1024 * MiB)
    assert "4 images of 3x8000x8000" in e.value.message and "1.0 GiB" in e.value.message


def test_images_within_the_budget_are_read_into_one_array(tmp_path):
    members = {f"{c}/{i}.png": png(Image.new("RGB", (30, 20), (i, 0, 0))) for c in "ab" for i in range(3)}
    path = tmp_path / "ok.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = files.read_file(path, "label", max_bytes=MiB)
    assert raw.x.shape == (6, 3, 20, 30) and raw.x[:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2]


def test_an_image_over_pillows_own_bomb_limit_is_too_large_even_without_a_budget(tmp_path):
    path = write(tmp_path, "huge.zip", png_bomb_zip(side=14_000, count=2))  # 196 million pixels each
    with pytest.raises(DatasetTooLarge, match="a/0.png"):
        describe_dataset(path)


def test_zip_members_compressed_with_bzip2_are_refused(tmp_path):
    # bzip2 and LZMA output is not bounded by the size of a read: a few KB can unpack to gigabytes at once.
    with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_BZIP2) as zf:
        for name in ("a/1.png", "b/2.png"):
            zf.writestr(name, png(Image.new("L", (4, 4))))
    with pytest.raises(SpecError, match="a/1.png: compression method 12; use stored or deflate"):
        describe_dataset(tmp_path / "a.zip")


def test_a_zip_directory_too_large_to_parse_is_refused_before_parsing(tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for i in range(20):
            zf.writestr(f"{'ab'[i % 2]}/{i}.png", png(Image.new("L", (4, 4))))
    monkeypatch.setattr(budget, "MAX_ZIP_DIRECTORY_BYTES", 500)
    with pytest.raises(SpecError, match="directory"):
        describe_dataset(tmp_path / "a.zip")
