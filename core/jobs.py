"""The only code that changes job state: create, dispatch, claim, heartbeat, record events (and their metric
points), checkpoint, finish, cancel and reap; plus the read helpers the API and the worker share. Every write
function commits."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import committing, insert_ignoring_duplicates
from core.engine.events import METRIC_KINDS, ONE_PER_STEP_KINDS, EventKind
from core.metrics import points_of
from core.models import (
    TERMINAL,
    Artifact,
    ArtifactKind,
    FailureClass,
    Job,
    JobEvent,
    JobStatus,
    JobTransition,
    MetricPoint,
    new_id,
    utcnow,
)
from core.spec import JobSpec

# The legal moves. `cancelling` never returns to `queued`: a job whose cancel was asked for never runs again;
# if it ends before it sees the flag it keeps its true outcome (succeeded, early_stopped or failed).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset(map(JobStatus, ["running", "cancelled", "failed"])),
    JobStatus.running: frozenset(
        map(JobStatus, ["succeeded", "early_stopped", "failed", "cancelling", "cancelled", "queued", "pruned"])
    ),
    JobStatus.cancelling: frozenset(map(JobStatus, ["cancelled", "failed", "succeeded", "early_stopped", "pruned"])),
    **{status: frozenset() for status in TERMINAL},
}


class TrialHooks:
    """What a study's trial sets off in the transaction that changes it: core.studies, which builds on this module,
    installs both when it is imported (every process that makes trials imports it)."""

    def moved(self, session: Session, job: Job, to: JobStatus) -> None:
        """A trial changed status."""
        raise RuntimeError(f"job {job.job_id} is a study's trial, but core.studies is not loaded")

    def reported(self, session: Session, job: Job, step: int) -> Any:
        """A trial reported an epoch, at `step`: the pruner's decision when it is to stop, else None."""
        raise RuntimeError(f"job {job.job_id} is a study's trial, but core.studies is not loaded")


TRIAL_HOOKS = TrialHooks()


class JobError(Exception):
    """Base of the errors below."""


class JobNotFound(JobError, LookupError):
    """No such job for this tenant."""


class IllegalTransition(JobError):
    def __init__(self, job_id: str, from_status: JobStatus, to_status: JobStatus):
        super().__init__(f"job {job_id}: {from_status} -> {to_status} is not a legal transition")
        self.job_id, self.from_status, self.to_status = job_id, from_status, to_status


class IdempotencyConflict(JobError):
    def __init__(self, key: str, job_id: str):
        super().__init__(f"idempotency key {key!r} was used for job {job_id} with a different request")
        self.key, self.job_id = key, job_id


class InvalidCursor(JobError, ValueError):
    """A page cursor this module did not make."""


@dataclass(frozen=True)
class Claim:
    """What a worker holds after claiming a job; `attempt` is the fencing token for every later write."""

    job_id: str
    attempt: int
    spec: dict[str, Any]
    checkpoint_key: str | None  # resume from the checkpoint stored here when set
    checkpoint_step: int | None
    lease_expires_at: datetime


@dataclass(frozen=True)
class HeartbeatResult:
    alive: bool  # False: the lease is lost (another attempt may run); stop at once and write nothing more
    cancel_requested: bool


# ------------------------------------------------------------------------------------- submit, dispatch


def create_job(
    *,
    session: Session,
    tenant_id: str,
    spec: JobSpec,
    advice: list[dict[str, Any]],
    idempotency_key: str | None = None,
    queue: str = "cpu",
) -> Job:
    """Store a new queued job. The same idempotency key with the same request returns the first job instead;
    with a different request it raises IdempotencyConflict."""
    request_hash = _request_hash(spec.model_dump(mode="json"), queue)
    try:
        with committing(session):
            job = _replay(session, tenant_id, idempotency_key, request_hash)
            if job is None:
                job = _insert_job(session, tenant_id, spec, advice, queue, idempotency_key, request_hash)
    except IntegrityError:
        # A concurrent request with the same key inserted first (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises).
        with committing(session):
            job = _replay(session, tenant_id, idempotency_key, request_hash)
        if job is None:
            raise
    return job


