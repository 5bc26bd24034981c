"""The read path under load: what HTTP adds to reading a job's metrics, on a real API process, in both modes.

For each mode (embedded: SQLite; postgres: PostgreSQL, given to the API as TRICKSERVE_DATABASE_URL) it migrates a
fresh database, stores a finished job of --epochs epochs through core.jobs as a worker stores them (progress
events between epoch_end events; no training), starts `python -m cli.main api` on it (--workers processes), and
runs the sections:
  - metric-page: GET /v1/jobs/{id}/metrics?names=val/loss&limit=1000 with 1 and with 8 concurrent keep-alive
    clients, --rounds windows of --seconds each: requests/s and p50/p95 latency, medians over the rounds; and the
    same page read in this process by the query the route runs, so that `metric_page_http_vs_db=` (HTTP p50 with
    one client over the database's p50) shows what HTTP adds.
A section is a function of the running service in SECTIONS; --only picks some. The machine's load average is
printed with the results: the numbers are only comparable between runs on an equally quiet machine.

    python bench/readpath.py [--modes embedded,postgres] [--only metric-page] [--workers 1] [--rounds 5]
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this file belongs to, whatever copy of the project is installed

from core import jobs, tenants  # noqa: E402

try:
    from core import metrics
except ImportError:  # a checkout from before the metric store, measured for comparison
    metrics = None
from common import free_port, postgres_database, wait_ready  # noqa: E402

from core.db import Database, init_db  # noqa: E402
from core.engine.events import METRIC_KINDS  # noqa: E402
from core.spec import JobSpec  # noqa: E402

TENANT = "bench"
STEPS_PER_EPOCH = 50
PAGE = {"names": "val/loss", "limit": 1000}


@dataclass
class Service:
    """A running API process on a database holding one finished job; `results` collects what sections measure."""

    mode: str
    base: str
    headers: dict[str, str]
    db: Database
    job_id: str
    results: list[str] = field(default_factory=list)

    def report(self, line: str) -> None:
        self.results.append(f"{self.mode:<9} {line}")
        print(self.results[-1], flush=True)


# ------------------------------------------------------------------------------------------ the service


@contextmanager
def service(mode: str, epochs: int, workers: int = 1) -> Iterator[Service]:
    """A migrated database of `mode` with a key and a job of `epochs` epochs, served by `workers` real API
    processes."""
    with (
        tempfile.TemporaryDirectory(prefix=f"trickserve-readpath-{mode}-") as folder,
        _database(mode, Path(folder)) as url,
    ):
        home = Path(folder)
        init_db(url)
        db = Database(url)
        key, job_id = _prepare(db, epochs)
        env = {**os.environ, "TRICKSERVE_HOME": str(home), "TRICKSERVE_DATABASE_URL": url}
        port = free_port()
        argv = [sys.executable, "-m", "cli.main", "api", "--port", str(port)]
        argv += ["--workers", str(workers)] if workers > 1 else []
        api = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base)
            time.sleep(3 if workers > 1 else 0)  # the first process answered; let the others start too
            yield Service(mode, base, {"Authorization": f"Bearer {key}"}, db, job_id)
        finally:
            api.terminate()
            try:
                api.wait(15)
            except subprocess.TimeoutExpired:
                api.kill()
            db.dispose()


@contextmanager
def _database(mode: str, home: Path) -> Iterator[str]:
    if mode == "embedded":
        yield f"sqlite:///{home / 'trickserve.db'}"
        return
    with postgres_database() as url:
        yield url


def _prepare(db: Database, epochs: int) -> tuple[str, str]:
    """A tenant's key, and a finished job of `epochs` epochs recorded as a worker records them; (key, job id)."""
    train = {"epochs": epochs}
    spec = JobSpec.model_validate({"name": "readpath", "data": {"dataset": "builtin:digits"}, "train": train})
    with db.session() as s:
        tenants.create_tenant(session=s, tenant_id=TENANT)
        key = tenants.create_api_key(session=s, tenant_id=TENANT)
        job = jobs.create_job(session=s, tenant_id=TENANT, spec=spec, advice=[])
        claim = jobs.claim_job(session=s, job_id=job.job_id, worker_id="bench", lease_s=3600)
        assert claim is not None
        for first in range(1, epochs + 1, 100):
            batch = [event for epoch in range(first, min(first + 100, epochs + 1)) for event in _epoch(epoch)]
            assert jobs.record_events(session=s, job_id=job.job_id, attempt=claim.attempt, events=batch)
        assert jobs.finish_job(session=s, job_id=job.job_id, attempt=claim.attempt, status="succeeded")
    return key, job.job_id


