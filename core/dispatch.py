"""Sending stored jobs to the workers: the one path from a committed, queued job to the broker, taken by HTTP
submissions, queue submissions and the outbox sweep alike. A broker outage never loses a job."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from sqlalchemy.orm import Session

from core import jobs
from core.models import Job, JobStatus

log = logging.getLogger(__name__)

Send = Callable[[str, str], None]  # (job_id, queue): publish one run message; raises when the broker is away


def dispatch(session: Session, pending: Job | Iterable[Job], send: Send) -> list[str]:
    """Send committed, queued jobs in order and mark the sent ones dispatched (one commit on `session`, after the
    broker calls, so no transaction is open while the broker is slow). At the first broker failure the rest stay
    with dispatched_at as it was, for the outbox sweep to send later. Returns the ids that were sent."""
    sent: list[str] = []
    for job in [pending] if isinstance(pending, Job) else pending:
        if job.status != JobStatus.queued:
            continue
        try:
            send(job.job_id, job.queue)
        except Exception as exc:  # noqa: BLE001 - any broker failure: the database keeps the job
            log.warning("job %s stored but not sent (the outbox sweep will send it): %s", job.job_id, exc)
            break
        sent.append(job.job_id)
    if sent:
        jobs.mark_dispatched(session=session, job_ids=sent)
    return sent
