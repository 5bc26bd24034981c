"""Sending jobs to the broker: dispatch after commit, a bounded failure when the broker is away, and the reaper's
sweep (lost jobs back to the queue, unsent jobs sent), on the real filesystem broker and a real SQLite file."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from core import jobs
from core.config import Settings
from core.db import Database
from core.dispatch import dispatch
from core.models import utcnow
from tests.factories import Backend, make_spec, wait_for
from worker import celery_app, reaper
from worker.celery_app import WorkerApp


def sweep(app: WorkerApp) -> dict[str, int]:
    return reaper.sweep(app.settings, app.db, app.send_run_job)


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


def test_dispatch_sends_run_job_to_the_jobs_queue_and_marks_it_dispatched(backend: Backend, app: WorkerApp):
    job = backend.submit(make_spec())
    gpu_job = backend.submit(make_spec(resources={"device": "cuda"}))
    assert (job.queue, gpu_job.queue, backend.load(job.job_id).dispatched_at) == ("cpu", "gpu", None)
    with backend.session() as session:
        assert dispatch(session, [job, gpu_job], app.send_run_job) == [job.job_id, gpu_job.job_id]
    assert sent_messages(app.settings) == [("cpu", [job.job_id]), ("gpu", [gpu_job.job_id])]  # sorted by queue
    assert backend.load(job.job_id).dispatched_at is not None


def test_send_fails_fast_when_the_broker_refuses_and_dispatch_keeps_the_job(backend: Backend):
    app = celery_app.create_app(backend.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    job = backend.submit(make_spec())
    started = time.monotonic()
    with pytest.raises(celery_app.BrokerUnavailable, match=job.job_id):
        app.send_run_job(job.job_id, "cpu")
    assert time.monotonic() - started < 5
    with backend.session() as session:
        assert dispatch(session, job, app.send_run_job) == []
    assert backend.load(job.job_id).dispatched_at is None  # still in the outbox: the reaper sends it later


def test_send_gives_up_on_a_broker_that_never_answers(backend: Backend, monkeypatch: pytest.MonkeyPatch):
    silent = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    monkeypatch.setattr(celery_app, "SOCKET_TIMEOUT_S", 0.5)
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    app = celery_app.create_app(backend.settings.model_copy(update={"broker_url": url}))
    started = time.monotonic()
    with pytest.raises(celery_app.BrokerUnavailable):
        app.send_run_job("job_whatever", "cpu")
    assert time.monotonic() - started < 5
    silent.close()


def test_sweep_sends_jobs_the_broker_never_got(backend: Backend, app: WorkerApp):
    first, second = backend.submit(make_spec()), backend.submit(make_spec())
    assert sweep(app) == {"requeued": 0, "dispatched": 2}
    assert sent_messages(app.settings) == sorted([("cpu", [first.job_id]), ("cpu", [second.job_id])])
    assert sweep(app) == {"requeued": 0, "dispatched": 0}


def test_sweep_requeues_a_job_whose_lease_expired_and_sends_it_again(backend: Backend, app: WorkerApp):
    job = backend.submit(make_spec())
    with backend.session() as session:
        dispatch(session, job, app.send_run_job)
    with backend.session() as session:
        jobs.claim_job(session=session, job_id=job.job_id, worker_id="lost-worker", lease_s=0.01)
    time.sleep(0.05)  # the worker died: no heartbeat renews the lease
    assert sweep(app) == {"requeued": 1, "dispatched": 1}
    assert backend.statuses(job.job_id) == ["queued", "running", "queued"]
    assert sent_messages(app.settings) == [("cpu", [job.job_id]), ("cpu", [job.job_id])]


def test_concurrent_sweeps_settle_each_lost_job_once(backend: Backend, app: WorkerApp):
    lost = [backend.submit(make_spec()) for _ in range(5)]
    with backend.session() as session:
        for job in lost:
            jobs.claim_job(session=session, job_id=job.job_id, worker_id="lost-worker", lease_s=30)
    results: list[dict[str, int]] = []
    with backend.session() as session:  # expire them all at once
        assert len(jobs.requeue_expired(session=session, now=utcnow() + timedelta(hours=1))) == 5
    for job in lost:  # claimed again by a worker that dies as well
        with backend.session() as session:
            jobs.claim_job(session=session, job_id=job.job_id, worker_id="w2", lease_s=0.01)
    time.sleep(0.05)
    threads = [threading.Thread(target=lambda: results.append(sweep(app))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r["requeued"] for r in results) == 5
    for job in lost:
        assert backend.statuses(job.job_id) == ["queued", "running", "queued", "running", "queued"]


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


def test_a_sweep_that_keeps_failing_is_logged_once(backend: Backend, caplog: pytest.LogCaptureFixture):
    away = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # refuses every connection
    settings = backend.settings.model_copy(update={"reaper_interval_s": 0.01})
    stop = threading.Event()
    sweeping = threading.Thread(target=reaper.reaper_loop, args=(settings, away, lambda *_: None, stop))
    with caplog.at_level(logging.WARNING, logger="worker.reaper"):
        sweeping.start()
        try:
            wait_for(lambda: caplog.records, what="a failed sweep")
            time.sleep(0.5)  # many more sweeps fail meanwhile
        finally:
            stop.set()
            sweeping.join(timeout=10)
    [logged] = caplog.records
    assert "sweep failed: OperationalError" in logged.getMessage() and logged.exc_info is not None
