"""Real `celery -A worker.celery_app worker` processes, in both modes: embedded (SQLite file + filesystem broker)
and production (a new PostgreSQL database + Redis on a database number of its own)."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from core import jobs
from core.config import Settings, get_settings
from core.db import init_db, reset_engine, session_scope
from core.models import Job
from tests.conftest import _new_postgres_database
from tests.worker.conftest import TENANT, load, make_spec, slow_spec, statuses, submit, wait_for
from worker import celery_app

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("TRICKSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_LOCK = "trickserve-test:lock"
TERMINAL = ("succeeded", "early_stopped", "failed", "cancelled")


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def _private_redis_db() -> Iterator[str]:
    """The URL of a Redis database number no one else uses (claimed with a lock key), emptied afterwards."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis unreachable at {REDIS_URL}: {exc}")
    for db in random.sample(range(1, 16), 15):
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_connect_timeout=2)
        if not client.set(REDIS_LOCK, secrets.token_hex(8), nx=True, ex=600):
            continue
        if client.dbsize() != 1:  # someone's data: leave it alone
            client.delete(REDIS_LOCK)
            continue
        try:
            yield f"{REDIS_URL}/{db}"
        finally:
            client.flushdb()
        return
    pytest.fail("no free Redis database number")


@pytest.fixture(params=["embedded", "production"])
def service(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_sqlite: Path) -> Iterator[Settings]:
    """Process settings for one mode (short heartbeat, lease and reaper interval), shared with the workers through
    TRICKSERVE_* variables; `celery_app.app` is rebuilt from them."""
    monkeypatch.setenv("TRICKSERVE_HOME", str(tmp_path / "home"))
    # Tiny models gain nothing from threads, and spinning OpenMP threads slow a job on a busy CI machine tenfold.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name, value in {"HEARTBEAT_S": "0.2", "LEASE_S": "3", "REAPER_INTERVAL_S": "0.5"}.items():
        monkeypatch.setenv(f"TRICKSERVE_{name}", value)
    with _databases(request.param, tmp_path, _migrated_sqlite) as (database_url, broker_url):
        monkeypatch.setenv("TRICKSERVE_DATABASE_URL", database_url)
        monkeypatch.setenv("TRICKSERVE_BROKER_URL", broker_url)
        if broker_url.startswith("redis"):
            monkeypatch.setenv("TRICKSERVE_REDIS_URL", broker_url)
        get_settings.cache_clear()
        reset_engine()
        settings = get_settings()
        monkeypatch.setattr(celery_app, "app", celery_app.create_app(settings))
        yield settings
        reset_engine()
        get_settings.cache_clear()


@contextmanager
def _databases(mode: str, tmp_path: Path, migrated_sqlite: Path) -> Iterator[tuple[str, str]]:
    if mode == "embedded":
        shutil.copy(migrated_sqlite, tmp_path / "trickserve.db")
        yield f"sqlite:///{tmp_path / 'trickserve.db'}", "filesystem://"
        return
    with _new_postgres_database() as database_url, _private_redis_db() as broker_url:
        init_db(database_url)
        yield database_url, broker_url


class Worker:
    """One `celery worker` process in a session of its own; `kill` ends its whole process group."""

    def __init__(self, log_path: Path, queues: str = "cpu,gpu"):  # as `trickserve up` runs them; `celery` is implied
        self.log_path = log_path
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues,
                "-n", f"test-{secrets.token_hex(4)}@%h", "--loglevel", "INFO",
                "--without-mingle", "--without-gossip", "--without-heartbeat"]  # fmt: skip
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once, as a crash or the OOM killer would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    workers: list[Worker] = []

    def start() -> Worker:
        workers.append(Worker(tmp_path / f"worker-{len(workers)}.log"))
        return workers[-1]

    yield start
    for worker in workers:
        worker.kill()


def enqueue_new(spec: dict) -> Job:
    """Submit through core and enqueue after the commit, as the API does."""
    job = submit(spec)
    celery_app.enqueue(job.job_id, job.queue)
    return job