def _insert_job(
    session: Session,
    tenant_id: str,
    spec: JobSpec,
    advice: list[dict[str, Any]],
    queue: str,
    idempotency_key: str | None,
    request_hash: str | None,
    reason: str = "submitted",
    **columns: Any,
) -> Job:
    job = Job(
        job_id=new_id("job_"),
        tenant_id=tenant_id,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        advice=advice,
        queue=queue,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        max_attempts=spec.resources.max_attempts,
        status=JobStatus.queued,
        **columns,
    )
    session.add(job)
    session.flush()  # the row exists before its transition refers to it
    _record_transition(session, job, None, JobStatus.queued, reason, job.created_at)
    return job


def insert_trial(
    session: Session,
    *,
    tenant_id: str,
    study_id: str,
    number: int,
    point: int,
    seed: int,
    params: dict[str, Any],
    spec: JobSpec,
    advice: list[dict[str, Any]],
    queue: str,
) -> Job:
    """Add a study's trial as a queued job, in the caller's transaction (core.studies, under the study's lock)."""
    return _insert_job(
        session, tenant_id, spec, advice, queue, None, None, f"trial {number} of study {study_id}",
        study_id=study_id, trial_number=number, trial_point=point, trial_seed=seed, params=params,
    )  # fmt: skip


def fail_unstarted(session: Session, job: Job, message: str) -> None:
    """Fail a queued job whose spec cannot run, in the caller's transaction (a study's trial whose sampled values
    the spec refuses)."""
    _fail(session, job, FailureClass.invalid_spec, message, utcnow())


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities spelled as strings, as the JSON columns store them."""
    return _json_safe(value)


def undispatched_trials(session: Session, study_id: str) -> list[Job]:
    """A study's queued trials not yet sent to the broker, in trial order."""
    query = select(Job).where(Job.study_id == study_id, Job.status == JobStatus.queued, Job.dispatched_at.is_(None))
    return list(session.scalars(query.order_by(Job.trial_number).execution_options(populate_existing=True)))


def mark_dispatched(*, session: Session, job_ids: str | Iterable[str], now: datetime | None = None) -> None:
    """Record that these queued jobs were sent to the broker (the outbox's "sent" mark)."""
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    with committing(session):
        session.execute(
            update(Job)
            .where(Job.job_id.in_(ids), Job.status == JobStatus.queued)
            .values(dispatched_at=now or utcnow())
            .execution_options(synchronize_session=False)
        )


def undispatched_jobs(
    session: Session, *, limit: int = 100, redispatch_after_s: float | None = None, now: datetime | None = None
) -> list[Job]:
    """Queued jobs to send to the broker, oldest first: never sent, or (with `redispatch_after_s`) sent that long
    ago and still unclaimed, in case the message was lost. A duplicate message is harmless: claims are CAS."""
    pending: ColumnElement[bool] = Job.dispatched_at.is_(None)
    if redispatch_after_s is not None:
        pending = or_(pending, Job.dispatched_at < (now or utcnow()) - timedelta(seconds=redispatch_after_s))
    query = select(Job).where(Job.status == JobStatus.queued, pending).order_by(Job.created_at).limit(limit)
    return list(session.scalars(query.execution_options(populate_existing=True)))


# ------------------------------------------------------------------------------------ worker, fenced


def claim_job(*, session: Session, job_id: str, worker_id: str, lease_s: float) -> Claim | None:
    """Start the next attempt of a queued job; None when it is not there to take (claimed by another worker,
    finished, or cancelled: a queued job with a cancel request becomes cancelled here)."""
    now = utcnow()
    with committing(session):
        job = _locked(session, job_id)
        if job is None or job.status != JobStatus.queued:
            return None
        if job.cancel_requested:
            _transition(session, job, JobStatus.cancelled, reason="cancel requested before start", now=now)
            return None
        if job.attempt >= job.max_attempts:
            _fail(session, job, FailureClass.worker_lost, f"no attempt left of {job.max_attempts}", now)
            return None
        job.attempt += 1
        _supersede_for_resume(session, job)
        resume = "" if job.checkpoint_step is None else f", resuming from step {job.checkpoint_step}"
        _transition(session, job, JobStatus.running, reason=f"claimed by {worker_id}{resume}", now=now)
        job.lease_owner, job.lease_expires_at, job.heartbeat_at = worker_id, now + timedelta(seconds=lease_s), now
        job.started_at = job.started_at or now
        return Claim(job.job_id, job.attempt, job.spec, job.checkpoint_key, job.checkpoint_step, job.lease_expires_at)


