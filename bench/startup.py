"""How fast a worker starts a job, and how soon it takes the next one: both modes side by side in one run.

For each mode (embedded: SQLite + filesystem broker; production: PostgreSQL + Redis) it starts one real worker
process (`celery -A worker.main worker`, as `trickserve worker` and `trickserve up` run it), runs a warm-up job per
dataset (which also fills the dataset cache), then queues `--jobs` digits and `--jobs` MNIST-1D jobs at once,
alternating, and reads from the database, per job:
  - claim -> first step: the `running` transition to the engine's first progress event (stored with the time the
    engine emitted it; the first one follows the first optimizer step),
  - claim -> first epoch: the same, to the end of the first epoch (its `epoch_end` event),
  - gap: the previous job's end (its terminal transition) to this job's claim, on the same worker.
Prints medians and the largest value, and the load average while it ran (the machine may be shared). Needs the
machine's PostgreSQL and Redis for the production mode.

    python bench/startup.py [--jobs 5] [--modes embedded,production]
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
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import postgres_database, private_redis  # noqa: E402

TERMINAL = ("succeeded", "early_stopped", "failed", "cancelled")
DATASETS = {
    "digits": {"dataset": "builtin:digits"},
    "mnist1d": {"dataset": "builtin:mnist1d"},
}


def spec(dataset: str) -> dict:
    """A short job: two epochs of a small CNN, a progress event after every step."""
    return {
        "name": f"startup-{dataset}",
        "data": DATASETS[dataset],
        "model": {"arch": "cnn", "layers": [16, 32]},
        "train": {"epochs": 2, "batch_size": 128, "progress_interval_s": 0.001},
        "resources": {"device": "cpu"},
    }


@contextmanager
def backends(mode: str, home: Path) -> Iterator[dict[str, str]]:
    """The TRICKSERVE_* variables of a fresh database and broker for `mode`."""
    if mode == "embedded":
        yield {
            "TRICKSERVE_DATABASE_URL": f"sqlite:///{home / 'trickserve.db'}",
            "TRICKSERVE_BROKER_URL": "filesystem://",
        }
        return
    with postgres_database() as url, private_redis() as broker:
        yield {"TRICKSERVE_DATABASE_URL": url, "TRICKSERVE_BROKER_URL": broker, "TRICKSERVE_REDIS_URL": broker}


@contextmanager
def service(mode: str, log_dir: Path | None) -> Iterator[tuple]:
    """A migrated database, a broker and one worker process for `mode`; yields (settings, db, publisher)."""
    home = Path(tempfile.mkdtemp(prefix=f"trickserve-bench-startup-{mode}-"))
    with backends(mode, home) as variables:
        env = {**os.environ, "TRICKSERVE_HOME": str(home), "OMP_NUM_THREADS": "1", **variables}
        os.environ.pop("TRICKSERVE_REDIS_URL", None)  # this process reads the same settings as the worker
        os.environ.update({k: v for k, v in env.items() if k.startswith("TRICKSERVE_")})
        from core.config import Settings
        from core.db import Database, init_db
        from worker.celery_app import create_app

        settings = Settings()
        init_db(settings.database_url)
        db = Database.from_settings(settings)
        log = open(log_dir / f"worker-{mode}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        argv = [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "-Q", "cpu,gpu",
                "--loglevel", "INFO" if log_dir else "WARNING", "-n", f"bench-startup-{mode}@%h"]  # fmt: skip
        worker = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield settings, db, create_app(settings)
        finally:
            worker.terminate()
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
            db.dispose()


def enqueue(settings, db, publisher, body: dict) -> str:
    """Store a job and send it after the commit, as POST /v1/jobs does."""
    from core import tenants
    from core.dispatch import dispatch
    from core.submit import Caps, submit

    with db.session() as session:
        tenants.create_tenant(session=session, tenant_id="bench")
        job = submit(session=session, tenant_id="bench", spec_dict=body, caps=Caps.from_settings(settings)).job
        dispatch(session, job, publisher.send_run_job)
        return job.job_id


def wait_terminal(db, job_ids: list[str], timeout: float) -> None:
    from core.models import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session(read_only=True) as session:
            statuses = [str(session.get_one(Job, j).status) for j in job_ids]
        if all(s in TERMINAL for s in statuses):
            bad = [(j, s) for j, s in zip(job_ids, statuses, strict=True) if s != "succeeded"]
            if bad:
                raise RuntimeError(f"jobs did not succeed: {bad}")
            return
        time.sleep(0.2)
    raise RuntimeError(f"jobs still running after {timeout:.0f} s")


def timings(db, job_id: str) -> dict[str, float]:
    """claim, first step, first epoch end and end of a finished job, as Unix times."""
    from core import jobs

    with db.session(read_only=True) as session:
        moves = jobs.list_transitions(session, job_id)
        events = jobs.list_events(session, job_id, kinds=["progress", "epoch_end"], limit=100_000)
        claim = next(t.at for t in moves if str(t.to_status) == "running")
        end = next(t.at for t in moves if str(t.to_status) in TERMINAL)
        first_step = min(e.created_at for e in events if e.kind == "progress")
        first_epoch = next(e.created_at for e in events if e.kind == "epoch_end" and e.epoch == 1)
    return {k: v.timestamp() for k, v in
            {"claim": claim, "step": first_step, "epoch": first_epoch, "end": end}.items()}  # fmt: skip


def measure(mode: str, n: int, log_dir: Path | None) -> dict[str, list[float]]:
    with service(mode, log_dir) as (settings, db, publisher):
        warm = [enqueue(settings, db, publisher, spec(name)) for name in DATASETS]  # fills the dataset cache
        wait_terminal(db, warm, timeout=300)
        queued = [(name, enqueue(settings, db, publisher, spec(name))) for _ in range(n) for name in DATASETS]
        wait_terminal(db, [job_id for _, job_id in queued], timeout=60 * n)
        rows = [(name, timings(db, job_id)) for name, job_id in queued]
    rows.sort(key=lambda row: row[1]["claim"])
    out: dict[str, list[float]] = {"gap": [b["claim"] - a["end"] for (_, a), (_, b) in pairwise(rows)]}
    for name in DATASETS:
        out[f"{name} claim->first step"] = [t["step"] - t["claim"] for n_, t in rows if n_ == name]
        out[f"{name} claim->first epoch"] = [t["epoch"] - t["claim"] for n_, t in rows if n_ == name]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5, help="jobs per dataset")
    parser.add_argument("--modes", default="embedded,production")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the workers' logs (INFO) here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = {mode: measure(mode, args.jobs, args.log_dir) for mode in args.modes.split(",")}
    load_after = os.getloadavg()
    print(f"{'mode':<10} {'measure':<28} {'median s':>9} {'max s':>7} {'n':>3}")
    for mode, rows in results.items():
        for name, values in rows.items():
            print(f"{mode:<10} {name:<28} {statistics.median(values):>9.3f} {max(values):>7.3f} {len(values):>3}")
    for mode, rows in results.items():
        print(f"startup_gap_max[{mode}]={max(rows['gap']):.3f}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
