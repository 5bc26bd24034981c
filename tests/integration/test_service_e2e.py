"""The whole service as users meet it: a real uvicorn API and a real Celery worker process, driven over HTTP and
SSE, in both modes (embedded: SQLite file + filesystem broker; production: PostgreSQL + Redis)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import _new_postgres_database
from tests.integration.test_worker_process import _private_redis_db

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "early_stopped", "failed", "cancelled")


def spec(**train) -> dict:
    """A digits MLP that trains in a few seconds on one core."""
    return {
        "name": "e2e",
        "data": {"dataset": "builtin:digits"},
        "model": {"arch": "mlp", "layers": [64], "dropout": 0.2},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 6, "batch_size": 64, **train},
        "resources": {"device": "cpu"},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _backends(mode: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    if mode == "embedded":
        yield {}
        return
    with _new_postgres_database() as db_url, _private_redis_db() as redis_url:
        yield {"TRICKSERVE_DATABASE_URL": db_url, "TRICKSERVE_BROKER_URL": redis_url, "TRICKSERVE_REDIS_URL": redis_url}


class Service:
    """Migrated database, an API server and one worker, all separate processes sharing TRICKSERVE_* settings."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = self._prepare()
        self.procs = [
            self._spawn("api", "-m", "cli.main", "api", "--port", str(self.port)),
            self._spawn("worker", "-m", "celery", "-A", "worker.main", "worker", "-Q", "cpu,gpu",
                        "--loglevel", "INFO", "--without-mingle", "--without-gossip"),
        ]
        self._wait_ready()

    def _prepare(self) -> str:
        """`trickserve migrate`, then `trickserve keys create`, as an operator sets the service up."""
        for argv in (["migrate"], ["keys", "create", "--tenant", "e2e"]):
            out = subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=self.env,
                                 capture_output=True, text=True)  # fmt: skip
            assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the API never became ready:\n" + (self.logs / "api.log").read_text()[-3000:])

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30, read=120))

    def stop(self) -> None:
        """Kill both process groups: every test has waited for its jobs, and a graceful stop only costs time."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


@pytest.fixture(params=["embedded", "production"])
def svc(request, tmp_path: Path) -> Iterator[Service]:
    env = {**os.environ, "TRICKSERVE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "TRICKSERVE_HEARTBEAT_S": "0.5", "TRICKSERVE_LEASE_S": "5", "TRICKSERVE_REAPER_INTERVAL_S": "1"}
    with _backends(request.param, tmp_path) as extra:
        service = Service({**env, **extra}, tmp_path)
        try:
            yield service
        finally:
            service.stop()


def submit(c: httpx.Client, body: dict) -> dict:
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def wait_status(c: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"{job_id} still {job['status']}")


def read_stream(c: httpx.Client, job_id: str, last_id: str | None = None, stop_after: int | None = None):
    """(id, kind, data, received_at) of each message until `end`, or until `stop_after` messages."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    out: list[tuple[str | None, str, dict, float]] = []
    with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        event_id, kind, data = None, "message", None
        for line in r.iter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
            elif not line and data is not None:
                out.append((event_id, kind, data, time.time()))
                if kind == "end" or (stop_after and len(out) >= stop_after):
                    return out
                event_id, kind, data = None, "message", None
    return out


def test_job_streams_live_and_metrics_are_pollable(svc):
    body = spec(epochs=6, batch_size=32)
    body["data"]["augment"] = {"rotate": {"degrees": 10}, "noise": {"std": 0.5}}
    body["model"] = {"arch": "cnn", "layers": [32, 64], "hidden": [128], "dropout": 0.3}  # epochs of ~0.2 s
    with svc.client() as c:
        job = submit(c, body)
        events = read_stream(c, job["id"])
        done = c.get(f"/v1/jobs/{job['id']}").json()
        metrics = c.get(f"/v1/jobs/{job['id']}/metrics", params={"names": "val/acc"}).json()["items"]
    assert done["status"] == "succeeded" and done["final_metrics"]["test/acc"] > 0.9
    kinds = [k for _, k, _, _ in events]
    assert kinds.count("epoch_end") == 6 and kinds[-1] == "end"
    # live: the first epoch's metrics reached the client before the job finished
    first_epoch_at = next(t for _, k, _, t in events if k == "epoch_end")
    assert first_epoch_at < _ts(done["finished_at"])
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6] and {m["name"] for m in metrics} == {"val/acc"}


def test_early_stopping_job_ends_early_stopped_with_its_event(svc):
    body = spec(epochs=200, early_stopping={"monitor": "train/loss", "patience": 0, "min_delta": 10.0})
    with svc.client() as c:
        job = submit(c, body)
        events = read_stream(c, job["id"])
        done = c.get(f"/v1/jobs/{job['id']}").json()
    stop = [d for _, k, d, _ in events if k == "early_stop"]
    assert done["status"] == "early_stopped" and done["stop_reason"] == "early_stop"
    assert len(stop) == 1 and stop[0]["data"]["stopped_epoch"] == 2


def test_cancel_running_job_checkpoints_and_a_cancelled_queued_job_never_runs(svc):
    with svc.client() as c:
        running = submit(c, spec(epochs=500))
        wait_status(c, running["id"], ("running",))
        queued = submit(c, spec())  # the only worker is busy: this one waits in the queue
        assert c.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
        time.sleep(1.5)  # let the running job reach its first epochs
        t0 = time.monotonic()
        c.post(f"/v1/jobs/{running['id']}/cancel").raise_for_status()
        done = wait_status(c, running["id"], ("cancelled",), timeout=20)
        elapsed = time.monotonic() - t0
        events = read_stream(c, running["id"])
        never = c.get(f"/v1/jobs/{queued['id']}/transitions").json()
        assert c.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    assert done["status"] == "cancelled" and elapsed < 10
    assert any(k == "checkpoint" for _, k, _, _ in events)
    assert [t["to"] for t in never] == ["queued", "cancelled"]


def test_job_submitted_through_the_queue_runs_like_http(svc):
    from celery import Celery

    broker = svc.env.get("TRICKSERVE_BROKER_URL", "filesystem://")
    sender = Celery(broker=broker)
    if broker.startswith("filesystem"):
        broker_dir = Path(svc.env["TRICKSERVE_HOME"]) / "broker"
        folder = str(broker_dir / "queue")
        sender.conf.broker_transport_options = {"data_folder_in": folder, "data_folder_out": folder,
                                                "control_folder": str(broker_dir / "control")}
    body = {**spec(), "name": "from-the-queue"}
    sender.send_task("trickserve.submit_job", kwargs={"spec": body, "idempotency_key": "q-1", "tenant": "e2e"})
    with svc.client() as c:
        deadline = time.monotonic() + 60
        while not (items := c.get("/v1/jobs", params={"name": "from-the-queue"}).json()["items"]):
            assert time.monotonic() < deadline, "the queued submission never became a job"
            time.sleep(0.2)
        done = wait_status(c, items[0]["id"], TERMINAL)
    assert done["status"] == "succeeded" and done["spec"]["name"] == "from-the-queue"


def test_sse_reconnect_with_last_event_id_delivers_each_event_once(svc):
    with svc.client() as c:
        job = submit(c, spec(epochs=8))
        first = read_stream(c, job["id"], stop_after=4)
        rest = read_stream(c, job["id"], last_id=first[-1][0])
        all_at_once = read_stream(c, job["id"])
    ids = [i for i, k, _, _ in first + rest if k != "end"]
    assert len(ids) == len(set(ids))
    assert ids == [i for i, k, _, _ in all_at_once if k != "end"]


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
