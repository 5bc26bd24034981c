"""The artifact store in a local folder vs in S3, side by side in one run: dataset uploads and checkpoints.

S3 is a moto server (a real S3-protocol server over HTTP, in a process of its own on this machine), so the numbers
are what the S3 code path costs (boto3, HTTP, the bytes copied once more), not a network or a real object store.
  - upload: POST /v1/datasets of a .npz of each of --sizes MiB (float32 x, int y) to a real API process per store
    (`python -m cli.main api` on its own SQLite home), the two stores taking turns, --repeats times; MiB/s of the
    whole request (receive, hash, validate, store), medians.
  - checkpoint: worker.runner.run_job in this process on examples/digits-cnn.yaml for --epochs epochs (early
    stopping off, a checkpoint every epoch), the two stores taking turns, --repeats times; seconds per epoch
    between consecutive epoch_end events (the first epoch drops out; each later one includes the previous
    epoch's checkpoint upload), medians, S3 over local; and the median time of store.put_file on a checkpoint
    snapshot and on the model, with their sizes. The local store's put_file is nothing: the worker writes its
    checkpoints where the store keeps them.
One thread for torch, in this process and the API's. The machine's load average is printed with the results.

    python bench/storage.py [--sizes 64,8] [--repeats 5] [--epochs 8] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this file belongs to, whatever copy of the project is installed

from common import free_port, wait_ready  # noqa: E402

from core import jobs, tenants  # noqa: E402
from core.artifacts import Store, open_store  # noqa: E402
from core.config import Settings  # noqa: E402
from core.db import Database, init_db  # noqa: E402
from core.submit import Caps, submit  # noqa: E402

STORES = ("local", "s3")
TENANT = "bench"
BUCKET = "trickserve-bench"
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FEATURES = 64  # columns of x; the example count makes up the size


def store_settings(kind: str, endpoint: str) -> dict[str, str | None]:
    """The Settings fields that pick the store of `kind`."""
    if kind == "local":
        return {"storage_url": None, "s3_endpoint_url": None}
    return {"storage_url": f"s3://{BUCKET}/{kind}", "s3_endpoint_url": endpoint}


def run_env(home: Path, **fields: str | None) -> dict[str, str]:
    """This process's environment without its TRICKSERVE_* variables, with `home` and `fields` as variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRICKSERVE_")}
    env |= {"TRICKSERVE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return env | {f"TRICKSERVE_{k.upper()}": v for k, v in fields.items() if v is not None}


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def moto_server() -> Iterator[str]:
    """The endpoint of a moto S3 server holding an empty BUCKET, stopped afterwards."""
    import boto3
    from botocore.exceptions import EndpointConnectionError

    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except EndpointConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield endpoint
    finally:
        stop(server)


# ------------------------------------------------------------------------------------------------ upload


@dataclass
class Api:
    """A real API process on a store of `kind`, and the headers of a key of TENANT."""

    kind: str
    base: str
    headers: dict[str, str]


@contextmanager
def api(kind: str, endpoint: str) -> Iterator[Api]:
    """`python -m cli.main api` on a fresh SQLite home, storing to the store of `kind`."""
    with tempfile.TemporaryDirectory(prefix=f"trickserve-bench-storage-{kind}-") as folder:
        home = Path(folder)
        url = f"sqlite:///{home / 'trickserve.db'}"
        init_db(url)
        db = Database(url)
        with db.session() as s:
            tenants.create_tenant(session=s, tenant_id=TENANT)
            key = tenants.create_api_key(session=s, tenant_id=TENANT)
        db.dispose()
        port = free_port()
        argv = [sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(port)]
        env = run_env(home, database_url=url, **store_settings(kind, endpoint))
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base)
            yield Api(kind, base, {"Authorization": f"Bearer {key}"})
        finally:
            stop(process)


def make_npz(folder: Path, mib: int) -> Path:
    """A .npz of about `mib` MiB: x float32 (n, FEATURES), y int64 labels of 10 classes."""
    n = mib * 2**20 // (FEATURES * 4 + 8)
    rng = np.random.default_rng(0)
    path = folder / f"upload-{mib}mib.npz"
    np.savez(path, x=rng.standard_normal((n, FEATURES), dtype=np.float32), y=rng.integers(0, 10, n))
    return path


