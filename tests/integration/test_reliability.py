"""Failure scenarios with real processes: workers killed with SIGKILL or paused with
SIGSTOP, a job that kills its worker every time, a broker redelivering a running job, Redis and the API going
away mid-job, SQLite under write contention, a crash in the middle of a checkpoint write, and early stopping across
a resume. Every test checks the database, the source of truth: job status, attempts, transitions and events."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from cli.service import worker_argv
from cli.supervisor import WorkerPool
from core import jobs
from core.config import Settings
from core.db import init_db
from core.engine import Callback, Recorder, StopFlag, train
from core.engine.callbacks import RunContext
from core.engine.checkpoint import load_checkpoint, load_model_file
from core.models import Artifact, Job, JobEvent, JobTransition
from core.spec import JobSpec
from tests.conftest import _new_postgres_database
from tests.factories import TENANT, make_spec, slow_spec, wait_for
from tests.integration.conftest import (
    REPO,
    Follower,
    OwnRedis,
    Service,
    Worker,
    close,
    configure,
)
from worker import faults, reaper
from worker.celery_app import create_app

pytestmark = pytest.mark.integration
METRICS = ("progress", "epoch_end", "test")
OUTAGE_S = 4.0  # long enough for the worker's reconnect back-off (2 s, then 4 s) to come into play


# ------------------------------------------------------------------------------------------- helpers


def assert_one_point_per_step(service: Service, job_id: str, epochs: int) -> list[JobEvent]:
    """Each metric kind has one event per step, epoch_end one per epoch 1..epochs; returns all the events."""
    everything = service.events(job_id)
    per_step = Counter((e.kind, e.step) for e in everything if e.kind in METRICS)
    assert [key for key, n in per_step.items() if n > 1] == []
    assert [e.epoch for e in everything if e.kind == "epoch_end"] == list(range(1, epochs + 1))
    return everything


def assert_model_loads(service: Service, model_key: str) -> None:
    tensors, meta = load_model_file(service.stored_file(model_key))
    assert tensors and meta["spec"]["name"]
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def checkpoint_after(service: Service, job_id: str, step: int = 0) -> int | None:
    """The job's checkpoint step once it is past `step` (None before)."""
    ckpt = service.load(job_id).checkpoint_step
    return ckpt if ckpt is not None and ckpt > step else None


def assert_resumed_once(service: Service, job_id: str, from_step: int, everything: list[JobEvent]) -> None:
    """Attempt 2 resumed from `from_step` (the checkpoint the database pointed at), and its first metric is the
    step after it, not step 0."""
    [resumed] = [e for e in everything if e.kind == "resumed"]
    assert resumed.attempt == 2 and resumed.data["from_step"] == from_step
    second = [e.step for e in everything if e.attempt == 2 and e.kind in METRICS]
    assert min(second) > from_step
    first = [e.step for e in everything if e.attempt == 1 and e.kind in METRICS]
    assert not first or max(first) <= from_step  # what attempt 1 did after its checkpoint was superseded


# ------------------------------------------------------------------------- 1. SIGKILL mid-training


@pytest.mark.parametrize("target", ["pool child", "process group"])
def test_killed_worker_job_resumes_from_its_checkpoint_on_a_new_process(service, start_worker, target):
    """The job of a worker killed with SIGKILL (the pool child alone, as the OOM killer does, or the whole
    worker) is re-queued by a reaper once its lease runs out and resumes on a new process from its checkpoint."""
    epochs = 10
    job = service.enqueue_new(slow_spec(epochs=epochs))
    first = start_worker()
    ckpt = wait_for(lambda: checkpoint_after(service, job.job_id), timeout=30, what="the first checkpoint")
    wait_for(lambda: service.events(job.job_id, "progress")[-1].step > ckpt, what="progress past the checkpoint")
    victim = service.running_pid(job.job_id)
    if target == "pool child":
        os.kill(victim, signal.SIGKILL)  # the worker's main process lives on, forks a new child and reaps the job
        workers = [first]
    else:
        first.kill()
        workers = [start_worker()]
    killed_at, checkpoint_step = time.monotonic(), service.load(job.job_id).checkpoint_step  # attempt 2 resumes from it
    if target == "pool child":  # the worker lives on: the job is back within the lease plus a sweep (and slack)
        wait_for(lambda: service.load(job.job_id).attempt == 2, timeout=30, what="attempt 2")
        assert time.monotonic() - killed_at < service.settings.lease_s + service.settings.reaper_interval_s + 3
    done = service.wait_terminal(job.job_id, *workers, timeout=40)
    assert done.status == "succeeded" and done.attempt == 2, done.failure_message
    assert service.statuses(job.job_id) == ["queued", "running", "queued", "running", "succeeded"]
    assert service.running_pid(job.job_id) != victim
    everything = assert_one_point_per_step(service, job.job_id, epochs)
    assert_resumed_once(service, job.job_id, checkpoint_step, everything)
    assert len([e for e in everything if e.kind == "test"]) == 1
    assert_model_loads(service, done.model_key)