def heartbeat(*, session: Session, job_id: str, attempt: int, lease_s: float) -> HeartbeatResult:
    """Renew the lease of the attempt that holds the job, and tell it whether a cancel was asked for."""
    now = utcnow()
    with committing(session):
        job = _fenced(session, job_id, attempt)
        if job is None:
            return HeartbeatResult(alive=False, cancel_requested=False)
        job.heartbeat_at, job.lease_expires_at = now, now + timedelta(seconds=lease_s)
        return HeartbeatResult(alive=True, cancel_requested=job.cancel_requested)


def record_events(
    *, session: Session, job_id: str, attempt: int, events: Sequence[Any], prune: list[Any] | None = None
) -> bool:
    """Store a batch of engine events (core.engine.callbacks.Event or dicts with the same keys) of the attempt
    that holds the job, and the metric points of its epoch_end and test events; False, storing nothing, when that
    attempt was fenced out. Replayed metrics are ignored. A study's trial that reports an epoch gets its pruner's
    decision in the same transaction: when the trial is to stop, the decision (core.pruning.Decision) is appended
    to `prune` and a `pruned` event is stored."""
    with committing(session):
        job = _fenced(session, job_id, attempt)
        if job is None:
            return False
        rows = [_event_row(job_id, attempt, event) for event in events]
        if rows and attempt > 1:
            _supersede_replayed(session, job_id, attempt, rows)
        if rows:
            _insert_events(session, rows)
        epochs = [row["step"] for row in rows if row["kind"] == EventKind.epoch_end]
        if job.study_id is not None and epochs:
            decision = TRIAL_HOOKS.reported(session, job, max(epochs))
            if decision is not None and prune is not None:
                prune.append(decision)
    return True


def set_checkpoint(
    *, session: Session, job_id: str, attempt: int, key: str, step: int, size_bytes: int | None = None
) -> bool:
    """Point the job at a checkpoint its current attempt has stored (whole) under `key`; a retry resumes from it."""
    with committing(session):
        job = _fenced(session, job_id, attempt)
        if job is None:
            return False
        job.checkpoint_key, job.checkpoint_step = key, step
        _put_artifact(session, job, ArtifactKind.checkpoint, key, size_bytes)
    return True


def record_artifact(
    *, session: Session, job_id: str, attempt: int, kind: ArtifactKind | str, key: str, size_bytes: int | None = None
) -> bool:
    """Register a file the current attempt stored (e.g. the resolved spec next to the model)."""
    with committing(session):
        job = _fenced(session, job_id, attempt)
        if job is None:
            return False
        _put_artifact(session, job, ArtifactKind(kind), key, size_bytes)
    return True


def finish_job(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    status: JobStatus | str,
    stop_reason: str | None = None,
    failure_class: FailureClass | str | None = None,
    failure_message: str | None = None,
    final_metrics: dict[str, Any] | None = None,
    best_metrics: dict[str, Any] | None = None,
    model_key: str | None = None,
    model_bytes: int | None = None,
) -> bool:
    """End the job with a terminal status, if `attempt` still holds it; False (nothing changed) otherwise."""
    status = JobStatus(status)
    if status not in TERMINAL:
        raise ValueError(f"finish_job needs a terminal status, not {status}")
    if failure_class is not None and status != JobStatus.failed:
        raise ValueError("failure_class is only for status failed")
    with committing(session):
        job = _fenced(session, job_id, attempt)
        if job is None:
            return False
        _transition(session, job, status, reason=failure_message or stop_reason or str(status), now=utcnow())
        job.stop_reason = stop_reason
        if status == JobStatus.failed:
            job.failure_class, job.failure_message = FailureClass(failure_class or "internal"), failure_message
        if final_metrics is not None:
            job.final_metrics = _json_safe(final_metrics)
        if best_metrics is not None:
            job.best_metrics = _json_safe(best_metrics)
        if model_key is not None:
            job.model_key = model_key
            _put_artifact(session, job, ArtifactKind.model, model_key, model_bytes)
    return True