def wait_terminal(job_id: str, worker: Worker, timeout: float = 25.0) -> Job:
    try:
        wait_for(lambda: load(job_id).status in TERMINAL, timeout=timeout, what=f"{job_id} to finish")
    except AssertionError:
        print(worker.log())
        raise
    return load(job_id)


def test_job_submitted_through_core_runs_to_success(service, start_worker):
    job = enqueue_new(make_spec())
    assert load(job.job_id).dispatched_at is not None
    done = wait_terminal(job.job_id, start_worker())
    assert done.status == "succeeded", done.failure_message
    assert statuses(job.job_id) == ["queued", "running", "succeeded"]
    assert done.final_metrics["test/acc"] > 0.5 and Path(done.model_path).is_file()
    with session_scope(read_only=True) as session:
        assert len(jobs.list_events(session, job.job_id, kinds=["epoch_end"])) == 3


def test_job_submitted_with_only_send_task_runs_the_same(service, start_worker):
    # Another service: a bare Celery client that knows the broker and the task's name, nothing of trickserve.
    client = Celery(broker=service.broker_url, broker_transport_options=celery_app.transport_options(service))
    key = f"other-service-{secrets.token_hex(4)}"
    client.send_task("trickserve.submit_job", kwargs={"spec": make_spec(), "idempotency_key": key, "tenant": TENANT})
    worker = start_worker()

    def by_key() -> str | None:
        with session_scope(read_only=True) as session:
            return session.scalar(sa.select(Job.job_id).where(Job.tenant_id == TENANT, Job.idempotency_key == key))

    job_id = wait_for(by_key, timeout=20, what="the submitted job")
    done = wait_terminal(job_id, worker)
    assert done.status == "succeeded" and done.advice is not None and done.queue == "cpu"
    assert statuses(job_id) == ["queued", "running", "succeeded"]


def test_cancelling_a_running_job_ends_it_cancelled_within_seconds(service, start_worker):
    job = enqueue_new(slow_spec(epochs=200))
    worker = start_worker()
    wait_for(lambda: load(job.job_id).checkpoint_step, timeout=20, what="the first checkpoint")
    with session_scope() as session:
        jobs.request_cancel(session=session, job_id=job.job_id, tenant_id=TENANT)
    asked = time.monotonic()
    done = wait_terminal(job.job_id, worker, timeout=10)
    assert done.status == "cancelled" and done.stop_reason == "cancelled"
    assert time.monotonic() - asked < 5
    assert Path(done.checkpoint_path).is_file()


def test_job_cancelled_before_a_worker_starts_never_runs(service, start_worker):
    cancelled = enqueue_new(make_spec())
    with session_scope() as session:
        jobs.request_cancel(session=session, job_id=cancelled.job_id, tenant_id=TENANT)
    later = enqueue_new(make_spec())  # consumed after the cancelled job's message
    worker = start_worker()
    assert wait_terminal(later.job_id, worker).status == "succeeded"
    assert statuses(cancelled.job_id) == ["queued", "cancelled"]
    assert load(cancelled.job_id).attempt == 0


def test_worker_sends_a_job_whose_enqueue_never_happened(service, start_worker):
    job = submit(make_spec())  # committed, but the broker never heard of it (say the API crashed right after)
    done = wait_terminal(job.job_id, start_worker())
    assert done.status == "succeeded" and done.dispatched_at is not None


def test_job_of_a_killed_worker_resumes_on_another_from_its_checkpoint(service, start_worker):
    job = enqueue_new(slow_spec(epochs=12))
    first = start_worker()
    wait_for(lambda: load(job.job_id).checkpoint_step, timeout=20, what="the first checkpoint")
    first.kill()
    done = wait_terminal(job.job_id, start_worker())  # its reaper re-queues the job once the lease runs out
    assert done.status == "succeeded" and done.attempt == 2
    assert statuses(job.job_id) == ["queued", "running", "queued", "running", "succeeded"]
    with session_scope(read_only=True) as session:
        [resumed] = jobs.list_events(session, job.job_id, kinds=["resumed"])
        epochs = [e.epoch for e in jobs.list_events(session, job.job_id, kinds=["epoch_end"])]
    assert resumed.attempt == 2 and resumed.data["from_step"] > 0
    assert epochs == list(range(1, 13))
