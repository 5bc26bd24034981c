"""What a fresh job process spends on a built-in dataset, with and without the dataset cache, side by side.

Each run is a new Python process that imports the engine's data module and loads the dataset, as a worker's job
process does; the runs take turns (fresh, cached, fresh, ...) so both see the same machine. Prints the medians and
`dataset_cache_speedup=` per dataset.

    python bench/dataset_cache.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = """
import time
started = time.perf_counter()
from pathlib import Path
from core.engine.data import load_data
from core.spec import DataSpec
cache = {cache!r}
load_data(DataSpec(dataset={name!r}), cache_dir=Path(cache) if cache else None)
print(time.perf_counter() - started)
"""


def seconds(name: str, cache: str | None) -> float:
    out = subprocess.run([sys.executable, "-c", CODE.format(name=name, cache=cache)], cwd=REPO, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        for name in ("builtin:digits", "builtin:mnist1d"):
            seconds(name, cache)  # fill the cache
            fresh, kept = [], []
            for _ in range(args.runs):
                fresh.append(seconds(name, None))
                kept.append(seconds(name, cache))
            f, k = statistics.median(fresh), statistics.median(kept)
            print(f"{name}: fresh {f:.2f} s, cached {k:.2f} s (medians of {args.runs}, import included)")
            print(f"dataset_cache_speedup[{name}]={f / k:.2f}")


if __name__ == "__main__":
    main()