def fail_held_attempt(
    *, session: Session, job_id: str, held_by: str, failure_class: FailureClass | str, message: str
) -> bool:
    """Fail the attempt whose lease owner starts with `held_by` (e.g. `host/` of a worker whose process died),
    from outside that attempt; False, changing nothing, when no such attempt holds the job any more (it finished,
    or was re-queued or claimed by another worker)."""
    with committing(session):
        job = _locked(session, job_id)
        if job is None or not job.status.holds_lease or not (job.lease_owner or "").startswith(held_by):
            return False
        _fail(session, job, FailureClass(failure_class), message, utcnow())
    return True


# ------------------------------------------------------------------------------------- cancel, reaper


def request_cancel(*, session: Session, job_id: str, tenant_id: str) -> Job:
    """Ask a job to stop; idempotent. Queued: cancelled at once. Running: `cancelling`, and the worker sees the
    flag at its next heartbeat. Cancelling or finished: unchanged. Raises JobNotFound."""
    with committing(session):
        job = _locked(session, job_id)
        if job is None or job.tenant_id != tenant_id:
            raise JobNotFound(job_id)
        if job.status == JobStatus.queued:
            job.cancel_requested = True
            _transition(session, job, JobStatus.cancelled, reason="cancelled before start", now=utcnow())
        elif job.status == JobStatus.running:
            job.cancel_requested = True
            _transition(session, job, JobStatus.cancelling, reason="cancel requested", now=utcnow())
    return job


def requeue_expired(*, session: Session, now: datetime | None = None) -> list[str]:
    """The reaper: settle every active job whose lease expired. Running ones go back to the queue while attempts
    remain (else failed/worker_lost); cancelling ones become cancelled. Returns the ids put back in the queue."""
    now = now or utcnow()
    expired = or_(Job.lease_expires_at < now, Job.lease_expires_at.is_(None))
    requeued = []
    with committing(session):
        leased = select(Job.job_id).where(Job.status.in_(JobStatus.leased()), expired)
        candidates = session.scalars(leased.order_by(Job.job_id))
        for job_id in list(candidates):
            # SKIP LOCKED (PostgreSQL): a row some transaction holds is left to the next sweep. Waiting for it would
            # let one frozen process (paused inside a transaction) stall the sweep of every job, in every worker.
            job = _locked(session, job_id, skip_locked=True)
            # Checked again under the lock: a heartbeat may have renewed the lease since the SELECT.
            if job is not None and job.status.holds_lease and _lease_expired(job, now):
                if _settle_expired(session, job, now):
                    requeued.append(job.job_id)
    return requeued


def _settle_expired(session: Session, job: Job, now: datetime) -> bool:
    if job.status == JobStatus.cancelling:
        _transition(session, job, JobStatus.cancelled, reason="lease expired while cancelling", now=now)
        return False
    if job.attempt >= job.max_attempts:
        message = f"lease expired on attempt {job.attempt} of {job.max_attempts}"
        _fail(session, job, FailureClass.worker_lost, message, now)
        return False
    _transition(session, job, JobStatus.queued, reason="lease expired", now=now)
    job.lease_owner = job.lease_expires_at = job.dispatched_at = None  # the outbox sends it again
    return True


def _lease_expired(job: Job, now: datetime) -> bool:
    return job.lease_expires_at is None or job.lease_expires_at < now


# -------------------------------------------------------------------------------------------- reads
# Reads run in the caller's session; on SQLite give them a read-only one (Database.session(read_only=True)), so
# that a reader never holds the write lock.


