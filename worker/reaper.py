"""Housekeeping sweep: re-queue jobs whose lease expired and send queued jobs the broker never got (the outbox)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import signals

from core import jobs, studies
from core.config import Settings
from core.db import Database
from core.dispatch import Send, dispatch
from worker.celery_app import WorkerApp
from worker.logs import Throttled

log = logging.getLogger(__name__)
BATCH = 100  # jobs sent per sweep; the next sweep sends the rest


def sweep(settings: Settings, db: Database, send: Send) -> dict[str, int]:
    """One pass. Safe to run in several workers at once: the database settles each job exactly once, and a job
    sent twice is harmless because only one claim of it succeeds."""
    with db.session() as session:
        session.info[studies.MAX_ACTIVE_JOBS] = settings.max_active_jobs_per_tenant
        requeued = jobs.requeue_expired(session=session)  # they come back undispatched, so they are sent below
        studies.sweep(session)  # next trials lost with a process, or waiting for room: sent below too
    with db.session(read_only=True) as session:
        pending = jobs.undispatched_jobs(session, limit=BATCH, redispatch_after_s=settings.redispatch_after_s)
    with db.session() as session:
        sent = dispatch(session, pending, send)  # through the app's producer pool, safe to share between threads
    if requeued or sent:
        log.info("reaper: re-queued %s, dispatched %s", requeued, sent)
    return {"requeued": len(requeued), "dispatched": len(sent)}


def reaper_loop(settings: Settings, db: Database, send: Send, stop: threading.Event) -> None:
    """Sweep now and then every settings.reaper_interval_s until `stop` is set; an error only skips one pass (and
    is logged once, then once a minute while it lasts)."""
    failures = Throttled(log)
    while True:
        with _sweeping:
            try:
                sweep(settings, db, send)
            except Exception as exc:  # noqa: BLE001 - a database or broker outage must not end the loop
                failures.log(logging.ERROR, "reaper: sweep failed: %s", _first_line(exc), exc_info=True)
            else:
                failures.reset()
            # No database connection stays open between sweeps, so a pool process forked now inherits none.
            db.dispose()
        if stop.wait(settings.reaper_interval_s):
            return


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def run_in_worker(app: WorkerApp) -> None:
    """Sweep in a thread of every worker's main process while it runs: the embedded mode needs no beat process,
    and concurrent sweeps are safe because every change in one is a compare-and-set in the database."""
    stop = threading.Event()

    @signals.worker_ready.connect(weak=False)
    def _start(**_: Any) -> None:
        stop.clear()
        args = (app.settings, app.db, app.send_run_job, stop)
        threading.Thread(target=reaper_loop, args=args, name="trickserve-reaper", daemon=True).start()

    @signals.worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:
        stop.set()


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