def test_kill_between_checkpoint_file_and_its_pointer_resumes_from_the_pointed_checkpoint(embedded, start_worker):
    """The worker dies after writing its 2nd checkpoint file but before the database points at it: attempt 2 must
    resume from the checkpoint the database names (the 1st), not from a file rewritten under the same name."""
    epochs = 6
    job = embedded.enqueue_new(slow_spec(epochs=epochs))
    crash = {faults.JOB_VAR: job.job_id, faults.AT_VAR: "checkpoint:2", faults.ATTEMPTS_VAR: "1"}
    worker = start_worker(**crash)
    done = embedded.wait_terminal(job.job_id, worker, timeout=40)
    assert done.status == "succeeded" and done.attempt == 2, done.failure_message
    everything = assert_one_point_per_step(embedded, job.job_id, epochs)
    first_checkpoint = [e for e in everything if e.kind == "epoch_end"][0].step
    assert_resumed_once(embedded, job.job_id, first_checkpoint, everything)
    assert_model_loads(embedded, done.model_key)


# ------------------------------------------------------------------------------------- 2. poison job


def test_job_that_kills_its_worker_every_time_fails_as_worker_lost_and_others_run(embedded, start_worker):
    """A job whose process dies at its first step, every attempt, is retried max_attempts times then fails
    as worker_lost, without looping; a job submitted alongside succeeds on the same worker."""
    poison = embedded.enqueue_new(make_spec(resources={"max_attempts": 2}))
    other = embedded.enqueue_new(make_spec())
    worker = start_worker(**{faults.JOB_VAR: poison.job_id, faults.AT_VAR: "step:1"})
    done = embedded.wait_terminal(poison.job_id, worker, timeout=40)
    assert done.status == "failed" and done.failure_class == "worker_lost", done.failure_message
    assert done.attempt == 2
    assert embedded.statuses(poison.job_id) == ["queued", "running", "queued", "running", "failed"]
    assert embedded.wait_terminal(other.job_id, worker).status == "succeeded"
    time.sleep(2)  # a few sweeps later nothing moved: no redelivery brought it back
    assert embedded.load(poison.job_id).attempt == 2 and len(embedded.statuses(poison.job_id)) == 5
    assert worker.proc.poll() is None  # only the pool children died


def test_job_cancelled_while_its_worker_is_dead_is_never_retried(embedded, start_worker):
    """Between retries: the cancel arrives while the job's process is dead and its lease runs out; the
    reaper ends it cancelled instead of retrying it, and the next job runs."""
    job = embedded.enqueue_new(slow_spec(epochs=10))
    worker = start_worker(**{faults.JOB_VAR: job.job_id, faults.AT_VAR: "step:50", faults.ATTEMPTS_VAR: "1"})
    wait_for(lambda: "exited with 'signal 9" in worker.log(tail=None), timeout=30, what="the pool child to die")
    with embedded.session() as session:
        jobs.request_cancel(session=session, job_id=job.job_id, tenant_id=TENANT)
    next_job = embedded.enqueue_new(make_spec())
    done = embedded.wait_terminal(job.job_id, worker)
    assert done.status == "cancelled" and done.attempt == 1
    assert embedded.statuses(job.job_id) == ["queued", "running", "cancelling", "cancelled"]
    assert embedded.wait_terminal(next_job.job_id, worker).status == "succeeded"
    assert embedded.load(job.job_id).attempt == 1