def upload_s(service: Api, path: Path) -> float:
    """Seconds from the first byte of a POST /v1/datasets of `path` to its 201."""
    with httpx.Client(base_url=service.base, headers=service.headers, timeout=300) as http, open(path, "rb") as f:
        t0 = time.perf_counter()
        response = http.post("/v1/datasets", files={"file": (path.name, f, "application/octet-stream")})
        elapsed = time.perf_counter() - t0
    if response.status_code != 201:
        raise RuntimeError(f"{service.kind}: upload answered {response.status_code}: {response.text[:300]}")
    return elapsed


def measure_uploads(endpoint: str, sizes: list[int], repeats: int) -> dict[str, dict[int, float]]:
    """Median MiB/s per store and size."""
    seconds: dict[str, dict[int, list[float]]] = {kind: {mib: [] for mib in sizes} for kind in STORES}
    with (
        tempfile.TemporaryDirectory(prefix="trickserve-bench-storage-files-") as folder,
        api("local", endpoint) as local,
        api("s3", endpoint) as s3,
    ):
        files = {mib: make_npz(Path(folder), mib) for mib in sizes}
        services = [local, s3]
        for service in services:
            upload_s(service, files[min(sizes)])  # warm-up: imports, the first connection to the store
        for repeat in range(repeats):
            for mib in sizes:
                for service in services[:: 1 if repeat % 2 == 0 else -1]:  # each store goes first every other time
                    seconds[service.kind][mib].append(upload_s(service, files[mib]))
        actual = {mib: path.stat().st_size / 2**20 for mib, path in files.items()}
    return {kind: {mib: actual[mib] / statistics.median(s) for mib, s in per.items()} for kind, per in seconds.items()}


# -------------------------------------------------------------------------------------------- checkpoint


@dataclass
class Put:
    """One store.put_file: the file's name, its size and how long it took."""

    name: str
    size_bytes: int
    seconds: float


@dataclass
class Worker:
    """What a worker process has for a store of `kind` (its settings, database and store), and every put_file."""

    kind: str
    settings: Settings
    db: Database
    store: Store
    puts: list[Put] = field(default_factory=list)


@contextmanager
def worker(kind: str, endpoint: str, folder: Path) -> Iterator[Worker]:
    """A migrated SQLite home under `folder` with the store of `kind`, its put_file timed."""
    home = folder / kind
    settings = Settings(home=home, database_url=f"sqlite:///{home / 'trickserve.db'}", **store_settings(kind, endpoint))
    settings.ensure_dirs()
    init_db(settings.database_url)
    db = Database.from_settings(settings)
    w = Worker(kind, settings, db, open_store(settings))
    put_file = w.store.put_file

    def timed(key: str, path: Path, *, move: bool = False) -> None:
        size, t0 = path.stat().st_size, time.perf_counter()
        put_file(key, path, move=move)
        w.puts.append(Put(PurePosixPath(key).name, size, time.perf_counter() - t0))

    w.store.put_file = timed  # type: ignore[method-assign]
    try:
        yield w
    finally:
        db.dispose()


def digits_spec(epochs: int) -> dict[str, Any]:
    """examples/digits-cnn.yaml for exactly `epochs` epochs on the CPU: no early stopping, no time budget to hit."""
    spec = yaml.safe_load((REPO / "examples" / "digits-cnn.yaml").read_text())
    spec["train"] |= {"epochs": epochs, "early_stopping": None, "checkpoint_every": 1}
    spec["resources"] |= {"device": "cpu", "max_runtime_s": 3600}
    return spec


def run_digits(w: Worker, epochs: int) -> tuple[list[float], list[Put]]:
    """Submit and run one job in this process; the seconds between its consecutive epoch ends, and its puts."""
    from worker.runner import run_job

    with w.db.session() as session:
        tenants.create_tenant(session=session, tenant_id=TENANT)
        caps = Caps.from_settings(w.settings)
        job_id = submit(session=session, tenant_id=TENANT, spec_dict=digits_spec(epochs), caps=caps).job.job_id
    first = len(w.puts)
    status = run_job(job_id, worker_id=f"bench-{w.kind}", settings=w.settings, db=w.db, store=w.store)
    if status != "succeeded":
        raise RuntimeError(f"{w.kind}: job {job_id} ended {status}")
    with w.db.session(read_only=True) as session:
        ends = [e.created_at.timestamp() for e in jobs.list_events(session, job_id, kinds=["epoch_end"])]
    return [b - a for a, b in pairwise(ends)], w.puts[first:]


