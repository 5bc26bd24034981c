"""Building and configuring the Celery app from Settings, and publishing `run_job` messages on it.

Reliability rests on the database, not on the broker: a message only wakes a worker up, the job row
says what to do, and the reaper re-sends whatever a lost or duplicated message would have dropped. Choices:

- `task_acks_late` + `worker_prefetch_multiplier=1`: a worker reserves only the job it runs, so a queued job never
  waits behind a long one inside a busy worker while another worker idles.
- `task_reject_on_worker_lost=False`: when the process running a job dies (segfault, kill -9) the message is
  acked, not requeued. Requeueing has no redelivery cap and loops on a job that always crashes; instead the lease
  expires, the reaper re-queues the job from its checkpoint and counts the attempt against `max_attempts`. A death
  by the OOM killer fails the job at once as `out_of_memory` (worker/oom.py): it would only die again.
- Redis `visibility_timeout` is long (a day, `broker_visibility_timeout_s`): a job outliving it would be redelivered
  while still running; that duplicate is harmless (the claim is a compare-and-set and drops it) but pointless.
  Recovery does not wait for it either: the lease and the outbox sweep re-send a lost job after `lease_s` /
  `redispatch_after_s`.
- Pool: prefork with one process (`-c 1`) and `worker_max_tasks_per_child=1`, in production and embedded mode
  alike. Every job gets a fresh child process, which returns its memory and CUDA context to the system; a job
  that crashes its process takes only that child down; the parent never touches CUDA, so forking stays safe.
  Scale out with more worker processes (one per GPU), not with `-c`. The pool is Celery's prefork pool, which
  replaces the exited process at once (worker/prefork.py), so the next job starts at once; the parent imports what a
  job needs before it forks (worker/preload.py), so a job's process starts warm.
- Queues: `cpu` and `gpu` carry `run_job` (sent explicitly by `send_run_job`); Celery's default queue `celery` carries
  `submit_job`, `submit_study` and `reap`, so another service can submit with a bare `send_task`. Every worker
  consumes `celery` besides its -Q queues (default `cpu`); GPU workers run with `-Q gpu` (or `cpu,gpu`). A submission
  waits while a worker's only process trains, so keep one worker free or run a small `-Q celery` worker for
  submissions.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu import Queue
from kombu.utils.url import maybe_sanitize_url

from core.config import Settings
from core.db import Database
from core.dispatch import Send

log = logging.getLogger(__name__)

SUBMIT_QUEUE = "celery"  # Celery's default queue: what a bare send_task from another service publishes to
RUN_TASK, SUBMIT_TASK, REAP_TASK = "trickserve.run_job", "trickserve.submit_job", "trickserve.reap"
SUBMIT_STUDY_TASK = "trickserve.submit_study"
# kombu looks for messages past their visibility timeout every interval x throttle seconds (10 x 10 by default).
RESTORE_SWEEP_S = 100
FILESYSTEM_POLL_S = 0.1  # the filesystem broker polls its folder; its default (1 s) adds a second per message
CONNECT_TIMEOUT_S = 1.0
WORKER_LOST_WAIT_S = 1.0
SOCKET_TIMEOUT_S = 5.0  # above kombu's 1 s BRPOP wait, so that an idle worker's poll never times out
# Publishing gives up within a few seconds: the API must answer, and the outbox sends the job later anyway.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.25, "interval_max": 0.5}


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached; the job stays queued in the database and the reaper sends it later."""


def transport_options(settings: Settings) -> dict[str, Any]:
    """broker_transport_options for the configured broker (folders of the filesystem broker exist afterwards)."""
    if settings.broker_url.startswith("filesystem://"):
        options = {
            **settings.broker_transport_options,
            "control_folder": str(settings.broker_dir / "control"),  # its default is relative to the cwd
            "polling_interval": FILESYSTEM_POLL_S,
        }
        for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            Path(options[key]).mkdir(parents=True, exist_ok=True)
        return options
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Both timeouts: a Redis that accepts connections but never answers would otherwise hang a publisher.
        options: dict[str, Any] = {
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": SOCKET_TIMEOUT_S,
        }
        if settings.broker_visibility_timeout_s < RESTORE_SWEEP_S:
            # A timeout shorter than kombu's sweep would only take effect at the next sweep: sweep more often.
            options["unacked_restore_interval"] = max(1, int(settings.broker_visibility_timeout_s // 4))
            options["unacked_restore_throttle"] = 1
        return options
    return {}


class WorkerApp(Celery):
    """The Celery app, with what its tasks need: the settings it was built from and their database."""

    settings: Settings

    @functools.cached_property
    def db(self) -> Database:
        # Built on first use: a process that only publishes (the API) never opens the database through it.
        return Database.from_settings(self.settings)

    def send_run_job(self, job_id: str, queue: str) -> None:
        """Publish one `run_job` message; raises BrokerUnavailable after a few seconds without a broker."""
        try:
            self.send_task(RUN_TASK, args=[job_id], queue=queue)
        except Exception as exc:  # kombu raises OperationalError, redis and OS errors alike for an absent broker
            url = maybe_sanitize_url(self.conf.broker_url)
            raise BrokerUnavailable(f"cannot send job {job_id} to the broker at {url}: {exc}") from exc


def create_app(settings: Settings) -> WorkerApp:
    """A Celery app configured from `settings`."""
    # Tasks are imported by the worker only: a process that just publishes (the API) does not load the engine.
    app = WorkerApp("trickserve", set_as_current=False, include=["worker.tasks"])
    app.settings = settings
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        # Celery reads it here as well as in the transport options.
        visibility_timeout=settings.broker_visibility_timeout_s,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY,
        task_default_queue=SUBMIT_QUEUE,
        task_queues=[Queue(SUBMIT_QUEUE), Queue("cpu")],  # what a worker consumes without -Q
        task_routes={RUN_TASK: {"queue": "cpu"}},
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="worker.prefork:TaskPool",  # prefork, replacing a job's process as soon as it has exited
        worker_max_tasks_per_child=1,
        # After a pool process dies (OOM killer, segfault) the worker waits this long for a result it might have
        # sent before reporting WorkerLostError, and takes no job meanwhile (default 10 s). Results are ignored and
        # the message is acked either way; the job's fate is in the database.
        worker_lost_wait=WORKER_LOST_WAIT_S,
        # With acks_late a connection blip would otherwise make Celery cancel the running training job; the
        # redelivered message is dropped by the claim instead, and the job keeps running.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def publisher(settings: Settings) -> Send:
    """How a process that only submits (the API) sends a stored job to the workers."""
    return create_app(settings).send_run_job


def connect_worker_signals(app: WorkerApp) -> None:
    """Hooks of a worker process running `app` (its entry point, worker/main.py, calls this once)."""

    @signals.celeryd_after_setup.connect(weak=False)
    def _always_consume_submissions(instance: Any, **_: Any) -> None:
        # Whatever -Q says (`-Q gpu`, `-Q cpu,gpu`), every worker also takes submissions: a bare send_task from
        # another service must find a consumer.
        instance.app.amqp.queues.select_add(SUBMIT_QUEUE)

    @signals.worker_process_init.connect(weak=False)
    def _forget_parent_connections(**_: Any) -> None:
        # A forked child must not use the database connections of its parent (two processes on one socket);
        # close=False leaves them open for the parent and gives the child a fresh pool.
        if "db" in app.__dict__:
            app.db.dispose(close=False)