# ------------------------------------------------------------------------------ 3. stale worker fenced


def _holds_lock(service: Service, job_id: str) -> bool:
    """Whether some transaction holds the job's row (PostgreSQL) or the write lock (SQLite) right now: every write
    of a worker locks its job first."""
    url = sa.make_url(service.settings.database_url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(url.database, timeout=0.1, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()
    with service.db.engine.connect() as conn:
        try:
            conn.exec_driver_sql("SELECT 1 FROM job WHERE job_id = %(id)s FOR UPDATE NOWAIT", {"id": job_id})
            return False
        except sa.exc.OperationalError:
            return True
        finally:
            conn.rollback()


def pause(service: Service, worker: Worker, job_id: str) -> None:
    """SIGSTOP the whole worker, at a moment it holds no database lock: a process paused inside a transaction would
    block every other writer of the job (SQLite: of the database) until it is continued."""
    for _ in range(100):
        worker.signal(signal.SIGSTOP)
        time.sleep(0.05)  # the signal has landed everywhere
        if not _holds_lock(service, job_id):
            return
        worker.signal(signal.SIGCONT)
        time.sleep(0.02)
    pytest.fail("the worker always held a database lock")


def test_paused_worker_is_fenced_and_its_late_writes_change_nothing(service, start_worker):
    """A worker paused (SIGSTOP) past its lease loses the job to another worker (attempt 2). Continued, the
    old attempt's writes (events, checkpoint pointer, status) change nothing and it stops by itself; the database
    never shows attempt 1 ending."""
    epochs = 24
    job = service.enqueue_new(slow_spec(epochs=epochs))
    old = start_worker()
    wait_for(lambda: checkpoint_after(service, job.job_id), timeout=30, what="the first checkpoint")
    pause(service, old, job.job_id)
    paused_at = service.load(job.job_id).checkpoint_step
    new = start_worker()
    wait_for(lambda: service.load(job.job_id).attempt == 2, timeout=30, what="attempt 2")
    wait_for(lambda: checkpoint_after(service, job.job_id, paused_at), timeout=30, what="attempt 2's first checkpoint")
    before = _attempt_rows(service, job.job_id, 1)

    old.signal(signal.SIGCONT)
    wait_for(lambda: "'fenced'" in old.log(tail=None), timeout=20, what="attempt 1 to stop")
    assert "attempt 1 was fenced out" in old.log(tail=None)
    assert _attempt_rows(service, job.job_id, 1) == before  # nothing attempt 1 wrote after it lost the job was kept
    now = service.load(job.job_id)
    assert now.status == "running" and now.attempt == 2 and "attempt-2" in now.checkpoint_key

    done = service.wait_terminal(job.job_id, old, new, timeout=40)
    assert done.status == "succeeded" and done.attempt == 2, done.failure_message
    assert service.statuses(job.job_id) == ["queued", "running", "queued", "running", "succeeded"]
    assert _attempt_rows(service, job.job_id, 1) == before
    assert "attempt-2" in done.checkpoint_key and "attempt-2" in done.model_key
    everything = assert_one_point_per_step(service, job.job_id, epochs)
    assert_resumed_once(service, job.job_id, paused_at, everything)


def _attempt_rows(service: Service, job_id: str, attempt: int) -> tuple[list, list, list]:
    """An attempt's events, transitions and artifacts, as comparable tuples."""
    with service.session(read_only=True) as session:
        found = [
            session.execute(
                sa.select(*cols).where(table.job_id == job_id, table.attempt == attempt).order_by(key)
            ).all()
            for table, cols, key in (
                (JobEvent, (JobEvent.job_event_id, JobEvent.kind, JobEvent.step), JobEvent.job_event_id),
                (JobTransition, (JobTransition.to_status, JobTransition.at), JobTransition.job_transition_id),
                (Artifact, (Artifact.key, Artifact.size_bytes, Artifact.created_at), Artifact.artifact_id),
            )
        ]
    return tuple(found)


# ------------------------------------------------------------------ 4. job longer than the visibility timeout


def test_job_outliving_the_redis_visibility_timeout_runs_exactly_once(production, start_worker, monkeypatch):
    """With a 2 s visibility timeout Redis hands the running job's message to the idle second worker; the
    claim drops it, so one attempt trains: attempt 1 only, one running and one terminal transition, no duplicate
    metric step."""
    monkeypatch.setenv("TRICKSERVE_BROKER_VISIBILITY_TIMEOUT_S", "2")  # read by the workers started below
    assert Settings().broker_visibility_timeout_s == 2
    assert create_app(Settings()).conf.broker_transport_options["visibility_timeout"] == 2
    epochs = 24
    job = production.enqueue_new(slow_spec(epochs=epochs))
    workers = [start_worker(), start_worker()]
    done = production.wait_terminal(job.job_id, *workers, timeout=60)
    assert done.status == "succeeded" and done.attempt == 1, done.failure_message
    assert production.statuses(job.job_id) == ["queued", "running", "succeeded"]
    assert_one_point_per_step(production, job.job_id, epochs)
    assert {e.attempt for e in production.events(job.job_id)} == {0, 1}
    logs = "".join(w.log(tail=None) for w in workers)
    assert "not claimable" in logs, "the message was never delivered again: the test proves nothing"


# ---------------------------------------------------------------------------------------- 5. Redis outage


@pytest.fixture
def own_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Service, OwnRedis]]:
    """Production mode on a redis-server of the test's own (broker and notifications), which it may stop."""
    server = OwnRedis(tmp_path / "redis.log")
    try:
        with _new_postgres_database() as database_url:
            init_db(database_url)
            # A message Redis loses in a restart is sent again after REDISPATCH_AFTER_S (the outbox's second chance).
            service = configure(monkeypatch, tmp_path / "home", database_url, server.url, server.url,
                                REDISPATCH_AFTER_S="4")  # fmt: skip
            yield service, server
            close(service)
    finally:
        server.stop()


