"""Celery tasks, thin like views: each re-reads the job from the database and calls one plain function.

They are shared tasks, bound to whichever app the worker runs (worker/main.py), and read its settings and database
from `self.app`."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import shared_task

from core import studies, tenants
from core.dispatch import dispatch
from core.jobs import IdempotencyConflict
from core.submit import Caps, SubmitError, submit
from worker import reaper, runner
from worker.celery_app import REAP_TASK, RUN_TASK, SUBMIT_STUDY_TASK, SUBMIT_TASK, WorkerApp

log = logging.getLogger(__name__)


@shared_task(name=RUN_TASK, bind=True)
def run_job(self: Any, job_id: str) -> str:
    """Run the next attempt of a job if it is still queued; a duplicate or stale message is dropped."""
    app: WorkerApp = self.app
    worker_id = f"{self.request.hostname or socket.gethostname()}/{os.getpid()}"
    return runner.run_job(job_id, worker_id=worker_id, settings=app.settings, db=app.db, send=app.send_run_job)


@shared_task(name=SUBMIT_TASK, bind=True)
def submit_job(
    self: Any, spec: dict[str, Any], idempotency_key: str | None = None, tenant: str = "default"
) -> dict[str, Any]:
    """Create a job exactly as POST /v1/jobs does, then send it. The name is stable: other services call it with
    `send_task("trickserve.submit_job", kwargs={...})` and, having no result backend, find the job again by its
    idempotency key through the API. A refused submission is logged and answered as status `rejected`."""
    app: WorkerApp = self.app
    with app.db.session() as session:
        try:
            tenants.create_tenant(session=session, tenant_id=tenant)
            submitted = submit(
                session=session,
                tenant_id=tenant,
                spec_dict=spec,
                idempotency_key=idempotency_key,
                max_active_jobs=app.settings.max_active_jobs_per_tenant,
                caps=Caps.from_settings(app.settings),
            )
        except (tenants.InvalidTenantId, SubmitError, IdempotencyConflict) as exc:
            log.warning("submit_job rejected (tenant %r, key %r): %s", tenant, idempotency_key, exc)
            return {"job_id": None, "status": "rejected", "error": {"code": _code(exc), "message": str(exc)}}
        job = submitted.job
        if submitted.created:  # as over HTTP, only the call that created the job sends it; the outbox covers a loss
            dispatch(session, job, app.send_run_job)
    return {"job_id": job.job_id, "status": str(job.status)}


@shared_task(name=SUBMIT_STUDY_TASK, bind=True)
def submit_study(
    self: Any, spec: dict[str, Any], idempotency_key: str | None = None, tenant: str = "default"
) -> dict[str, Any]:
    """Create a study exactly as POST /v1/studies does, then send its first trials; found again, like a job, by its
    idempotency key through the API. A refused study is logged and answered as status `rejected`."""
    app: WorkerApp = self.app
    settings = app.settings
    with app.db.session() as session:
        try:
            tenants.create_tenant(session=session, tenant_id=tenant)
            created = studies.submit_study(
                session=session,
                tenant_id=tenant,
                raw=spec,
                caps=Caps.from_settings(settings),
                max_trials=settings.max_study_trials,
                idempotency_key=idempotency_key,
                max_active_jobs=settings.max_active_jobs_per_tenant,
            )
        except (tenants.InvalidTenantId, SubmitError) as exc:
            log.warning("submit_study rejected (tenant %r, key %r): %s", tenant, idempotency_key, exc)
            return {"study_id": None, "status": "rejected", "error": {"code": _code(exc), "message": str(exc)}}
        if created.trials:  # only the call that created them; the outbox covers a loss
            dispatch(session, created.trials, app.send_run_job)
        return {"study_id": created.study.study_id, "status": str(created.study.status)}


@shared_task(name=REAP_TASK, bind=True)
def reap(self: Any) -> dict[str, int]:
    """Housekeeping (also run every reaper_interval_s by each worker): re-queue lost jobs, send unsent ones."""
    app: WorkerApp = self.app
    return reaper.sweep(app.settings, app.db, app.send_run_job)


def _code(exc: Exception) -> str:
    if isinstance(exc, tenants.InvalidTenantId):
        return "invalid_tenant"
    return exc.code if isinstance(exc, SubmitError) else "idempotency_conflict"
