"""Failure scenarios with real processes (reliability-notes.md §8): workers killed with SIGKILL or paused with
SIGSTOP, a job that kills its worker every time, a broker redelivering a running job, Redis and the API going
away mid-job, SQLite under write contention, a crash in the middle of a checkpoint write, and early stopping across
a resume. Every test checks the database, the source of truth: job status, attempts, transitions and events."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from core.config import Settings, get_settings
from core.db import get_engine, init_db, reset_engine, session_scope
from core.engine.checkpoint import load_model_file
from core.models import Artifact, JobEvent, JobTransition
from tests.conftest import _new_postgres_database
from tests.integration.conftest import (
    Follower,
    OwnRedis,
    Worker,
    configure,
    enqueue_new,
    running_pid,
    wait_terminal,
)
from tests.worker.conftest import events, load, make_spec, slow_spec, statuses, wait_for
from worker import celery_app, faults

pytestmark = pytest.mark.integration
METRICS = ("progress", "epoch_end", "test")
OUTAGE_S = 4.0  # long enough for the worker's reconnect back-off (2 s, then 4 s) to come into play


# ------------------------------------------------------------------------------------------- helpers


def configure_again(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings re-read after a test changed TRICKSERVE_* variables, and the Celery app rebuilt from them."""
    get_settings.cache_clear()
    reset_engine()
    settings = get_settings()
    monkeypatch.setattr(celery_app, "app", celery_app.create_app(settings))
    return settings


def assert_one_point_per_step(job_id: str, epochs: int) -> list[JobEvent]:
    """Each metric kind has one event per step, epoch_end one per epoch 1..epochs; returns all the events."""
    everything = events(job_id)
    per_step = Counter((e.kind, e.step) for e in everything if e.kind in METRICS)
    assert [key for key, n in per_step.items() if n > 1] == []
    assert [e.epoch for e in everything if e.kind == "epoch_end"] == list(range(1, epochs + 1))
    return everything


def assert_model_loads(model_path: str) -> None:
    tensors, meta = load_model_file(model_path)
    assert tensors and meta["spec"]["name"]
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def checkpoint_after(job_id: str, step: int = 0) -> int | None:
    """The job's checkpoint step once it is past `step` (None before)."""
    ckpt = load(job_id).checkpoint_step
    return ckpt if ckpt is not None and ckpt > step else None


def assert_resumed_once(job_id: str, from_step: int, everything: list[JobEvent]) -> None:
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
    """§8.1: the job of a worker killed with SIGKILL (the pool child alone, as the OOM killer does, or the whole
    worker) is re-queued by a reaper once its lease runs out and resumes on a new process from its checkpoint."""
    epochs = 10
    job = enqueue_new(slow_spec(epochs=epochs))
    first = start_worker()
    ckpt = wait_for(lambda: checkpoint_after(job.job_id), timeout=30, what="the first checkpoint")
    wait_for(lambda: events(job.job_id, "progress")[-1].step > ckpt, what="progress past the checkpoint")
    victim = running_pid(job.job_id)
    if target == "pool child":
        os.kill(victim, signal.SIGKILL)  # the worker's main process lives on, forks a new child and reaps the job
        workers = [first]
    else:
        first.kill()
        workers = [start_worker()]
    checkpoint_step = load(job.job_id).checkpoint_step  # the pointer attempt 2 resumes from
    done = wait_terminal(job.job_id, *workers, timeout=40)
    assert done.status == "succeeded" and done.attempt == 2, done.failure_message
    assert statuses(job.job_id) == ["queued", "running", "queued", "running", "succeeded"]
    assert running_pid(job.job_id) != victim
    everything = assert_one_point_per_step(job.job_id, epochs)
    assert_resumed_once(job.job_id, checkpoint_step, everything)
    assert len([e for e in everything if e.kind == "test"]) == 1
    assert_model_loads(done.model_path)


def test_kill_between_checkpoint_file_and_its_pointer_resumes_from_the_pointed_checkpoint(embedded, start_worker):
    """The worker dies after writing its 2nd checkpoint file but before the database points at it: attempt 2 must
    resume from the checkpoint the database names (the 1st), not from a file rewritten under the same name."""
    epochs = 6
    job = enqueue_new(slow_spec(epochs=epochs))
    crash = {faults.JOB_VAR: job.job_id, faults.AT_VAR: "checkpoint:2", faults.ATTEMPTS_VAR: "1"}
    worker = start_worker(**crash)
    done = wait_terminal(job.job_id, worker, timeout=40)
    assert done.status == "succeeded" and done.attempt == 2, done.failure_message
    everything = assert_one_point_per_step(job.job_id, epochs)
    first_checkpoint = [e for e in everything if e.kind == "epoch_end"][0].step
    assert_resumed_once(job.job_id, first_checkpoint, everything)
    assert_model_loads(done.model_path)


# ------------------------------------------------------------------------------------- 2. poison job