def test_redis_outage_mid_job_loses_and_duplicates_nothing(own_redis, start_worker, start_api):
    """Redis (broker and notifications) is killed while a job trains and comes back empty. The job finishes
    (continuing, or resumed from its checkpoint), its metrics have one point per step, polling answers throughout,
    the event stream falls back to database polling and ends; a job submitted meanwhile is stored (201,
    undispatched) and runs once Redis is back, once; so does a job whose message Redis lost."""
    service, server = own_redis
    epochs = 40
    worker = start_worker()
    api = start_api(service)
    with api.client() as client:
        response = client.post("/v1/jobs", json=slow_spec(epochs=epochs))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        assert service.load(job_id).dispatched_at is not None
        stream = Follower(api, job_id)
        stream.start()
        wait_for(lambda: checkpoint_after(service, job_id), timeout=30, what="the first checkpoint")
        # Sent while the only worker process trains: its message waits in Redis, and goes down with it.
        waiting = client.post("/v1/jobs", json=make_spec(name="waiting-in-redis"))
        assert waiting.status_code == 201 and service.load(waiting.json()["id"]).dispatched_at is not None

        server.stop()
        stopped, streamed = time.monotonic(), len(stream.ids)
        down_at = max(e.step for e in service.events(job_id, "epoch_end"))
        later = client.post("/v1/jobs", json=make_spec(name="while-redis-is-down"))
        assert later.status_code == 201, later.text
        later_id = later.json()["id"]
        assert service.load(later_id).dispatched_at is None and service.load(later_id).status == "queued"
        # Training goes on without Redis, and polling answers from the database.
        wait_for(lambda: max(e.step for e in service.events(job_id, "epoch_end")) > down_at, what="an epoch while down")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["items"]
        time.sleep(max(0.0, stopped + OUTAGE_S - time.monotonic()))
        assert len(stream.ids) > streamed  # the stream kept going on database polling
        assert service.load(job_id).status == "running"
        server.start()

        done = service.wait_terminal(job_id, worker, timeout=60)
        assert done.status == "succeeded", done.failure_message
        for other in (later_id, waiting.json()["id"]):
            assert service.wait_terminal(other, worker, timeout=60).status == "succeeded"
            assert service.statuses(other) == ["queued", "running", "succeeded"] and service.load(other).attempt == 1
        resent = [line for line in worker.log(tail=None).splitlines() if "reaper:" in line and "dispatched" in line]
        assert any(waiting.json()["id"] in line for line in resent)  # Redis came back empty: the outbox sent it again
        polled = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["items"]
    # Continued (attempt 1), or resumed once from its checkpoint: never two attempts at the same time.
    expected = [["queued", "running", "succeeded"], ["queued", "running", "queued", "running", "succeeded"]]
    assert service.statuses(job_id) == expected[done.attempt - 1]
    everything = assert_one_point_per_step(service, job_id, epochs)
    points = Counter((p["name"], p["step"]) for p in polled)
    assert points and max(points.values()) == 1
    end, received = stream.result()
    assert end == "succeeded" and len(received) == len(set(received))
    assert {e.job_event_id for e in everything} <= set(received)


