"""Celery tasks, thin like views: each re-reads the job from the database and calls one plain function."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from core import jobs
from core.config import get_settings
from core.db import session_scope
from core.submit import SubmitError, submit
from worker import reaper, runner
from worker.celery_app import REAP_TASK, RUN_TASK, SUBMIT_TASK, BrokerUnavailable, app, enqueue

log = logging.getLogger(__name__)


@app.task(name=RUN_TASK, bind=True)
def run_job(self: Any, job_id: str) -> str:
    """Run the next attempt of a job if it is still queued; a duplicate or stale message is dropped."""
    worker_id = f"{self.request.hostname or socket.gethostname()}/{os.getpid()}"
    return runner.run_job(job_id, worker_id=worker_id, settings=get_settings())


@app.task(name=SUBMIT_TASK)
def submit_job(spec: dict[str, Any], idempotency_key: str | None = None, tenant: str = "default") -> dict[str, Any]:
    """Create a job exactly as POST /v1/jobs does, then enqueue it. The name is stable: other services call it with
    `send_task("trickserve.submit_job", kwargs={...})` and, having no result backend, find the job again by its
    idempotency key through the API. A refused spec is logged and answered as status `rejected`."""
    settings = get_settings()
    with session_scope() as session:
        jobs.ensure_tenant(session=session, tenant_id=tenant)
        try:
            submitted = submit(
                session=session,
                tenant_id=tenant,
                spec_dict=spec,
                idempotency_key=idempotency_key,
                max_active_jobs=settings.max_active_jobs_per_tenant,
            )
        except (SubmitError, jobs.IdempotencyConflict) as exc:
            log.warning("submit_job rejected (tenant %s, key %s): %s", tenant, idempotency_key, exc)
            return {"job_id": None, "status": "rejected", "error": {"code": _code(exc), "message": str(exc)}}
    job = submitted.job
    if submitted.created:  # as over HTTP, only the call that created the job sends it; the outbox covers a loss
        try:
            enqueue(job.job_id, job.queue)
        except BrokerUnavailable as exc:
            log.warning("%s; the reaper will send it", exc)
    return {"job_id": job.job_id, "status": str(job.status)}


@app.task(name=REAP_TASK)
def reap() -> dict[str, int]:
    """Housekeeping (also run every reaper_interval_s by each worker): re-queue lost jobs, send unsent ones."""
    return reaper.sweep(get_settings())


def _code(exc: Exception) -> str:
    return exc.code if isinstance(exc, SubmitError) else "idempotency_conflict"
