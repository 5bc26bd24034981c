"""What cheap requests cost the API, and what polling clients cost a training job, on the embedded service.

It starts the API and one worker of each checkout given (--repo, repeatable; default this one) side by side, and
takes turns between them for every measurement, so that both see the same load from the rest of the machine:
  - CPU per request: the API process's CPU time (user + system, from /proc) over the requests it served, for
    GET /v1/jobs/{id} and GET /v1/jobs/{id}/metrics of a finished 40-epoch job, with --clients concurrent
    keep-alive clients, in --rounds windows of --seconds per checkout;
  - the slowdown of training under pollers: the same job trained alone and with --pollers clients that each GET
    the job and its metrics every 100 ms, --runs times; the median ratio of the training times (running ->
    finished, from the job's transitions), each run under pollers against the runs alone on either side of it.

    python bench/api_cheap_requests.py [--repo /path/to/main --repo .] [--runs 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
from common import free_port, wait_ready

HERE = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
SPEC = {
    "name": "bench-train",
    "data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 6000, "n_features": 32}},
    "model": {"arch": "mlp", "layers": [128, 128]},
    "train": {"epochs": 40, "batch_size": 32},
    "resources": {"device": "cpu"},
}
TERMINAL = ("succeeded", "early_stopped", "failed", "cancelled")
Load = Callable[[str, threading.Event], None]


@dataclass
class Service:
    """One checkout's running API: where it is, and what was measured on it."""

    repo: Path
    base: str
    headers: dict[str, str]
    pid: int
    cpu: dict[str, float] = field(default_factory=dict)  # per path: API CPU seconds
    served: dict[str, int] = field(default_factory=dict)  # per path: requests
    alone_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.headers, timeout=60)

    def ms_per_request(self, name: str) -> float:
        return 1000 * self.cpu[name] / max(self.served[name], 1)


