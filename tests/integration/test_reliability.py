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

import pytest
import sqlalchemy as sa
import torch

from core.config import Settings, get_settings
from core.db import get_engine, reset_engine, session_scope
from core.engine.checkpoint import load_model_file
from core.models import Artifact, JobEvent, JobTransition
from tests.integration.conftest import (
    Worker,
    enqueue_new,
    running_pid,
    wait_terminal,
)
from tests.worker.conftest import events, load, make_spec, slow_spec, statuses, wait_for
from worker import celery_app, faults

pytestmark = pytest.mark.integration
METRICS = ("progress", "epoch_end", "test")


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