def test_job_that_kills_its_worker_every_time_fails_as_worker_lost_and_others_run(embedded, start_worker):
    """§8.5: a job whose process dies at its first step, every attempt, is retried max_attempts times then fails
    as worker_lost, without looping; a job submitted alongside succeeds on the same worker."""
    poison = enqueue_new(make_spec(resources={"max_attempts": 2}))
    other = enqueue_new(make_spec())
    worker = start_worker(**{faults.JOB_VAR: poison.job_id, faults.AT_VAR: "step:1"})
    done = wait_terminal(poison.job_id, worker, timeout=40)
    assert done.status == "failed" and done.failure_class == "worker_lost", done.failure_message
    assert done.attempt == 2 and statuses(poison.job_id) == ["queued", "running", "queued", "running", "failed"]
    assert wait_terminal(other.job_id, worker).status == "succeeded"
    time.sleep(2)  # a few sweeps later nothing moved: no redelivery brought it back
    assert load(poison.job_id).attempt == 2 and len(statuses(poison.job_id)) == 5
    assert worker.proc.poll() is None  # only the pool children died


# ------------------------------------------------------------------------------ 3. stale worker fenced


def _holds_lock(settings, job_id: str) -> bool:
    """Whether some transaction holds the job's row (PostgreSQL) or the write lock (SQLite) right now: every write
    of a worker locks its job first."""
    url = sa.make_url(settings.database_url)
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
    with get_engine().connect() as conn:
        try:
            conn.exec_driver_sql("SELECT 1 FROM job WHERE job_id = %(id)s FOR UPDATE NOWAIT", {"id": job_id})
            return False
        except sa.exc.OperationalError:
            return True
        finally:
            conn.rollback()


def pause(worker: Worker, settings, job_id: str) -> None:
    """SIGSTOP the whole worker, at a moment it holds no database lock: a process paused inside a transaction would
    block every other writer of the job (SQLite: of the database) until it is continued."""
    for _ in range(100):
        worker.signal(signal.SIGSTOP)
        time.sleep(0.05)  # the signal has landed everywhere
        if not _holds_lock(settings, job_id):
            return
        worker.signal(signal.SIGCONT)
        time.sleep(0.02)
    pytest.fail("the worker always held a database lock")


def test_paused_worker_is_fenced_and_its_late_writes_change_nothing(service, start_worker):
    """§8.3: a worker paused (SIGSTOP) past its lease loses the job to another worker (attempt 2). Continued, the
    old attempt's writes (events, checkpoint pointer, status) change nothing and it stops by itself; the database
    never shows attempt 1 ending."""
    epochs = 24
    job = enqueue_new(slow_spec(epochs=epochs))
    old = start_worker()
    wait_for(lambda: checkpoint_after(job.job_id), timeout=30, what="the first checkpoint")
    pause(old, service, job.job_id)
    paused_at = load(job.job_id).checkpoint_step
    new = start_worker()
    wait_for(lambda: load(job.job_id).attempt == 2, timeout=30, what="attempt 2")
    wait_for(lambda: checkpoint_after(job.job_id, paused_at), timeout=30, what="attempt 2's first checkpoint")
    before = _attempt_rows(job.job_id, 1)

    old.signal(signal.SIGCONT)
    wait_for(lambda: "'fenced'" in old.log(tail=None), timeout=20, what="attempt 1 to stop")
    assert "attempt 1 was fenced out" in old.log(tail=None)
    assert _attempt_rows(job.job_id, 1) == before  # nothing attempt 1 wrote after it lost the job was kept
    now = load(job.job_id)
    assert now.status == "running" and now.attempt == 2 and "attempt-2" in now.checkpoint_path

    done = wait_terminal(job.job_id, old, new, timeout=40)
    assert done.status == "succeeded" and done.attempt == 2, done.failure_message
    assert statuses(job.job_id) == ["queued", "running", "queued", "running", "succeeded"]
    assert _attempt_rows(job.job_id, 1) == before
    assert "attempt-2" in done.checkpoint_path and "attempt-2" in done.model_path
    everything = assert_one_point_per_step(job.job_id, epochs)
    assert_resumed_once(job.job_id, paused_at, everything)


def _attempt_rows(job_id: str, attempt: int) -> tuple[list, list, list]:
    """An attempt's events, transitions and artifacts, as comparable tuples."""
    with session_scope(read_only=True) as session:
        found = [
            session.execute(
                sa.select(*cols).where(table.job_id == job_id, table.attempt == attempt).order_by(key)
            ).all()
            for table, cols, key in (
                (JobEvent, (JobEvent.job_event_id, JobEvent.kind, JobEvent.step), JobEvent.job_event_id),
                (JobTransition, (JobTransition.to_status, JobTransition.at), JobTransition.job_transition_id),
                (Artifact, (Artifact.path, Artifact.size_bytes, Artifact.created_at), Artifact.artifact_id),
            )
        ]
    return tuple(found)


# ------------------------------------------------------------------ 4. job longer than the visibility timeout