@contextmanager
def service(repo: Path) -> Iterator[Service]:
    """The checkout's API and one worker on a fresh embedded home."""
    home = Path(tempfile.mkdtemp(prefix="trickserve-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import the checkout under test, nothing else
    env["TRICKSERVE_HOME"] = str(home)  # torch keeps its default threads: the service as shipped
    cli = [sys.executable, "-m", "cli.main"]
    subprocess.run([*cli, "migrate"], cwd=repo, env=env, capture_output=True, check=True)
    keys = subprocess.run([*cli, "keys", "create", "--tenant", "bench"], cwd=repo, env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    headers = {"Authorization": f"Bearer {keys.stdout.strip().splitlines()[-1]}"}
    port = free_port()
    quiet = {"cwd": repo, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    api = subprocess.Popen([*cli, "api", "--port", str(port)], **quiet)  # type: ignore[call-overload]
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.main", "worker", "-Q", "cpu,gpu", "-c",
                               "1", "--loglevel", "WARNING", "-n", f"bench-{port}@%h"], **quiet)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        time.sleep(2)  # let the worker connect to the broker
        yield Service(repo, base, headers, api.pid)
    finally:
        for process in (api, worker):
            process.terminate()
        for process in (api, worker):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def hammer(svc: Service, name: str, path: str, clients: int, seconds: float) -> None:
    """`clients` keep-alive clients GET `path` for `seconds`; adds the API's CPU time and the requests served."""
    served = [0] * clients
    stop, started = threading.Event(), threading.Barrier(clients + 1)

    def run(i: int) -> None:
        with svc.client() as http:
            http.get(path).raise_for_status()  # connected before the window opens
            started.wait()
            while not stop.is_set():
                http.get(path).raise_for_status()
                served[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    started.wait()
    start_cpu = cpu_seconds(svc.pid)
    time.sleep(seconds)
    cpu = cpu_seconds(svc.pid) - start_cpu
    stop.set()
    for thread in threads:
        thread.join()
    svc.cpu[name] = svc.cpu.get(name, 0.0) + cpu
    svc.served[name] = svc.served.get(name, 0) + sum(served)


def train(svc: Service, load: Load | None) -> float:
    """Seconds from `running` to the end of one job, with `load` running against it meanwhile."""
    with svc.client() as http:
        job_id = http.post("/v1/jobs", json=SPEC).json()["id"]
        stop = threading.Event()
        thread = threading.Thread(target=load, args=(job_id, stop)) if load else None
        if thread:
            thread.start()
        try:
            while http.get(f"/v1/jobs/{job_id}").json()["status"] not in TERMINAL:
                time.sleep(0.2)
        finally:
            stop.set()
            if thread:
                thread.join()
        at = {t["to"]: datetime.fromisoformat(t["at"]) for t in http.get(f"/v1/jobs/{job_id}/transitions").json()}
    return (max(v for k, v in at.items() if k in TERMINAL) - at["running"]).total_seconds()


def pollers(svc: Service, n: int) -> Load:
    """`n` clients, each reading the job and its metrics every 100 ms until told to stop."""

    def poll(job_id: str, stop: threading.Event) -> None:
        with svc.client() as http:
            while not stop.wait(0.1):
                http.get(f"/v1/jobs/{job_id}").raise_for_status()
                http.get(f"/v1/jobs/{job_id}/metrics").raise_for_status()

    def load(job_id: str, stop: threading.Event) -> None:
        threads = [threading.Thread(target=poll, args=(job_id, stop)) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return load


def measure(services: list[Service], args: argparse.Namespace) -> None:
    for svc in services:
        svc.alone_s.append(train(svc, None))  # also the finished job the CPU measurements read
    for _ in range(args.rounds):
        for svc in services:
            with svc.client() as http:
                job_id = http.get("/v1/jobs", params={"limit": 1}).json()["items"][0]["id"]
            hammer(svc, "job", f"/v1/jobs/{job_id}", args.clients, args.seconds)
            hammer(svc, "metrics", f"/v1/jobs/{job_id}/metrics", args.clients, args.seconds)
    for _ in range(args.runs):
        for svc in services:
            loaded = train(svc, pollers(svc, args.pollers))
            svc.alone_s.append(train(svc, None))
            svc.ratios.append(loaded / statistics.mean(svc.alone_s[-2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", type=Path, help="a checkout to measure (repeatable)")
    parser.add_argument("--runs", type=int, default=3, help="trainings under pollers, each between two alone")
    parser.add_argument("--pollers", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for the CPU measurement")
    parser.add_argument("--rounds", type=int, default=4, help="CPU measurement windows per checkout")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each CPU measurement window")
    args = parser.parse_args()
    with ExitStack() as stack:
        services = [stack.enter_context(service(repo.resolve())) for repo in args.repo or [HERE]]
        measure(services, args)
    first = services[0]
    print(f"{'checkout':<24}{'CPU ms/GET job':>15}{'CPU ms/GET metrics':>19}{'train alone s':>14}"
          f"{'slowdown':>10}  runs under pollers / alone")  # fmt: skip
    for svc in services:
        runs = " ".join(f"{x:.2f}" for x in svc.ratios)
        print(f"{str(svc.repo)[-24:]:<24}{svc.ms_per_request('job'):>15.3f}{svc.ms_per_request('metrics'):>19.3f}"
              f"{statistics.median(svc.alone_s):>14.1f}{_median(svc.ratios):>9.2f}x  {runs}")  # fmt: skip
    for svc in services[1:]:
        print(f"{str(svc.repo)[-24:]} vs {str(first.repo)[-24:]}: CPU per GET job x"
              f"{svc.ms_per_request('job') / first.ms_per_request('job'):.2f}, per GET metrics x"
              f"{svc.ms_per_request('metrics') / first.ms_per_request('metrics'):.2f}")  # fmt: skip


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


if __name__ == "__main__":
    main()
