"""Built-in datasets made once and kept in a cache folder: the same arrays as made fresh, safe under two builders at
once, rebuilt when damaged, and a later job's process never imports what made them."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from core.engine import data
from core.engine.datacache import cached
from core.spec import DataSpec

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["builtin:digits", "builtin:mnist1d"])
def test_a_cached_dataset_is_the_one_made_fresh(tmp_path: Path, name: str):
    spec = DataSpec(dataset=name)
    fresh = data._read(spec, None)
    first, second = data._read(spec, None, tmp_path), data._read(spec, None, tmp_path)  # made, then read back
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for raw in (first, second):
        np.testing.assert_array_equal(raw.x, fresh.x)
        np.testing.assert_array_equal(raw.y, fresh.y)
        assert (raw.test is None) == (fresh.test is None) and raw.names == fresh.names
        if fresh.test is not None and raw.test is not None:
            np.testing.assert_array_equal(raw.test[0], fresh.test[0])


def test_two_builders_at_once_both_get_the_arrays_and_leave_one_file(tmp_path: Path):
    started, results = threading.Barrier(2), []

    def build() -> dict[str, np.ndarray]:
        started.wait()  # both are building before either has stored anything
        return {"x": np.arange(100_000, dtype=np.float32)}

    threads = [threading.Thread(target=lambda: results.append(cached(tmp_path, "k", build))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and all(np.array_equal(r["x"], np.arange(100_000)) for r in results)
    assert [p.name for p in tmp_path.iterdir()] == ["k.npz"]  # no temporary file left behind


def test_an_entry_is_built_once_and_a_damaged_one_again(tmp_path: Path):
    builds = []

    def build() -> dict[str, np.ndarray]:
        builds.append(1)
        return {"x": np.ones(3)}

    cached(tmp_path, "k", build)
    cached(tmp_path, "k", build)
    assert len(builds) == 1
    (tmp_path / "k.npz").write_bytes(b"torn")
    np.testing.assert_array_equal(cached(tmp_path, "k", build)["x"], np.ones(3))
    assert len(builds) == 2


def test_a_later_process_reads_digits_without_importing_scikit_learn(tmp_path: Path):
    code = (
        "import sys; from pathlib import Path; from core.engine.data import load_data; from core.spec import DataSpec; "
        f"load_data(DataSpec(dataset='builtin:digits'), cache_dir=Path({str(tmp_path)!r})); "
        "print('sklearn' in sys.modules)"
    )
    run = [sys.executable, "-c", code]
    first = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    later = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert (first.stdout.strip(), later.stdout.strip()) == ("True", "False"), first.stderr + later.stderr