# ----------------------------------------------------------------------------- 6. SSE across API restarts


def test_event_stream_resumes_across_api_restarts_without_gap_or_repeat(embedded, start_worker, start_api):
    """The API process is stopped (SIGTERM, then SIGKILL) and started again on the same port while a job
    runs; a client reconnecting with Last-Event-ID receives every event of the job exactly once."""
    worker = start_worker()
    api = start_api(embedded)
    job = embedded.enqueue_new(slow_spec(epochs=24))
    stream = Follower(api, job.job_id)
    stream.start()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        wait_for(lambda: checkpoint_after(embedded, job.job_id), timeout=30, what="the job to run")
        seen = len(stream.ids)
        wait_for(lambda: len(stream.ids) > seen + 3, what="events on the stream")  # noqa: B023
        api.stop(sig)
        time.sleep(1.0)  # the job goes on emitting while no API runs
        api.start()
    done = embedded.wait_terminal(job.job_id, worker, timeout=60)
    assert done.status == "succeeded" and done.attempt == 1, done.failure_message
    end, received = stream.result()
    assert end == "succeeded" and stream.connects >= 3, stream.errors
    assert len(received) == len(set(received))
    assert received == sorted(received) == [e.job_event_id for e in embedded.events(job.job_id)]


# ------------------------------------------------------------------------ 7. early stopping across a resume

PATIENCE = 3


def stopping_spec() -> dict:
    """Validation loss improves for a few epochs, then stops improving: early stopping ends the run (deterministic
    on the CPU for a seed)."""
    stopping = {"monitor": "val/loss", "patience": PATIENCE, "restore_best_weights": True}
    return make_spec(optim={"lr": 0.01}, train={"epochs": 40, "early_stopping": stopping})


class CopyCheckpointAt(Callback):
    """Keeps a copy of the checkpoint written at the end of `epoch`: what a worker killed right after it leaves."""

    def __init__(self, epoch: int, to: Path):
        self.epoch, self.to = epoch, to

    def on_checkpoint(self, ctx: RunContext, path: str) -> None:
        if ctx.epoch == self.epoch and not ctx.should_stop:
            shutil.copyfile(path, self.to)


class StopAfterEpoch(Callback):
    """Sets a stop flag at the end of `epoch` (as a cancel request would): the run stops at the next step."""

    def __init__(self, flag: StopFlag, epoch: int):
        self.flag, self.epoch = flag, epoch

    def on_epoch_end(self, ctx: RunContext, logs: dict) -> None:
        if ctx.epoch == self.epoch:
            self.flag.set()


def _without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