# Built once: most requests read one job, and building a statement costs more than running it on the primary key.
_TENANT_JOB = (
    select(Job)
    .where(Job.job_id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
    .execution_options(populate_existing=True)
)


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    """The tenant's job, or None, also when it belongs to another tenant (callers answer 404 either way)."""
    return session.scalar(_TENANT_JOB, {"job_id": job_id, "tenant_id": tenant_id})


_job = Job.__table__.c  # a Core statement: no ORM work on each execution
_TENANT_JOB_ID = select(_job.job_id).where(_job.job_id == bindparam("job_id"), _job.tenant_id == bindparam("tenant_id"))


def check_job(session: Session, tenant_id: str, job_id: str) -> None:
    """Raise JobNotFound unless the job is the tenant's; reads its id only, for reads that need nothing else of it."""
    if session.scalar(_TENANT_JOB_ID, {"job_id": job_id, "tenant_id": tenant_id}) is None:
        raise JobNotFound(job_id)


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    status: JobStatus | str | Sequence[JobStatus | str] | None = None,
    name: str | None = None,
    study_id: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[Job], str | None]:
    """One page of the tenant's jobs, newest first, filtered before the limit; returns (jobs, next cursor or
    None on the last page)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        statuses = [status] if isinstance(status, str) else status
        query = query.where(Job.status.in_([JobStatus(s) for s in statuses]))
    if name is not None:
        query = query.where(Job.name == name)
    if study_id is not None:
        query = query.where(Job.study_id == study_id)
    if cursor is not None:
        created_at, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.job_id < job_id)))
    query = query.order_by(Job.created_at.desc(), Job.job_id.desc()).limit(limit + 1)
    jobs = list(session.scalars(query.execution_options(populate_existing=True)))
    if len(jobs) <= limit:
        return jobs, None
    return jobs[:limit], encode_cursor(jobs[limit - 1].created_at, jobs[limit - 1].job_id)


def list_events(
    session: Session, job_id: str, *, after: int = 0, kinds: Sequence[str] | None = None, limit: int = 1000
) -> list[JobEvent]:
    """The job's events with job_event_id > `after`, oldest first. The caller has checked that the job is the
    tenant's. (Metric points are read from core.metrics.)"""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.job_event_id > after)
    if kinds:
        query = query.where(JobEvent.kind.in_(kinds))
    return list(session.scalars(query.order_by(JobEvent.job_event_id).limit(limit)))


def list_transitions(session: Session, job_id: str) -> list[JobTransition]:
    """The job's lifecycle log, oldest first."""
    query = select(JobTransition).where(JobTransition.job_id == job_id).order_by(JobTransition.job_transition_id)
    return list(session.scalars(query))


def check_transition(job_id: str, from_status: JobStatus, to_status: JobStatus) -> None:
    """Raise IllegalTransition unless TRANSITIONS allows the move."""
    if to_status not in TRANSITIONS[from_status]:
        raise IllegalTransition(job_id, from_status, to_status)


# ------------------------------------------------------------------------------------------ helpers


def _locked(session: Session, job_id: str, *, skip_locked: bool = False) -> Job | None:
    # FOR UPDATE serialises the writers of one job on PostgreSQL (SQLite's BEGIN IMMEDIATE serialises all
    # writers); it also makes one job's event ids commit in increasing order, so a cursor never skips one.
    # skip_locked: None instead of waiting when another transaction holds the row.
    lock = {"skip_locked": True} if skip_locked else True
    return session.get(Job, job_id, with_for_update=lock, populate_existing=True)


def _fenced(session: Session, job_id: str, attempt: int) -> Job | None:
    """The locked job if `attempt` still holds it, else None."""
    job = _locked(session, job_id)
    if job is None or job.attempt != attempt or not job.status.holds_lease:
        return None
    return job


def _transition(session: Session, job: Job, to: JobStatus, *, reason: str, now: datetime) -> None:
    check_transition(job.job_id, job.status, to)
    _record_transition(session, job, job.status, to, reason, now)
    job.status = to
    if to in TERMINAL:
        job.finished_at, job.lease_expires_at = now, None
    if job.study_id is not None:
        TRIAL_HOOKS.moved(session, job, to)


def _record_transition(
    session: Session, job: Job, from_status: JobStatus | None, to: JobStatus, reason: str, now: datetime
) -> None:
    session.add(
        JobTransition(
            job_id=job.job_id, from_status=from_status, to_status=to, at=now, reason=reason, attempt=job.attempt
        )
    )
    # Also an event, so that one cursor (the SSE id) orders status changes among the metrics.
    data = {"from": from_status and str(from_status), "to": str(to), "reason": reason}
    session.add(
        JobEvent(
            job_id=job.job_id,
            attempt=job.attempt,
            kind=EventKind.status,
            step=job.checkpoint_step or 0,
            epoch=0,
            data=data,
            created_at=now,
        )
    )


def _fail(session: Session, job: Job, failure_class: FailureClass, message: str, now: datetime) -> None:
    _transition(session, job, JobStatus.failed, reason=message, now=now)
    job.failure_class, job.failure_message = failure_class, message


def _supersede_for_resume(session: Session, job: Job) -> None:
    # The new attempt resumes after the checkpoint (or from scratch): what earlier attempts recorded after it
    # will be recorded again, so it goes now and polling keeps one point per (name, step).
    if job.attempt > 1:
        resumed_from = -1 if job.checkpoint_step is None else job.checkpoint_step
        _delete_older_events(session, job.job_id, job.attempt, resumed_from, JobEvent.kind != EventKind.status)


