"""Sending a stored job to the workers, always after its row is committed; a broker outage never loses a job."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from core import jobs
from core.models import Job, JobStatus

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]  # (job_id, queue); raises when the broker cannot be reached


def send_run_job(job_id: str, queue: str) -> None:
    """Publish `run_job(job_id)` on `queue` through the worker's Celery app (loaded on first use)."""
    from worker.celery_app import send_run_job as send

    send(job_id, queue)


def dispatch(session: Session, job: Job, enqueue: Enqueue) -> bool:
    """Send a committed, queued, not yet sent job and mark it dispatched. When the broker is away the job stays
    stored with dispatched_at null, and the outbox sweep sends it later; returns whether it was sent now."""
    if job.status != JobStatus.queued or job.dispatched_at is not None:
        return False
    try:
        enqueue(job.job_id, job.queue)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the database keeps the job
        log.warning("job %s stored but not sent (the outbox sweep will send it): %s", job.job_id, exc)
        return False
    jobs.mark_dispatched(session=session, job_ids=job.job_id)
    return True