@pytest.mark.parametrize("cut", ["killed after the checkpoint", "stopped mid-epoch"])
def test_early_stopping_patience_survives_a_resume(tmp_path: Path, cut: str):
    """In the engine: interrupted after PATIENCE-1 non-improving epochs, the resumed run stops after exactly one
    more, at the same epoch as an uninterrupted run, with the same best epoch and the same restored weights."""
    spec = JobSpec.model_validate(stopping_spec())
    full_rec = Recorder()
    full = train(spec, [full_rec], out_dir=tmp_path / "full")
    assert full.status == "early_stopped" and full.epochs_run - full.best_epoch == PATIENCE
    cut_epoch = full.epochs_run - 1  # PATIENCE - 1 evaluations without improvement so far
    saved = tmp_path / "kept.pt"
    if cut == "killed after the checkpoint":
        train(spec, [CopyCheckpointAt(cut_epoch, saved)], out_dir=tmp_path / "cut")
    else:
        flag = StopFlag()
        cancelled = train(spec, [StopAfterEpoch(flag, cut_epoch), flag], out_dir=tmp_path / "cut")
        assert cancelled.status == "cancelled" and cancelled.epochs_run == cut_epoch
        shutil.copyfile(tmp_path / "cut" / "checkpoint.pt", saved)
    assert load_checkpoint(saved)["epoch"] == cut_epoch

    rec = Recorder()
    resumed = train(spec, [rec], resume_from=saved, out_dir=tmp_path / "resumed")
    assert resumed.status == "early_stopped" and resumed.stop_reason == "early_stop"
    assert [e.epoch for e in rec.events if e.kind == "epoch_end"] == [full.epochs_run]  # exactly one more
    [stop] = [e.data for e in rec.events if e.kind == "early_stop"]
    [full_stop] = [e.data for e in full_rec.events if e.kind == "early_stop"]
    assert stop == full_stop and stop["wait"] == PATIENCE and stop["best_epoch"] == full.best_epoch
    assert resumed.best_epoch == full.best_epoch and _without_times(resumed.history) == _without_times(full.history)
    for name, tensor in full.model.state_dict().items():  # the best weights, restored
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_early_stopped_job_killed_mid_patience_resumes_and_stops_on_time(embedded, start_worker):
    """Through the service: a worker killed one step after the checkpoint of epoch E-1 (PATIENCE-1 epochs without
    improvement); attempt 2 trains exactly epoch E and the job ends early_stopped at the uninterrupted epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (OMP_NUM_THREADS=1): the same numbers, so the same stopping epoch
    try:
        full = train(JobSpec.model_validate(stopping_spec()))
    finally:
        torch.set_num_threads(threads)
    stop_epoch, steps = full.epochs_run, full.info["steps_per_epoch"]
    job = embedded.enqueue_new(stopping_spec())
    crash_at = f"step:{(stop_epoch - 1) * steps + 1}"
    worker = start_worker(**{faults.JOB_VAR: job.job_id, faults.AT_VAR: crash_at, faults.ATTEMPTS_VAR: "1"})
    done = embedded.wait_terminal(job.job_id, worker, timeout=40)
    assert done.status == "early_stopped" and done.stop_reason == "early_stop" and done.attempt == 2
    everything = assert_one_point_per_step(embedded, job.job_id, stop_epoch)
    assert [e.epoch for e in everything if e.kind == "epoch_end" and e.attempt == 2] == [stop_epoch]
    [stop] = [e for e in everything if e.kind == "early_stop"]
    assert stop.attempt == 2 and stop.data["wait"] == PATIENCE and stop.data["best_epoch"] == full.best_epoch
    assert done.best_metrics["epoch"] == full.best_epoch
    assert_resumed_once(embedded, job.job_id, (stop_epoch - 1) * steps, everything)


# ------------------------------------------------------------------------------ 8. SQLite write contention

CONTENTION_S = 10.0
BATCH = 20
_OTHER_PROCESS = """
import json, sys, time
from core import jobs
from core.config import Settings
from core.db import Database
db = Database.from_settings(Settings())
job_id, attempt, seconds, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
written, errors, step, deadline = 0, [], 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    batch = [{"kind": "progress", "step": step + i, "data": {"train/loss": 1.0}} for i in range(size)]
    try:
        with db.session() as session:
            assert jobs.record_events(session=session, job_id=job_id, attempt=attempt, events=batch)
            jobs.heartbeat(session=session, job_id=job_id, attempt=attempt, lease_s=600)
        written, step = written + len(batch), step + len(batch)
    except Exception as exc:
        errors.append(repr(exc))
