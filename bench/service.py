"""Service latency and throughput, both modes side by side in one run: a real API (uvicorn) and a real worker.

For each mode (embedded: SQLite + filesystem broker; production: PostgreSQL + Redis) it measures
  - submit -> running: time from sending the POST to the job's `running` transition (worker idle beforehand),
  - event latency: engine emission time of each event (stored with it) to its arrival at an SSE client,
  - metric-page reads per second: sequential GET /v1/jobs/{id}/metrics?limit=100 on one keep-alive connection.
Medians and p95 are printed. Needs the machine's PostgreSQL and Redis for the production mode.

    python bench/service.py [--jobs 5] [--read-seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from common import free_port, postgres_database, wait_ready

REPO = Path(__file__).resolve().parents[1]
REDIS = os.environ.get("TRICKSERVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
SPEC = {
    "name": "bench",
    "data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 2000, "n_features": 32}},
    "model": {"arch": "mlp", "layers": [64]},
    "train": {"epochs": 30, "batch_size": 64},
    "resources": {"device": "cpu"},
}


@contextmanager
def service(mode: str):
    """Start migrations, an API and one worker for `mode`; yields (base_url, headers)."""
    home = Path(tempfile.mkdtemp(prefix=f"trickserve-bench-{mode}-"))
    env = {**os.environ, "TRICKSERVE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    with (postgres_database() if mode == "production" else _nothing()) as pg_url:
        if mode == "production":
            import redis

            redis.Redis.from_url(REDIS).flushdb()
            env.update(TRICKSERVE_DATABASE_URL=pg_url, TRICKSERVE_BROKER_URL=REDIS, TRICKSERVE_REDIS_URL=REDIS)
        headers = _prepare(env)
        port = free_port()
        procs = [
            subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--port", str(port)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.main", "worker", "-Q", "cpu,gpu",
                              "--loglevel", "WARNING", "-n", f"bench-{mode}@%h"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base)
            time.sleep(3)  # let the worker connect
            yield base, headers
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


@contextmanager
def _nothing():
    yield None


def _prepare(env: dict[str, str]) -> dict[str, str]:
    """`trickserve migrate` and `trickserve keys create`, as an operator sets the service up; the key's header."""
    trickserve = [sys.executable, "-m", "cli.main"]
    subprocess.run([*trickserve, "migrate"], cwd=REPO, env=env, capture_output=True, check=True)
    out = subprocess.run([*trickserve, "keys", "create", "--tenant", "bench"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    return {"Authorization": f"Bearer {out.stdout.strip().splitlines()[-1]}"}


def submit_to_running(c: httpx.Client, n: int) -> tuple[list[float], str]:
    """Latency from sending the POST to the `running` transition, one job at a time on an idle worker."""
    out, job_id = [], ""
    for _ in range(n):
        t0 = time.time()
        r = c.post("/v1/jobs", json=SPEC)
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "early_stopped", "failed", "cancelled"):
                break
            time.sleep(0.05)
        started = next(t for t in c.get(f"/v1/jobs/{job_id}/transitions").json() if t["to"] == "running")
        out.append(_ts(started["at"]) - t0)
        time.sleep(6)  # the worker replaces its pool process between jobs: measure an idle worker
    return out, job_id


def event_latency(c: httpx.Client) -> list[float]:
    """Arrival time at an SSE client minus the engine's emission time, for every event of a fresh job."""
    job_id = c.post("/v1/jobs", json=SPEC).json()["id"]
    lat = []
    with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(10, read=120)) as r:
        data = None
        for line in r.iter_lines():
            if line.startswith("data:"):
                data = json.loads(line[5:])
            elif not line and data is not None:
                if data.get("kind") in ("progress", "epoch_end", "early_stop", "checkpoint", "test"):
                    lat.append(time.time() - _ts(data["at"]))
                if "kind" not in data:  # the `end` message: {"status": ...}
                    break
                data = None
    return lat


def metric_reads(c: httpx.Client, job_id: str, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 100}).raise_for_status()
        n += 1
    return n / (time.perf_counter() - t0)


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[-1] if len(xs) >= 2 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--read-seconds", type=float, default=5.0)
    ap.add_argument("--modes", default="embedded,production")
    args = ap.parse_args()
    rows = []
    for mode in args.modes.split(","):
        with service(mode) as (base, headers), httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            sub, job_id = submit_to_running(c, args.jobs)
            lat = event_latency(c)
            reads = [metric_reads(c, job_id, args.read_seconds / 3) for _ in range(3)]
        rows.append((mode, sub, lat, reads))
    print(f"{'mode':<11}{'submit->running s (median/p95)':>32}{'event latency ms (median/p95, n)':>36}"
          f"{'metric pages/s (median)':>26}")
    for mode, sub, lat, reads in rows:
        print(f"{mode:<11}{statistics.median(sub):>20.3f} / {p95(sub):<9.3f}"
              f"{statistics.median(lat) * 1000:>20.1f} / {p95(lat) * 1000:.1f} (n={len(lat)})"
              f"{statistics.median(reads):>18.0f}")


if __name__ == "__main__":
    main()