def measure_checkpoints(endpoint: str, epochs: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per store: median s/epoch (of each run's median), and the median put_file time and size of a checkpoint
    snapshot and of the model."""
    per_epoch: dict[str, list[float]] = {kind: [] for kind in STORES}
    puts: dict[str, list[Put]] = {kind: [] for kind in STORES}
    with (
        tempfile.TemporaryDirectory(prefix="trickserve-bench-storage-worker-") as folder,
        worker("local", endpoint, Path(folder)) as local,
        worker("s3", endpoint, Path(folder)) as s3,
    ):
        workers = [local, s3]
        for repeat in range(repeats):
            for w in workers[:: 1 if repeat % 2 == 0 else -1]:
                epoch_s, run_puts = run_digits(w, epochs)
                per_epoch[w.kind].append(statistics.median(epoch_s))
                puts[w.kind] += run_puts
    out: dict[str, dict[str, float]] = {}
    for kind in STORES:
        checkpoints = [p for p in puts[kind] if p.name.startswith("checkpoint.")]
        models = [p for p in puts[kind] if p.name.endswith(".safetensors")]
        out[kind] = {
            "epoch_s": statistics.median(per_epoch[kind]),
            "checkpoint_put_s": statistics.median(p.seconds for p in checkpoints),
            "checkpoint_mib": statistics.median(p.size_bytes for p in checkpoints) / 2**20,
            "model_put_s": statistics.median(p.seconds for p in models),
            "model_mib": statistics.median(p.size_bytes for p in models) / 2**20,
        }
    return out


# ------------------------------------------------------------------------------------------------ report


def table(uploads: dict[str, dict[int, float]], checkpoints: dict[str, dict[str, float]], epochs: int) -> str:
    """The results as a markdown table; S3/local only where local is a measure of the same work."""
    local, s3 = checkpoints["local"], checkpoints["s3"]
    rows = [(f"upload {mib} MiB .npz (MiB/s)", uploads["local"][mib], uploads["s3"][mib], "{:.0f}", True)
            for mib in uploads["local"]]  # fmt: skip
    rows += [
        (f"digits-cnn s/epoch ({epochs} epochs, checkpoint each)", local["epoch_s"], s3["epoch_s"], "{:.3f}", True),
        (f"checkpoint put_file ms ({s3['checkpoint_mib']:.2f} MiB)", 1000 * local["checkpoint_put_s"],
         1000 * s3["checkpoint_put_s"], "{:.1f}", False),
        (f"model put_file ms ({s3['model_mib']:.2f} MiB)", 1000 * local["model_put_s"], 1000 * s3["model_put_s"],
         "{:.1f}", False),
    ]  # fmt: skip
    lines = ["| measure | local | S3 (moto) | S3/local |", "|---|---:|---:|---:|"]
    for name, a, b, fmt, comparable in rows:
        ratio = f"{b / a:.2f}" if comparable else "-"  # the local put_file of the worker's own files does nothing
        lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,8", help="comma-separated upload sizes (MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="uploads per size and store; jobs per store")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each digits-cnn job")
    parser.add_argument("--quick", action="store_true", help="a smoke run: --sizes 8 --repeats 2 --epochs 3")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.epochs = "8", 2, 3
    sizes = [int(mib) for mib in args.sizes.split(",")]
    os.environ |= MOTO_ENV  # boto3 in this process and in the API's talks to moto only
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    load = [os.getloadavg()]
    with moto_server() as endpoint:
        uploads = measure_uploads(endpoint, sizes, args.repeats)
        checkpoints = measure_checkpoints(endpoint, args.epochs, args.repeats)
    load.append(os.getloadavg())
    print(f"\n{REPO}: {len(os.sched_getaffinity(0))} CPUs, load average (1 min) {load[0][0]:.2f} before, "
          f"{load[1][0]:.2f} after; medians of {args.repeats} repeats{' (--quick)' * args.quick}\n")  # fmt: skip
    print(table(uploads, checkpoints, args.epochs))
    ratio = checkpoints["s3"]["epoch_s"] / checkpoints["local"]["epoch_s"]
    extra_ms = 1000 * (checkpoints["s3"]["epoch_s"] - checkpoints["local"]["epoch_s"])
    print(f"\nS3 adds {extra_ms:.1f} ms per epoch; checkpoint_epoch_s3_vs_local={ratio:.3f}")


if __name__ == "__main__":
    main()