print(json.dumps({"written": written, "errors": errors}))
"""


def test_sqlite_takes_eight_concurrent_writers_without_database_is_locked(embedded, monkeypatch):
    """Event batches, heartbeats, job submissions and reaper sweeps from threads and a second process at
    once for CONTENTION_S: no "database is locked" (or any) error, and every row written is there."""
    claims = []
    for _ in range(4):
        job = embedded.submit(make_spec())
        with embedded.session() as session:
            claims.append(jobs.claim_job(session=session, job_id=job.job_id, worker_id="t", lease_s=600))
    written: Counter[str] = Counter()
    errors: list[str] = []
    deadline = time.monotonic() + CONTENTION_S

    def loop(name: str, write) -> None:
        n = 0
        while time.monotonic() < deadline:
            try:
                write(n)
                written[name] += 1
                n += 1
            except Exception as exc:  # noqa: BLE001 - every error is a failure of this test
                errors.append(f"{name}: {exc!r}")

    def events_of(claim):
        def write(n: int) -> None:
            batch = [{"kind": "progress", "step": n * BATCH + i, "data": {"train/loss": 1.0}} for i in range(BATCH)]
            with embedded.session() as session:
                assert jobs.record_events(session=session, job_id=claim.job_id, attempt=claim.attempt, events=batch)

        return write

    def beats(n: int) -> None:
        with embedded.session() as session:
            for claim in claims[:3]:
                assert jobs.heartbeat(session=session, job_id=claim.job_id, attempt=claim.attempt, lease_s=600).alive

    def creates(n: int) -> None:
        embedded.submit(make_spec(name=f"contention-{n}"))

    def sweeps(n: int) -> None:
        reaper.sweep(embedded.settings, embedded.db, lambda job_id, queue: None)  # the sweep's sends: no broker
        with embedded.session(read_only=True) as session:
            jobs.list_events(session, claims[0].job_id, after=0, limit=200)

    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_PROCESS, claims[3].job_id, str(claims[3].attempt), str(CONTENTION_S), str(BATCH)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ,
    )  # fmt: skip
    threads = [threading.Thread(target=loop, args=(f"events-{i}", events_of(claims[i]))) for i in range(3)]
    threads += [threading.Thread(target=loop, args=args) for args in [("beats", beats), ("creates", creates),
                                                                      ("sweeps", sweeps)]]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out, err = other.communicate(timeout=60)
    assert other.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert errors == [] and report["errors"] == []
    assert min(written.values()) > 5 and report["written"] > 5 * BATCH  # everyone got the lock many times
    for i in range(3):
        assert len(embedded.events(claims[i].job_id, "progress")) == written[f"events-{i}"] * BATCH
    assert len(embedded.events(claims[3].job_id, "progress")) == report["written"]
    with embedded.session(read_only=True) as session:
        created = session.scalar(sa.select(sa.func.count()).select_from(Job).where(Job.name.like("contention-%")))
    assert created == written["creates"]


# ---------------------------------------------------------------------- 9. crash during a checkpoint write

_SAVE_AND_DIE = """
import os, signal, sys
import torch
from core.engine import checkpoint

path, point = sys.argv[1], sys.argv[2]
state = checkpoint.load_checkpoint(path)
state["step"] += 1000
state["ballast"] = torch.ones(8 << 20)  # 32 MiB: many writes
state.pop("format"), state.pop("code_version")