def _epoch(epoch: int) -> list[dict[str, Any]]:
    """What the engine reports of one epoch: two progress events, then the epoch's metrics."""
    step, at = epoch * STEPS_PER_EPOCH, time.time()
    progress = [
        {"kind": "progress", "step": step - half, "epoch": epoch, "at": at, "data": {"train/loss": 1 / epoch}}
        for half in (STEPS_PER_EPOCH // 2, 0)
    ]
    metrics = {"train/loss": 1 / epoch, "train/acc": 1 - 1 / epoch, "val/loss": 1.1 / epoch,
               "val/acc": 1 - 1.1 / epoch, "lr": 0.01 / (1 + epoch // 100)}  # fmt: skip
    return [*progress, {"kind": "epoch_end", "step": step, "epoch": epoch, "at": at, "data": metrics}]


# -------------------------------------------------------------------------------------------- measuring


@dataclass
class Window:
    """Requests of one measurement window: how many per second, and each one's latency (s)."""

    per_s: float
    latencies: list[float]


def hammer(svc: Service, path: str, params: dict[str, Any], clients: int, seconds: float) -> Window:
    """`clients` keep-alive clients GET `path` back to back for `seconds`; the body is read, not parsed."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop, started = threading.Event(), threading.Barrier(clients + 1)

    def run(i: int) -> None:
        with httpx.Client(base_url=svc.base, headers=svc.headers, timeout=60) as http:
            http.get(path, params=params).raise_for_status()  # connected and warm before the window opens
            started.wait()
            while not stop.is_set():
                t0 = time.perf_counter()
                http.get(path, params=params).raise_for_status()
                latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    started.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    done = [x for per_client in latencies for x in per_client]
    return Window(len(done) / (time.perf_counter() - t0), done)


def timed(read: Callable[[], object], seconds: float) -> list[float]:
    """Latencies (s) of `read` called back to back for `seconds`."""
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        read()
        out.append(time.perf_counter() - t0)
    return out


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[-1] if len(xs) >= 2 else xs[0]


def ms(x: float) -> str:
    return f"{1000 * x:.1f} ms"


# -------------------------------------------------------------------------------------------- sections


def metric_page(svc: Service, args: argparse.Namespace) -> None:
    """A 1,000-point page of one metric over HTTP with 1 and 8 clients, and the same rows read in-process."""
    path = f"/v1/jobs/{svc.job_id}/metrics"
    with httpx.Client(base_url=svc.base, headers=svc.headers) as http:
        page = http.get(path, params=PAGE).raise_for_status()
    svc.report(f"metric page: {len(page.json()['items'])} points, {len(page.content) / 1000:.0f} kB")
    windows: dict[int, list[Window]] = {1: [], 8: []}
    db_p50: list[float] = []
    for _ in range(args.rounds):  # HTTP and the database take turns, so that both see the same machine
        for clients, seen in windows.items():
            seen.append(hammer(svc, path, PAGE, clients, args.seconds))
        db_p50.append(statistics.median(timed(lambda: _read_page(svc), args.seconds)))
    for clients, seen in windows.items():
        per_s = statistics.median(w.per_s for w in seen)
        p50 = statistics.median(statistics.median(w.latencies) for w in seen)
        tail = statistics.median(p95(w.latencies) for w in seen)
        svc.report(f"metric page, {clients} client{'s' * (clients > 1)}: {per_s:6.1f} req/s  p50 {ms(p50)}  "
                   f"p95 {ms(tail)}")  # fmt: skip
    http_p50 = statistics.median(statistics.median(w.latencies) for w in windows[1])
    svc.report(f"same rows from the database: p50 {ms(statistics.median(db_p50))}")
    svc.report(f"metric_page_http_vs_db={http_p50 / statistics.median(db_p50):.2f}")


def _read_page(svc: Service) -> object:
    """The page's rows, read as the route reads them; a checkout from before the metric store read the events."""
    with svc.db.session(read_only=True) as session:
        if metrics is not None:
            return metrics.read_page(session, svc.job_id, names=[PAGE["names"]], limit=PAGE["limit"])
        names, limit = [PAGE["names"]], PAGE["limit"] + 1
        return jobs.list_events(session, svc.job_id, kinds=METRIC_KINDS, names=names, limit=limit)


SECTIONS: dict[str, Callable[[Service, argparse.Namespace], None]] = {"metric-page": metric_page}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="embedded,postgres", help="comma-separated: embedded, postgres")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    parser.add_argument("--epochs", type=int, default=2000, help="epochs of the job whose metrics are read")
    parser.add_argument("--workers", type=int, default=1, help="API processes (trickserve api --workers)")
    parser.add_argument("--rounds", type=int, default=5, help="measurement windows per section and load")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each window")
    args = parser.parse_args()
    sections = [SECTIONS[name] for name in args.only.split(",")]
    load = [os.getloadavg()]
    results: list[str] = []
    for mode in args.modes.split(","):
        with service(mode, args.epochs, args.workers) as svc:
            for section in sections:
                section(svc, args)
            results += svc.results
    load.append(os.getloadavg())
    print(f"\n{REPO}, {args.workers} API process(es): {len(os.sched_getaffinity(0))} CPUs, load average (1 min) "
          f"{load[0][0]:.2f} before, {load[1][0]:.2f} after")  # fmt: skip
    print("\n".join(results))


if __name__ == "__main__":
    main()
