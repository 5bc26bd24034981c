"""Housekeeping sweep: re-queue jobs whose lease expired and send queued jobs the broker never got (the outbox)."""

from __future__ import annotations

import logging
import os
import threading

from core import jobs
from core.config import Settings
from core.db import get_engine, session_scope
from worker.celery_app import BrokerUnavailable, send_run_job

log = logging.getLogger(__name__)
BATCH = 100  # jobs sent per sweep; the next sweep sends the rest


def sweep(settings: Settings) -> dict[str, int]:
    """One pass. Safe to run in several workers at once: the database settles each job exactly once, and a job
    sent twice is harmless because only one claim of it succeeds."""
    with session_scope() as session:
        requeued = jobs.requeue_expired(session=session)  # they come back undispatched, so they are sent below
    with session_scope(read_only=True) as session:
        pending = jobs.undispatched_jobs(session, limit=BATCH, redispatch_after_s=settings.redispatch_after_s)
        pending_ids = [(job.job_id, job.queue) for job in pending]
    sent = _send(pending_ids)
    if sent:
        with session_scope() as session:
            jobs.mark_dispatched(session=session, job_ids=sent)
    if requeued or sent:
        log.info("reaper: re-queued %s, dispatched %s", requeued, sent)
    return {"requeued": len(requeued), "dispatched": len(sent)}


def _send(pending: list[tuple[str, str]]) -> list[str]:
    sent: list[str] = []
    for job_id, queue in pending:
        try:
            send_run_job(job_id, queue)  # through the app's producer pool, which is safe to share between threads
        except BrokerUnavailable as exc:
            log.warning("reaper: %s; retrying at the next sweep", exc)
            break
        sent.append(job_id)
    return sent


def reaper_loop(settings: Settings, stop: threading.Event) -> None:
    """Sweep now and then every settings.reaper_interval_s until `stop` is set; an error only skips one pass."""
    while True:
        with _sweeping:
            try:
                sweep(settings)
            except Exception:  # noqa: BLE001 - a database or broker outage must not end the loop
                log.exception("reaper: sweep failed")
            # No database connection stays open between sweeps, so a pool process forked now inherits none.
            get_engine().dispose()
        if stop.wait(settings.reaper_interval_s):
            return


# The worker forks a fresh pool process for every job while this loop runs in a thread of the same process. A fork
# in the middle of a sweep would copy locks held inside SQLite, libpq or kombu into a child that can never release
# them, so a fork waits for the sweep in progress to end.
_sweeping = threading.Lock()


def _before_fork() -> None:
    _sweeping.acquire()


def _after_fork_in_parent() -> None:
    _sweeping.release()


def _after_fork_in_child() -> None:
    global _sweeping
    _sweeping = threading.Lock()  # the copy is held by a thread the child does not have


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