class DiesMidWrite:
    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        if self.written + len(data) > (4 << 20):  # the ballast: half of it reaches the file, then the process dies
            self.f.write(memoryview(data)[: len(data) // 2])
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.written += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


if point == "mid-write":
    real_save = torch.save
    checkpoint.torch.save = lambda obj, f, **kw: real_save(obj, DiesMidWrite(f), **kw)
else:  # written and synced, not yet renamed
    checkpoint.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_checkpoint(path, state)
print("survived")
"""


@pytest.mark.parametrize("point", ["mid-write", "before rename"])
def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path: Path, point: str):
    """A process SIGKILLed while it writes a checkpoint (or after writing, before the rename) leaves the
    previous checkpoint whole at the final path, and training resumes from its step."""
    spec = JobSpec.model_validate(make_spec(train={"epochs": 3}))
    train(spec, out_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    before, size = load_checkpoint(path)["step"], path.stat().st_size
    crashed = subprocess.run([sys.executable, "-c", _SAVE_AND_DIE, str(path), point], cwd=REPO, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr[-3000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-")]
    assert leftovers and leftovers[0].stat().st_size > (4 << 20)  # it died inside the write of a big file...
    assert path.stat().st_size == size and load_checkpoint(path)["step"] == before  # ...the final path is intact
    rec = Recorder()
    spec = JobSpec.model_validate(make_spec(train={"epochs": 5}))
    resumed = train(spec, [rec], resume_from=path, out_dir=tmp_path / "resumed")
    assert rec.events[0].kind == "resumed" and rec.events[0].data["from_step"] == before
    assert resumed.status == "succeeded" and resumed.epochs_run == 5


# ------------------------------------------------------------------- 10. `trickserve up` restarts its workers


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie: dead, not yet reaped


def test_worker_pool_restarts_a_killed_worker_which_resumes_the_job_and_runs_later_ones(embedded):
    """Under `trickserve up`: the WorkerPool replaces a worker whose main process is killed with SIGKILL. Its
    pool child dies with it (no orphan keeps training), the new worker resumes the job from its checkpoint, and
    runs the next job."""
    pool = WorkerPool([worker_argv("cpu,gpu", 1, f"pool-{os.getpid()}")])
    pool.start()
    first = pool.procs[0]
    try:
        job = embedded.enqueue_new(slow_spec(epochs=10))
        wait_for(lambda: checkpoint_after(embedded, job.job_id), timeout=30, what="the first checkpoint")
        child = embedded.running_pid(job.job_id)
        os.kill(first.pid, signal.SIGKILL)  # the process `trickserve up` started, alone
        first.wait()
        wait_for(lambda: _gone(child), timeout=10, what="the orphaned pool child to die")
        wait_for(lambda: pool.procs[0] is not first and pool.procs[0].poll() is None, timeout=15, what="a new worker")
        done = embedded.wait_terminal(job.job_id, timeout=40)
        assert done.status == "succeeded" and done.attempt == 2, done.failure_message
        assert_one_point_per_step(embedded, job.job_id, 10)
        later = embedded.enqueue_new(make_spec())
        assert embedded.wait_terminal(later.job_id, timeout=30).status == "succeeded"
        assert pool.restarts == [1] and pool.procs[0].poll() is None
    finally:
        pool.stop()
        try:
            os.killpg(first.pid, signal.SIGKILL)  # whatever is left of the first worker's process group
        except ProcessLookupError:
            pass
    assert pool.procs[0].poll() is not None  # stopped with the pool


def test_a_job_row_locked_by_a_frozen_transaction_does_not_stall_the_reaper(production, start_worker):
    """The worse pause: a worker frozen inside a transaction keeps its job's row locked (PostgreSQL waits
    for it without limit). The reaper must still re-queue the other lost jobs (and the worker keep forking for
    them); the frozen job is settled once its lock goes."""
    frozen, lost = production.submit(make_spec()), production.submit(make_spec())
    with production.session() as session:
        for job in (frozen, lost):  # both claimed by workers that vanished: their leases are long expired
            assert jobs.claim_job(session=session, job_id=job.job_id, worker_id="gone/1", lease_s=0.01)
    with production.db.engine.connect() as holder:
        holder.exec_driver_sql("SELECT 1 FROM job WHERE job_id = %(id)s FOR UPDATE", {"id": frozen.job_id})
        worker = start_worker()
        assert production.wait_terminal(lost.job_id, worker, timeout=30).status == "succeeded"
        assert production.load(frozen.job_id).status == "running"  # untouchable while the lock is held
        holder.rollback()
    done = production.wait_terminal(frozen.job_id, worker, timeout=30)
    assert done.status == "succeeded" and done.attempt == 2
