"""Sending jobs to the broker: enqueue after commit, a bounded failure when the broker is away, and the reaper's
sweep (lost jobs back to the queue, unsent jobs sent), on the real filesystem broker and a real SQLite file."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from core import jobs
from core.config import Settings
from core.db import session_scope
from core.models import utcnow
from tests.worker.conftest import load, make_spec, statuses, submit
from worker import celery_app, reaper


@pytest.fixture
def app(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """celery_app.app rebuilt for the test's settings (the filesystem broker under tmp_path)."""
    monkeypatch.setattr(celery_app, "app", celery_app.create_app(settings))
    return settings


def sent_messages(settings: Settings) -> list[tuple[str, list]]:
    """(queue, task args) of every message waiting in the filesystem broker, sorted (its order within a millisecond
    is random)."""
    folder = Path(settings.broker_transport_options["data_folder_in"])
    found = []
    for path in sorted(folder.iterdir()):
        payload = json.loads(path.read_bytes())
        assert payload["headers"]["task"] == "trickserve.run_job"
        args, _kwargs, _ = json.loads(base64.b64decode(payload["body"]))
        found.append((path.name.split(".", 1)[1].removesuffix(".msg"), args))
    return sorted(found)


def test_enqueue_sends_run_job_to_the_jobs_queue_and_marks_it_dispatched(app):
    job = submit(make_spec())
    gpu_job = submit(make_spec(resources={"device": "cuda"}))
    assert (job.queue, gpu_job.queue, load(job.job_id).dispatched_at) == ("cpu", "gpu", None)
    celery_app.enqueue(job.job_id, job.queue)
    celery_app.enqueue(gpu_job.job_id, gpu_job.queue)
    assert sent_messages(app) == [("cpu", [job.job_id]), ("gpu", [gpu_job.job_id])]  # sorted by queue
    assert load(job.job_id).dispatched_at is not None


def test_enqueue_fails_fast_when_the_broker_refuses(settings, monkeypatch):
    monkeypatch.setattr(
        celery_app, "app", celery_app.create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    )
    job = submit(make_spec())
    started = time.monotonic()
    with pytest.raises(celery_app.BrokerUnavailable, match=job.job_id):
        celery_app.enqueue(job.job_id, "cpu")
    assert time.monotonic() - started < 5
    assert load(job.job_id).dispatched_at is None  # still in the outbox: the reaper sends it later


def test_enqueue_gives_up_on_a_broker_that_never_answers(settings, monkeypatch):
    silent = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    monkeypatch.setattr(celery_app, "SOCKET_TIMEOUT_S", 0.5)
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    monkeypatch.setattr(celery_app, "app", celery_app.create_app(settings.model_copy(update={"broker_url": url})))
    started = time.monotonic()
    with pytest.raises(celery_app.BrokerUnavailable):
        celery_app.enqueue("job_whatever", "cpu")
    assert time.monotonic() - started < 5
    silent.close()


def test_sweep_sends_jobs_the_broker_never_got(app):
    first, second = submit(make_spec()), submit(make_spec())
    assert reaper.sweep(app) == {"requeued": 0, "dispatched": 2}
    assert sent_messages(app) == sorted([("cpu", [first.job_id]), ("cpu", [second.job_id])])
    assert reaper.sweep(app) == {"requeued": 0, "dispatched": 0}


def test_sweep_requeues_a_job_whose_lease_expired_and_sends_it_again(app):
    job = submit(make_spec())
    celery_app.enqueue(job.job_id, job.queue)
    with session_scope() as session:
        jobs.claim_job(session=session, job_id=job.job_id, worker_id="lost-worker", lease_s=0.01)
    time.sleep(0.05)  # the worker died: no heartbeat renews the lease
    assert reaper.sweep(app) == {"requeued": 1, "dispatched": 1}
    assert statuses(job.job_id) == ["queued", "running", "queued"]
    assert sent_messages(app) == [("cpu", [job.job_id]), ("cpu", [job.job_id])]


def test_concurrent_sweeps_settle_each_lost_job_once(app):
    lost = [submit(make_spec()) for _ in range(5)]
    with session_scope() as session:
        for job in lost:
            jobs.claim_job(session=session, job_id=job.job_id, worker_id="lost-worker", lease_s=30)
    results: list[dict[str, int]] = []
    with session_scope() as session:  # expire them all at once
        assert len(jobs.requeue_expired(session=session, now=utcnow() + timedelta(hours=1))) == 5
    for job in lost:  # claimed again by a worker that dies as well
        with session_scope() as session:
            jobs.claim_job(session=session, job_id=job.job_id, worker_id="w2", lease_s=0.01)
    time.sleep(0.05)
    threads = [threading.Thread(target=lambda: results.append(reaper.sweep(app))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r["requeued"] for r in results) == 5
    for job in lost:
        assert statuses(job.job_id) == ["queued", "running", "queued", "running", "queued"]


def test_a_fork_waits_for_the_sweep_in_progress():
    # The worker forks a pool process per job beside the reaper thread; a child forked mid-sweep could inherit
    # locks (SQLite, libpq, kombu) that no thread of it will ever release.
    sweeping = threading.Event()

    def hold_the_sweep_lock() -> None:
        with reaper._sweeping:
            sweeping.set()
            time.sleep(0.3)

    thread = threading.Thread(target=hold_the_sweep_lock)
    thread.start()
    sweeping.wait()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    waited = time.monotonic() - started
    os.waitpid(pid, 0)
    thread.join()
    assert waited >= 0.2
