"""How close a study comes to its ideal wall time, and what ASHA pruning saves: both modes side by side in one run.

For each mode (embedded: `trickserve up --workers 2`, SQLite and the filesystem broker; production: `trickserve api`
and two `trickserve worker` processes on PostgreSQL and Redis), after a warm-up study that fills the dataset cache:
  - a grid study of 12 two-epoch digits trials (4 learning rates x 3 seeds, max_concurrent 2). Its wall time runs
    from sending the POST to the study's finished_at; its ideal is the sum of its trials' epoch times (the
    `epoch_time_s` metric of each epoch, evaluation included) over the 2 workers. The sum of the trials' run times
    (started_at to finished_at) splits the rest, per trial, into the time a job spends outside its epochs (start,
    test, model upload) and the time a worker is idle between trials (the next trial made, sent and claimed, the
    worker's process replaced);
  - an ASHA study (random sampler, 15 points x 1 seed, 9 epochs, rungs at epochs 1, 3 and 9) and the same study
    without a pruner: the random sampler gives both the same points. It reports the pruned study's epochs and wall
    time as fractions of the unpruned study's, and how many accuracy points its best objective (val/acc, best
    epoch) falls short. Each repeat draws other points (sampler_seed = repeat).
Medians over --repeats. Every process runs with OMP_NUM_THREADS=1: one torch thread per worker. The last line is
`study_wall_vs_ideal=X`, the larger of the modes' medians. Needs the machine's PostgreSQL and Redis for the
production mode.

    python bench/study.py [--repeats 3] [--modes embedded,production] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from common import free_port, postgres_database, private_redis, wait_ready

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
ENDED = ("succeeded", "failed", "cancelled")
CNN = {"arch": "cnn", "layers": [16, 32], "hidden": [64]}


def grid_study() -> dict[str, Any]:
    """12 two-epoch trials: 4 learning rates x 3 seeds."""
    return {
        "name": "bench-grid",
        "base": {"data": {"dataset": "builtin:digits"}, "model": CNN, "train": {"epochs": 2},
                 "resources": {"device": "cpu"}},
        "space": {"optim.lr": {"grid": [0.0003, 0.001, 0.003, 0.01]}},
        "seeds": [0, 1, 2],
        "max_concurrent": WORKERS,
    }  # fmt: skip


def asha_study(points: int, sampler_seed: int, pruned: bool) -> dict[str, Any]:
    """Learning rate and batch size of a 9-epoch CNN, `points` random points, with ASHA or without a pruner."""
    return {
        "name": f"bench-asha-{'pruned' if pruned else 'full'}",
        "base": {"data": {"dataset": "builtin:digits"}, "model": CNN, "optim": {"name": "momentum"},
                 "train": {"epochs": 9}, "resources": {"device": "cpu"}},
        "space": {"optim.lr": {"loguniform": [0.0001, 1.0]},
                  "train.batch_size": {"choice": [16, 32, 64, 128, 256]}},
        "sampler": "random",
        "n_trials": points,
        "sampler_seed": sampler_seed,
        "objective": {"metric": "val/acc", "take": "best"},
        "pruner": {"kind": "asha", "min_resource": 1, "reduction_factor": 3} if pruned else {"kind": "none"},
        "max_concurrent": WORKERS,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- service


@contextmanager
def service(mode: str, log_dir: Path | None) -> Iterator[httpx.Client]:
    """A fresh database and broker for `mode`, an API and two workers; yields a client with the tenant's key."""
    home = Path(tempfile.mkdtemp(prefix=f"trickserve-bench-study-{mode}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRICKSERVE_")}
    env.update(TRICKSERVE_HOME=str(home), OMP_NUM_THREADS="1")
    port = free_port()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, home, ignore_errors=True)  # after the processes have stopped
        if mode == "production":
            url, broker = stack.enter_context(postgres_database()), stack.enter_context(private_redis())
            env.update(TRICKSERVE_DATABASE_URL=url, TRICKSERVE_BROKER_URL=broker, TRICKSERVE_REDIS_URL=broker)
            key = _prepare(env)
            argvs = [["api", "--port", str(port)], *[["worker"]] * WORKERS]
        else:
            argvs = [["up", "--workers", str(WORKERS), "--port", str(port)]]
        procs = [_start(argv, env, log_dir, f"{mode}-{i}") for i, argv in enumerate(argvs)]
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, timeout_s=60)
            if mode == "embedded":
                key = (home / "api-key").read_text().strip()  # written by `up` before it serves
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
                yield client
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def _start(argv: list[str], env: dict[str, str], log_dir: Path | None, name: str) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def _prepare(env: dict[str, str]) -> str:
    """`trickserve migrate` and `trickserve keys create`, as an operator sets the service up; returns the key."""
    trickserve = [sys.executable, "-m", "cli.main"]
    subprocess.run([*trickserve, "migrate"], cwd=REPO, env=env, capture_output=True, check=True)
    out = subprocess.run([*trickserve, "keys", "create", "--tenant", "bench"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------- measuring


def run_study(client: httpx.Client, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Submit a study and wait for its end; its detail (trials, verdict) with `wall_s` added."""
    t0 = time.time()
    response = client.post("/v1/studies", json=body)
    if response.status_code != 201:
        raise RuntimeError(f"POST /v1/studies answered {response.status_code}: {response.text}")
    study_id = response.json()["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        study = client.get(f"/v1/studies/{study_id}").json()
        if study["status"] in ENDED:
            if study["status"] != "succeeded":
                raise RuntimeError(f"study {study_id} ended {study['status']}")
            return {**study, "wall_s": _ts(study["finished_at"]) - t0}
        time.sleep(0.2)
    raise RuntimeError(f"study {study_id} still running after {timeout_s:.0f} s")


def trial_times(client: httpx.Client, study: dict[str, Any]) -> tuple[float, float]:
    """The sum of the trials' epoch times and the sum of their run times (started_at to finished_at), seconds."""
    epochs = 0.0
    for trial in study["trials"]:
        page = client.get(f"/v1/jobs/{trial['job_id']}/metrics", params={"names": "epoch_time_s", "limit": 1000})
        epochs += sum(point["value"] for point in page.json()["items"])
    jobs = client.get("/v1/jobs", params={"study": study["id"], "limit": 1000}).json()["items"]
    runs = sum(_ts(job["finished_at"]) - _ts(job["started_at"]) for job in jobs)
    return epochs, runs


def best_value(study: dict[str, Any]) -> float:
    return max(t["value"] for t in study["trials"] if t["value"] is not None)


def measure(mode: str, repeats: int, points: int, timeout_s: float, log_dir: Path | None) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with service(mode, log_dir) as client:
        warm_up = {**grid_study(), "name": "bench-warm-up", "seeds": [0], "max_concurrent": WORKERS}
        warm_up["space"] = {"optim.lr": {"grid": [0.001, 0.003]}}
        run_study(client, warm_up, timeout_s)
        for repeat in range(repeats):
            grid = run_study(client, grid_study(), timeout_s)
            epochs, runs = trial_times(client, grid)
            # Alternate which of the two ASHA studies runs first: the machine may be busier in one half.
            order = [True, False] if repeat % 2 == 0 else [False, True]
            asha = {pruned: run_study(client, asha_study(points, repeat, pruned), timeout_s) for pruned in order}
            used = {pruned: sum(t["epochs"] for t in study["trials"]) for pruned, study in asha.items()}
            for name, value in {
                "wall_s": grid["wall_s"],
                "epoch_s": epochs,
                "run_s": runs,
                "outside_s": (runs - epochs) / len(grid["trials"]),
                "idle_s": (grid["wall_s"] * WORKERS - runs) / len(grid["trials"]),
                "wall_vs_ideal": grid["wall_s"] / (epochs / WORKERS),
                "epochs_fraction": used[True] / used[False],
                "wall_fraction": asha[True]["wall_s"] / asha[False]["wall_s"],
                "asha_wall_s": asha[True]["wall_s"],
                "full_wall_s": asha[False]["wall_s"],
                "best_pruned": best_value(asha[True]),
                "best_full": best_value(asha[False]),
                "gap_points": 100 * (best_value(asha[False]) - best_value(asha[True])),
            }.items():
                out.setdefault(name, []).append(value)
            print(f"{mode} repeat {repeat + 1}/{repeats}: grid wall {grid['wall_s']:.1f} s, ideal "
                  f"{epochs / WORKERS:.1f} s; ASHA epochs {used[True]}/{used[False]}", file=sys.stderr)  # fmt: skip
    return out


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each study per mode (medians are printed)")
    parser.add_argument("--points", type=int, default=15, help="points of the ASHA studies")
    parser.add_argument("--modes", default="embedded,production")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one repeat, 9 ASHA points")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a study may take")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the API's and workers' logs here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.points = 1, 9
    load_before = os.getloadavg()
    results = {mode: measure(mode, args.repeats, args.points, args.timeout, args.log_dir)
               for mode in args.modes.split(",")}  # fmt: skip
    load_after = os.getloadavg()
    med = {mode: {name: statistics.median(values) for name, values in rows.items()} for mode, rows in results.items()}
    print(f"\nGrid study, 12 two-epoch digits trials, {WORKERS} workers (medians of {args.repeats}):\n")
    print(
        "| mode | wall s | sum of epoch times s | sum of trial run times s | per trial: outside epochs s | idle s |"
        " wall / ideal |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, m in med.items():
        print(
            f"| {mode} | {m['wall_s']:.2f} | {m['epoch_s']:.2f} | {m['run_s']:.2f} | {m['outside_s']:.3f} | "
            f"{m['idle_s']:.3f} | {m['wall_vs_ideal']:.2f} |"
        )
    print(f"\nASHA vs no pruner, {args.points} random points x 9 epochs (medians of {args.repeats}):\n")
    print("| mode | epochs used | wall time | wall s, ASHA / none | best val/acc, ASHA / none | gap, points |")
    print("|---|---|---|---|---|---|")
    for mode, m in med.items():
        print(
            f"| {mode} | {m['epochs_fraction']:.2f} | {m['wall_fraction']:.2f} | {m['asha_wall_s']:.1f} / "
            f"{m['full_wall_s']:.1f} | {m['best_pruned']:.4f} / {m['best_full']:.4f} | {m['gap_points']:.2f} |"
        )
    print(f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} CPUs")
    for mode, m in med.items():
        print(f"study_wall_vs_ideal[{mode}]={m['wall_vs_ideal']:.3f}")
    print(f"study_wall_vs_ideal={max(m['wall_vs_ideal'] for m in med.values()):.3f}")


if __name__ == "__main__":
    main()
