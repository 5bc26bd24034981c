"""Real `celery -A worker.main worker` processes, in both modes: embedded (SQLite file + filesystem broker)
and production (a new PostgreSQL database + Redis on a database number of its own)."""

from __future__ import annotations

import re
import secrets
import time

import pytest
import sqlalchemy as sa
from celery import Celery

from core import jobs
from core.models import Job
from tests.factories import TENANT, make_spec, slow_spec, wait_for
from tests.integration.conftest import _private_redis_db
from worker import celery_app, preload

pytestmark = pytest.mark.integration
__all__ = ["_private_redis_db"]  # tests/integration/test_service_e2e.py imports it from here


def test_job_submitted_through_core_runs_to_success(service, start_worker):
    job = service.enqueue_new(make_spec())
    assert service.load(job.job_id).dispatched_at is not None
    done = service.wait_terminal(job.job_id, start_worker())
    assert done.status == "succeeded", done.failure_message
    assert service.statuses(job.job_id) == ["queued", "running", "succeeded"]
    assert done.final_metrics["test/acc"] > 0.5 and service.stored_file(done.model_key).is_file()
    with service.session(read_only=True) as session:
        assert len(jobs.list_events(session, job.job_id, kinds=["epoch_end"])) == 3


def test_each_job_runs_in_a_fresh_process_forked_warm_and_replaced_at_once(service, start_worker):
    # Two jobs queued on one worker: each runs in a process of its own, forked from a main process that imported
    # the engine before any job, and the pool replaced the first job's process as soon as it had exited
    # (worker/prefork.py logs it), rather than on its maintenance timer.
    queued = [service.enqueue_new(make_spec()) for _ in range(2)]
    worker = start_worker()
    done = sorted((service.wait_terminal(job.job_id, worker) for job in queued), key=lambda job: job.started_at)
    assert [job.status for job in done] == ["succeeded", "succeeded"]
    first, second = (int(job.lease_owner.rsplit("/", 1)[1]) for job in done)
    assert first != second and worker.proc.pid not in (first, second)
    log = worker.log(tail=None)
    assert log.index(f"preloaded {', '.join(preload.MODULES)}") < log.index("claimed by")
    assert re.search(rf"pool process {first} ended \(exit code \d+\); {second} takes the next job", log), log


def test_job_submitted_with_only_send_task_runs_the_same(service, start_worker):
    # Another service: a bare Celery client that knows the broker and the task's name, nothing of trickserve.
    options = celery_app.transport_options(service.settings)
    client = Celery(broker=service.settings.broker_url, broker_transport_options=options)
    key = f"other-service-{secrets.token_hex(4)}"
    client.send_task("trickserve.submit_job", kwargs={"spec": make_spec(), "idempotency_key": key, "tenant": TENANT})
    worker = start_worker()

    def by_key() -> str | None:
        with service.session(read_only=True) as session:
            return session.scalar(sa.select(Job.job_id).where(Job.tenant_id == TENANT, Job.idempotency_key == key))

    job_id = wait_for(by_key, timeout=20, what="the submitted job")
    done = service.wait_terminal(job_id, worker)
    assert done.status == "succeeded" and done.advice is not None and done.queue == "cpu"
    assert service.statuses(job_id) == ["queued", "running", "succeeded"]


def test_cancelling_a_running_job_ends_it_cancelled_within_seconds(service, start_worker):
    job = service.enqueue_new(slow_spec(epochs=200))
    worker = start_worker()
    wait_for(lambda: service.load(job.job_id).checkpoint_step, timeout=20, what="the first checkpoint")
    with service.session() as session:
        jobs.request_cancel(session=session, job_id=job.job_id, tenant_id=TENANT)
    asked = time.monotonic()
    done = service.wait_terminal(job.job_id, worker, timeout=10)
    assert done.status == "cancelled" and done.stop_reason == "cancelled"
    assert time.monotonic() - asked < 5
    assert service.stored_file(done.checkpoint_key).is_file()


def test_job_cancelled_before_a_worker_starts_never_runs(service, start_worker):
    cancelled = service.enqueue_new(make_spec())
    with service.session() as session:
        jobs.request_cancel(session=session, job_id=cancelled.job_id, tenant_id=TENANT)
    later = service.enqueue_new(make_spec())  # consumed after the cancelled job's message
    worker = start_worker()
    assert service.wait_terminal(later.job_id, worker).status == "succeeded"
    assert service.statuses(cancelled.job_id) == ["queued", "cancelled"]
    assert service.load(cancelled.job_id).attempt == 0


def test_worker_sends_a_job_whose_enqueue_never_happened(service, start_worker):
    job = service.submit(make_spec())  # committed, but the broker never heard of it (say the API crashed right after)
    done = service.wait_terminal(job.job_id, start_worker())
    assert done.status == "succeeded" and done.dispatched_at is not None