def _supersede_replayed(session: Session, job_id: str, attempt: int, rows: list[dict[str, Any]]) -> None:
    # Covers an attempt that could not load its checkpoint and restarted earlier than the pointer said.
    steps = [row["step"] for row in rows if row["kind"] in ONE_PER_STEP_KINDS]
    if steps:
        _delete_older_events(session, job_id, attempt, min(steps) - 1, JobEvent.kind.in_(ONE_PER_STEP_KINDS))


def _delete_older_events(
    session: Session, job_id: str, attempt: int, after_step: int, kinds: ColumnElement[bool]
) -> None:
    session.execute(
        delete(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.attempt < attempt, JobEvent.step > after_step, kinds)
        .execution_options(synchronize_session=False)
    )
    # Their metric points go with them: every point comes from an event of a kind both callers delete.
    session.execute(
        delete(MetricPoint)
        .where(MetricPoint.job_id == job_id, MetricPoint.attempt < attempt, MetricPoint.step > after_step)
        .execution_options(synchronize_session=False)
    )


def _insert_events(session: Session, rows: list[dict[str, Any]]) -> None:
    """The events, and the metric points of those stored now: a replayed batch's events are ignored (one per
    attempt, kind and step; the first of the batch wins), and so are their points."""
    insert = insert_ignoring_duplicates(session, JobEvent)
    stored = session.execute(insert.returning(JobEvent.job_event_id, JobEvent.kind, JobEvent.step), rows)
    ids = {(kind, step): event_id for event_id, kind, step in stored if kind in METRIC_KINDS}
    points = [
        point
        for row in rows
        if (event_id := ids.pop((row["kind"], row["step"]), None)) is not None
        for point in points_of(row, event_id)
    ]
    if points:
        session.execute(insert_ignoring_duplicates(session, MetricPoint), points)


def _event_row(job_id: str, attempt: int, event: Any) -> dict[str, Any]:
    get: Callable[..., Any] = event.get if isinstance(event, Mapping) else functools.partial(getattr, event)
    at = get("at", None)
    return {
        "job_id": job_id,
        "attempt": attempt,
        "kind": str(get("kind")),
        "step": int(get("step")),
        "epoch": int(get("epoch", 0)),
        "data": _json_safe(get("data", None) or {}),
        "created_at": datetime.fromtimestamp(at, UTC) if at is not None else utcnow(),
    }


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities spelled as strings: PostgreSQL's json and strict JSON clients reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _put_artifact(session: Session, job: Job, kind: ArtifactKind, key: str, size_bytes: int | None) -> None:
    # One row per object: a checkpoint slot stored again updates its row.
    query = select(Artifact).where(Artifact.job_id == job.job_id, Artifact.kind == kind, Artifact.key == key)
    artifact = session.scalar(query)
    if artifact is None:
        session.add(Artifact(job_id=job.job_id, attempt=job.attempt, kind=kind, key=key, size_bytes=size_bytes))
    else:
        artifact.attempt, artifact.size_bytes, artifact.created_at = job.attempt, size_bytes, utcnow()


def _request_hash(spec_json: dict[str, Any], queue: str) -> str:
    canonical = json.dumps({"spec": spec_json, "queue": queue}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(session: Session, tenant_id: str, key: str | None, request_hash: str) -> Job | None:
    """The job an earlier request with this idempotency key created, if any."""
    if key is None:
        return None
    query = select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    job = session.scalar(query.execution_options(populate_existing=True))
    if job is not None and job.request_hash != request_hash:
        raise IdempotencyConflict(key, job.job_id)
    return job


def encode_cursor(created_at: datetime, key: str) -> str:
    """An opaque page cursor for lists ordered by (created_at, id), newest first."""
    raw = json.dumps([created_at.isoformat(), key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) of an `encode_cursor` value; InvalidCursor for anything else."""
    try:
        created_at, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(created_at)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidCursor("invalid cursor") from exc
    if at.tzinfo is None or not isinstance(key, str) or "\x00" in key:  # PostgreSQL text cannot hold NUL
        raise InvalidCursor("invalid cursor")
    return at, key