def test_job_outliving_the_redis_visibility_timeout_runs_exactly_once(production, start_worker, monkeypatch):
    """§8.2: with a 2 s visibility timeout Redis hands the running job's message to the idle second worker; the
    claim drops it, so one attempt trains: attempt 1 only, one running and one terminal transition, no duplicate
    metric step."""
    monkeypatch.setenv("TRICKSERVE_BROKER_VISIBILITY_TIMEOUT_S", "2")
    settings = configure_again(monkeypatch)
    assert settings.broker_visibility_timeout_s == 2
    assert celery_app.app.conf.broker_transport_options["visibility_timeout"] == 2
    epochs = 24
    job = enqueue_new(slow_spec(epochs=epochs))
    workers = [start_worker(), start_worker()]
    done = wait_terminal(job.job_id, *workers, timeout=60)
    assert done.status == "succeeded" and done.attempt == 1, done.failure_message
    assert statuses(job.job_id) == ["queued", "running", "succeeded"]
    assert_one_point_per_step(job.job_id, epochs)
    assert {e.attempt for e in events(job.job_id)} == {0, 1}
    logs = "".join(w.log(tail=None) for w in workers)
    assert "not claimable" in logs, "the message was never delivered again: the test proves nothing"


# ---------------------------------------------------------------------------------------- 5. Redis outage


@pytest.fixture
def own_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, OwnRedis]]:
    """Production mode on a redis-server of the test's own (broker and notifications), which it may stop."""
    server = OwnRedis(tmp_path / "redis.log")
    try:
        with _new_postgres_database() as database_url:
            init_db(database_url)
            yield configure(monkeypatch, tmp_path / "home", database_url, server.url, server.url), server
            reset_engine()
    finally:
        server.stop()


def test_redis_outage_mid_job_loses_and_duplicates_nothing(own_redis, start_worker, start_api):
    """§8.11: Redis (broker and notifications) is killed while a job trains and comes back empty. The job finishes
    (continuing, or resumed from its checkpoint), its metrics have one point per step, polling answers throughout,
    the event stream falls back to database polling and ends; a job submitted meanwhile is stored (201,
    undispatched) and runs once Redis is back, once."""
    settings, server = own_redis
    epochs = 40
    worker = start_worker()
    api = start_api(settings)
    with api.client() as client:
        response = client.post("/v1/jobs", json=slow_spec(epochs=epochs))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        assert load(job_id).dispatched_at is not None
        stream = Follower(api, job_id)
        stream.start()
        wait_for(lambda: checkpoint_after(job_id), timeout=30, what="the first checkpoint")

        server.stop()
        stopped, streamed = time.monotonic(), len(stream.ids)
        down_at = max(e.step for e in events(job_id, "epoch_end"))
        later = client.post("/v1/jobs", json=make_spec(name="while-redis-is-down"))
        assert later.status_code == 201, later.text
        later_id = later.json()["id"]
        assert load(later_id).dispatched_at is None and load(later_id).status == "queued"
        # Training goes on without Redis, and polling answers from the database.
        wait_for(lambda: max(e.step for e in events(job_id, "epoch_end")) > down_at, what="an epoch while down")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["items"]
        time.sleep(max(0.0, stopped + OUTAGE_S - time.monotonic()))
        assert len(stream.ids) > streamed  # the stream kept going on database polling
        assert load(job_id).status == "running"
        server.start()

        done = wait_terminal(job_id, worker, timeout=60)
        assert done.status == "succeeded", done.failure_message
        assert wait_terminal(later_id, worker, timeout=60).status == "succeeded"
        polled = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["items"]
    assert statuses(later_id) == ["queued", "running", "succeeded"] and load(later_id).attempt == 1
    # Continued (attempt 1), or resumed once from its checkpoint: never two attempts at the same time.
    expected = [["queued", "running", "succeeded"], ["queued", "running", "queued", "running", "succeeded"]]
    assert statuses(job_id) == expected[done.attempt - 1]
    everything = assert_one_point_per_step(job_id, epochs)
    points = Counter((p["name"], p["step"]) for p in polled)
    assert points and max(points.values()) == 1
    end, received = stream.result()
    assert end == "succeeded" and len(received) == len(set(received))
    assert {e.job_event_id for e in everything} <= set(received)


# ----------------------------------------------------------------------------- 6. SSE across API restarts


def test_event_stream_resumes_across_api_restarts_without_gap_or_repeat(embedded, start_worker, start_api):
    """§8.10: the API process is stopped (SIGTERM, then SIGKILL) and started again on the same port while a job
    runs; a client reconnecting with Last-Event-ID receives every event of the job exactly once."""
    worker = start_worker()
    api = start_api(embedded)
    job = enqueue_new(slow_spec(epochs=24))
    stream = Follower(api, job.job_id)
    stream.start()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        wait_for(lambda: checkpoint_after(job.job_id), timeout=30, what="the job to run")
        seen = len(stream.ids)
        wait_for(lambda: len(stream.ids) > seen + 3, what="events on the stream")  # noqa: B023
        api.stop(sig)
        time.sleep(1.0)  # the job goes on emitting while no API runs
        api.start()
    done = wait_terminal(job.job_id, worker, timeout=60)
    assert done.status == "succeeded" and done.attempt == 1, done.failure_message
    end, received = stream.result()
    assert end == "succeeded" and stream.connects >= 3, stream.errors
    assert len(received) == len(set(received))
    assert received == sorted(received) == [e.job_event_id for e in events(job.job_id)]
