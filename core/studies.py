"""Studies: create one with its first trials, follow its trials as they start and end, prune them, sample the next
ones, cancel, and read it all back; the only code that changes a study's state.

There is no study process. Each decision runs in the database transaction of the event that prompts it: a trial's
epoch report (pruning), a trial's end and the reaper's sweep (the next trials, the study's end). The next trials
are made under the study's row lock and numbered from its counter, and (study_id, trial_number) is unique, so any
API, worker or reaper process may die at any moment without a trial lost or made twice; a trial ends once, by a
compare-and-set of its status, so it is never pruned twice. Samplers and pruners are Optuna's, run on an in-memory
study rebuilt from these tables at each decision (core.sampling, core.pruning); what a pruner remembers about a
trial is kept in the trial's row.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import jobs
from core.db import committing
from core.engine.events import EventKind
from core.models import Job, JobEvent, JobStatus, MetricPoint, Study, StudyEvent, StudyStatus, StudyTransition, new_id
from core.models import utcnow as _utcnow
from core.pruning import Decision, PrunerSpec, TrialRecord, decide
from core.sampling import PointRecord, next_point
from core.spec import JobSpec, spec_errors
from core.studyspec import StudySpec, blame, probe_points, trial_spec
from core.submit import (
    Caps,
    InvalidSpec,
    SubmitError,
    check_caps,
    check_memory,
    check_references,
    parse_spec,
    queue_for,
)
from core.verdict import TrialResult, verdict

TRANSITIONS: dict[StudyStatus, frozenset[StudyStatus]] = {
    StudyStatus.queued: frozenset(map(StudyStatus, ["running", "succeeded", "failed", "cancelled"])),
    StudyStatus.running: frozenset(map(StudyStatus, ["succeeded", "failed", "cancelled"])),
    **{status: frozenset() for status in StudyStatus if status.is_terminal},
}
FINISHED_TRIAL = (JobStatus.succeeded, JobStatus.early_stopped)  # trials whose objective counts
# Session.info keys: the tenant's cap on active jobs, for the next trials made inside another module's transaction
# (the caller that knows the settings sets it), and the mark of a study being advanced.
MAX_ACTIVE_JOBS, ADVANCING = "trickserve.max_active_jobs", "trickserve.advancing"


class StudyNotFound(LookupError):
    """No such study for this tenant."""


class TooManyTrials(SubmitError):
    code = "too_many_trials"


class StudyIdempotencyConflict(SubmitError):
    code = "idempotency_key_reused"

    def __init__(self, key: str, study_id: str):
        super().__init__(f"idempotency key {key!r} was used for study {study_id} with another body")


@dataclass(frozen=True)
class CreatedStudy:
    """A stored study; `created` is False when an earlier request with the same key made it. `trials` are the jobs
    this call created, for the caller to send to the broker after the commit."""

    study: Study
    created: bool
    trials: list[Job]


# ------------------------------------------------------------------------------------------ validation


def parse_study(raw: dict[str, Any]) -> StudySpec:
    """The study spec, or InvalidSpec listing every problem with its path."""
    from pydantic import ValidationError

    try:
        return StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidSpec(spec_errors(exc)) from None


def check_study(
    session: Session, tenant_id: str, spec: StudySpec, caps: Caps, max_trials: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resolve the base and every trial spec the study may run (the whole grid, or each value a sampled path can
    take), validated and checked like a job's. Returns the resolved base and the advice; raises InvalidSpec naming
    the study path, the value and the reason, or TooManyTrials."""
    if spec.trials > max_trials:
        message = f"{spec.points} points x {len(spec.seeds)} seeds = {spec.trials} trials; at most {max_trials}"
        raise TooManyTrials(message)
    try:
        base = parse_spec(spec.base)
        check_caps(base, caps)
        check_references(session, tenant_id, base)
    except InvalidSpec as exc:
        raise InvalidSpec([{**e, "path": f"base.{e['path']}"} for e in exc.errors]) from None
    resolved = base.model_dump(mode="json")
    problems: dict[str, dict[str, Any]] = {}
    for params in probe_points(spec):
        for error in _trial_problems(session, tenant_id, resolved, params, spec, caps):
            problems.setdefault(error["path"], error)
    if problems:
        raise InvalidSpec(list(problems.values()))
    return resolved, [*_space_advice(base, resolved, spec), *study_advice(spec)]


def _space_advice(base: JobSpec, resolved: dict[str, Any], spec: StudySpec) -> list[dict[str, Any]]:
    """The base's advice, and what some values of the space depart from (zero init, Xavier with ReLU...), each
    named by the study path and the values that bring it: a study may well include a bad value on purpose, to show
    that it is bad."""
    from core.engine.advice import advise  # the engine imports torch: only when a study is really submitted

    found = {a.code: {**asdict(a), "path": f"base.{a.path}"} for a in advise(base)}
    brought: dict[str, dict[str, Any]] = {}
    for params in probe_points(spec):
        job = parse_spec(trial_spec(resolved, params, spec.seeds[0], spec.seed_paths))
        for a in advise(job):
            if a.code in found:
                continue
            path = blame(a.path, params, spec.seed_paths)
            value = params.get(path.removeprefix("space."))
            entry = brought.setdefault(a.code, {**asdict(a), "path": path, "values": []})
            if value not in entry["values"]:
                entry["values"].append(value)
    for entry in brought.values():
        values = ", ".join(json.dumps(v) for v in entry.pop("values"))
        entry["message"] = f"with {entry['path'].removeprefix('space.')} = {values}: {entry['message']}"
    return [*found.values(), *brought.values()]


def _trial_problems(
    session: Session, tenant_id: str, base: dict[str, Any], params: dict[str, Any], spec: StudySpec, caps: Caps
) -> list[dict[str, Any]]:
    raw = trial_spec(base, params, spec.seeds[0], spec.seed_paths)
    try:
        job = parse_spec(raw)
        check_caps(job, caps)
        check_memory(session, tenant_id, job, caps.max_job_memory_mb)
    except InvalidSpec as exc:
        found = []
        for error in exc.errors:
            path = blame(error["path"], params, spec.seed_paths)
            if path == "base.(root)":  # a rule across fields, broken by this point's values together
                path = "space"
            value = params.get(path.removeprefix("space."), params if path == "space" else None)
            found.append({"path": path, "message": f"{json.dumps(value)}: {error['message']}", "type": error["type"]})
        return found
    return []


def study_advice(spec: StudySpec) -> list[dict[str, Any]]:
    """What the article's good practices say about the study itself."""
    advice = []
    if spec.objective.metric.startswith("test/"):
        advice.append({
            "code": "objective_on_test_set",
            "severity": "warning",
            "path": "objective.metric",
            "message": "choosing among trials by a test metric makes the test set part of training: the best "
            "trial's test score is then optimistic. Choose on a val/ metric and report the test metric of the "
            "chosen trial",
        })  # fmt: skip
    if len(spec.seeds) < 2:
        advice.append({
            "code": "one_seed",
            "severity": "info",
            "path": "seeds",
            "message": "with one seed per point there are no intervals: a difference between values may be the "
            "seed's. Use 3 or more seeds to tell",
        })  # fmt: skip
    return advice


# ---------------------------------------------------------------------------------------------- create


def create_study(
    *,
    session: Session,
    tenant_id: str,
    spec: StudySpec,
    base: dict[str, Any],
    advice: list[dict[str, Any]],
    idempotency_key: str | None = None,
    max_active_jobs: int | None = None,
) -> CreatedStudy:
    """Store a checked study (check_study) and its first trials, committed. The same idempotency key with the same
    request returns the first study; with another request it raises StudyIdempotencyConflict."""
    stored = {**spec.model_dump(mode="json", by_alias=True), "base": base}
    request_hash = hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()
    try:
        with committing(session):
            existing = _replay(session, tenant_id, idempotency_key, request_hash)
            if existing is not None:
                return CreatedStudy(existing, False, [])
            study = Study(
                study_id=new_id("stu_"),
                tenant_id=tenant_id,
                name=spec.name,
                spec=stored,
                advice=advice,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                trials_planned=spec.trials,
                trials_created=0,
                status=StudyStatus.queued,
            )
            session.add(study)
            session.flush()
            _record(session, study, None, StudyStatus.queued, "submitted")
            trials = advance(session, study.study_id, max_active_jobs=max_active_jobs)
    except IntegrityError:
        with committing(session):
            existing = _replay(session, tenant_id, idempotency_key, request_hash)
        if existing is None:
            raise
        return CreatedStudy(existing, False, [])
    return CreatedStudy(study, True, trials)


def submit_study(
    *,
    session: Session,
    tenant_id: str,
    raw: dict[str, Any],
    caps: Caps,
    max_trials: int,
    idempotency_key: str | None = None,
    max_active_jobs: int | None = None,
) -> CreatedStudy:
    """Check a submitted study whole and store it with its first trials: the rules POST /v1/studies and the
    `trickserve.submit_study` task share. The caller sends `trials` after this returns. Raises InvalidSpec,
    TooManyTrials or StudyIdempotencyConflict."""
    spec = parse_study(raw)
    try:
        base, advice = check_study(session, tenant_id, spec, caps, max_trials)
    finally:
        session.rollback()  # end the reads: on SQLite the write session's transaction holds the lock
    return create_study(
        session=session,
        tenant_id=tenant_id,
        spec=spec,
        base=base,
        advice=advice,
        idempotency_key=idempotency_key,
        max_active_jobs=max_active_jobs,
    )


def _replay(session: Session, tenant_id: str, key: str | None, request_hash: str) -> Study | None:
    if key is None:
        return None
    query = select(Study).where(Study.tenant_id == tenant_id, Study.idempotency_key == key)
    study = session.scalar(query.execution_options(populate_existing=True))
    if study is not None and study.request_hash != request_hash:
        raise StudyIdempotencyConflict(key, study.study_id)
    return study


# ------------------------------------------------------------------------------------ the next trials


def advance(session: Session, study_id: str, *, max_active_jobs: int | None = None) -> list[Job]:
    """In the caller's transaction: make the study's next trials while it has room (max_concurrent trials queued or
    running, and the tenant's cap on active jobs: a study waits for room rather than fail), and end the study once
    every trial has ended. Returns the new trials (queued, not yet sent)."""
    study = _locked(session, study_id)
    if study is None or study.status.is_terminal:
        return []
    spec = StudySpec.model_validate(study.spec)
    trials = _trials(session, study_id)
    session.flush()  # a trial that just ended is seen as ended
    if max_active_jobs is None:
        max_active_jobs = session.info.get(MAX_ACTIVE_JOBS)
    active = sum(1 for t in trials if t.status.is_active)
    room = spec.max_concurrent - active
    if max_active_jobs is not None and room > 0:
        tenant_active = session.scalar(
            select(func.count()).where(Job.tenant_id == study.tenant_id, Job.status.in_(JobStatus.active()))
        )
        room = min(room, max_active_jobs - (tenant_active or 0))
    made: list[Job] = []
    while room > 0 and not study.cancel_requested and study.trials_created < study.trials_planned:
        number = study.trials_created
        point, seed_index = divmod(number, len(spec.seeds))
        params = _point_params(spec, trials, point) if seed_index else _sample(spec, trials)
        if params is None:  # the grid has no point left
            study.trials_planned = number
            break
        session.info[ADVANCING] = True  # a trial failed at birth must not advance the study again from within
        try:
            job = _make_trial(session, study, spec, number, point, spec.seeds[seed_index], params)
        finally:
            session.info.pop(ADVANCING, None)
        trials.append(job)
        made.append(job)
        study.trials_created += 1
        room -= 1
    _maybe_finish(session, study, trials)
    return made


def _point_params(spec: StudySpec, trials: list[Job], point: int) -> dict[str, Any]:
    first = next(t for t in trials if t.trial_point == point)
    return dict(first.params or {})


def _sample(spec: StudySpec, trials: list[Job]) -> dict[str, Any] | None:
    points: dict[int, list[Job]] = {}
    for trial in trials:
        points.setdefault(trial.trial_point or 0, []).append(trial)
    records = [_point_record(n, members, spec) for n, members in sorted(points.items())]
    space = {path: d.plain() for path, d in spec.space.items()}
    return next_point(spec.sampler, space, spec.objective.direction, records, seed=spec.sampler_seed)


def _point_record(number: int, members: list[Job], spec: StudySpec) -> PointRecord:
    params = dict(members[0].params or {})
    ended = len(members) == len(spec.seeds) and all(t.status.is_terminal for t in members)
    values = [v for t in members if (v := _stored_value(t)) is not None]
    if not ended:
        return PointRecord(number, params, "running", None)
    if values:
        return PointRecord(number, params, "complete", sum(values) / len(values))
    state = "pruned" if any(t.status == JobStatus.pruned for t in members) else "failed"
    return PointRecord(number, params, state, None)


def _stored_value(job: Job) -> float | None:
    # The objective a trial ended with is kept in its pruner_state by trial_moved (one read, not a series).
    value = (job.pruner_state or {}).get("objective") if job.status in FINISHED_TRIAL else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _make_trial(
    session: Session, study: Study, spec: StudySpec, number: int, point: int, seed: int, params: dict[str, Any]
) -> Job:
    raw = trial_spec(study.spec["base"], params, seed, spec.seed_paths)
    raw["name"] = f"{study.name} #{number}"[:120]
    problem = None
    try:
        job_spec = parse_spec(raw)
    except InvalidSpec as exc:  # a sampled value the checks could not foresee: the trial fails, the study goes on
        problem = str(exc)
        job_spec = JobSpec.model_validate(study.spec["base"])
    job = jobs.insert_trial(
        session,
        tenant_id=study.tenant_id,
        study_id=study.study_id,
        number=number,
        point=point,
        seed=seed,
        params=params,
        spec=job_spec,
        advice=[],
        queue=queue_for(job_spec),
    )
    _event(session, study, "trial_created", job, {"params": params, "seed": seed, "point": point})
    if problem is not None:
        jobs.fail_unstarted(session, job, problem)
    return job


def _maybe_finish(session: Session, study: Study, trials: list[Job]) -> None:
    """End the study once no trial is active and none is to come: `cancelled` when a cancel was asked for, else
    `succeeded` when a trial has an objective value, `failed` when none has."""
    if study.status.is_terminal or any(not t.status.is_terminal for t in trials):
        return
    if study.cancel_requested:
        _move(session, study, StudyStatus.cancelled, "cancelled")
        return
    if study.trials_created < study.trials_planned:
        return
    succeeded = any(_stored_value(t) is not None for t in trials)
    status = StudyStatus.succeeded if succeeded else StudyStatus.failed
    reason = f"{len(trials)} trials ended" + ("" if succeeded else ", none with an objective value")
    _move(session, study, status, reason)


# ------------------------------------------------------------------------------ trials start and end


def trial_moved(session: Session, job: Job, to: JobStatus) -> None:
    """A trial changed status (core.jobs calls this in the same transaction): record it in the study's log, keep
    the best trial, and, when it ended, make the next trials or end the study."""
    study = _locked(session, job.study_id or "")
    if study is None:
        return
    if to == JobStatus.running:
        if study.status == StudyStatus.queued:
            _move(session, study, StudyStatus.running, f"trial {job.trial_number} started")
        _event(session, study, "trial_started", job, {"attempt": job.attempt})
        return
    if not to.is_terminal:
        return
    spec = StudySpec.model_validate(study.spec)
    value = None
    if to in FINISHED_TRIAL:
        value = objective_value(session, job.job_id, spec)
        job.pruner_state = {**(job.pruner_state or {}), "objective": value}
    kind = "trial_pruned" if to == JobStatus.pruned else "trial_ended"
    _event(session, study, kind, job, {"status": str(to), "value": value, "epochs": _epochs_used(session, job.job_id)})
    if value is not None and _better(value, study.best_value, spec.objective.mode or "max"):
        study.best_value, study.best_job_id = value, job.job_id
        _event(session, study, "new_best", job, {"value": value, "params": job.params})
    session.flush()
    if not session.info.get(ADVANCING):
        advance(session, study.study_id)


def _better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


# ---------------------------------------------------------------------------------------------- pruning


def prune_decision(session: Session, job: Job, step: int) -> Decision | None:
    """The study's pruner on a trial that just reported an epoch (core.jobs.record_events, same transaction): the
    Decision when the trial is to stop (a `pruned` event is stored), else None. What the pruner remembers about the
    trial is kept in its row either way."""
    study = session.get(Study, job.study_id)
    if study is None or study.status.is_terminal:
        return None
    spec = StudySpec.model_validate(study.spec)
    if spec.pruner.kind == "none":
        return None
    metric = prune_metric(spec)
    curves = _curves(session, study.study_id, metric)
    records = [
        TrialRecord(
            number=t.trial_number or 0,
            state=_pruning_state(t),
            intermediate=curves.get(t.job_id, {}),
            value=_stored_value(t),
            system_attrs=dict((t.pruner_state or {}).get("optuna", {})),
        )
        for t in _trials(session, study.study_id)
    ]
    if not curves.get(job.job_id):
        return None
    pruner = PrunerSpec(
        kind=spec.pruner.kind,
        warmup_epochs=spec.pruner.warmup_epochs,
        min_trials=spec.pruner.min_trials,
        min_resource=spec.pruner.min_resource,
        reduction_factor=spec.pruner.reduction_factor,
        max_resource=int(study.spec["base"]["train"]["epochs"]),
    )
    decision = decide(pruner, spec.objective.direction, records, job.trial_number or 0)
    job.pruner_state = {**(job.pruner_state or {}), "optuna": decision.system_attrs}
    if not decision.prune:
        return None
    # `compared` is what the rule held against the threshold: for the median rule, the trial's best so far.
    data = {"rule": decision.rule, "metric": metric, "epoch": decision.step, "value": decision.value,
            "compared": decision.compared, "threshold": decision.threshold}  # fmt: skip
    session.add(JobEvent(job_id=job.job_id, attempt=job.attempt, kind=EventKind.pruned, step=step,
                         epoch=decision.step, data=data, created_at=_utcnow()))  # fmt: skip
    return decision


def prune_metric(spec: StudySpec) -> str:
    """The metric trials are pruned on: the objective's, or its validation counterpart for a test/ objective (the
    test split is measured once, at the end)."""
    metric = spec.objective.metric
    return "val/" + metric.removeprefix("test/") if metric.startswith("test/") else metric


def _pruning_state(job: Job) -> str:
    if job.status in FINISHED_TRIAL:
        return "complete"
    if job.status == JobStatus.pruned:
        return "pruned"
    if job.status.is_terminal:
        return "failed"
    return "running"


def _curves(session: Session, study_id: str, metric: str) -> dict[str, dict[int, float]]:
    """Every trial's `metric` per epoch (NaN where it was not finite)."""
    query = (
        select(MetricPoint.job_id, MetricPoint.epoch, MetricPoint.value)
        .join(Job, Job.job_id == MetricPoint.job_id)
        .where(Job.study_id == study_id, MetricPoint.name == metric)
    )
    curves: dict[str, dict[int, float]] = {}
    for job_id, epoch, value in session.execute(query):
        curves.setdefault(job_id, {})[epoch] = math.nan if value is None else float(value)
    return curves


def objective_value(session: Session, job_id: str, spec: StudySpec) -> float | None:
    """A trial's objective: its metric's best epoch or its last (a test/ metric has one point)."""
    query = select(MetricPoint.epoch, MetricPoint.value).where(
        MetricPoint.job_id == job_id, MetricPoint.name == spec.objective.metric
    )
    points = [(epoch, value) for epoch, value in session.execute(query) if value is not None and math.isfinite(value)]
    if not points:
        return None
    if spec.objective.take == "final":
        return float(max(points)[1])
    values = [v for _, v in points]
    return float(max(values) if spec.objective.mode == "max" else min(values))


def _epochs_used(session: Session, job_id: str) -> int:
    query = select(func.max(MetricPoint.epoch)).where(MetricPoint.job_id == job_id, MetricPoint.name == "train/loss")
    return int(session.scalar(query) or 0)


# ------------------------------------------------------------------------------------------- cancel


def request_cancel(*, session: Session, study_id: str, tenant_id: str) -> list[str]:
    """Ask a study to stop, idempotently: no trial is made any more. Returns its active trials, which the caller
    cancels one by one (each in its own transaction: a queued one never starts, a running one saves a checkpoint);
    the study ends `cancelled` when the last of them has ended. Raises StudyNotFound."""
    with committing(session):
        study = _locked(session, study_id)
        if study is None or study.tenant_id != tenant_id:
            raise StudyNotFound(study_id)
        if not study.status.is_terminal and not study.cancel_requested:
            study.cancel_requested = True
            _event(session, study, "cancel_requested", None, {})
        query = select(Job.job_id).where(Job.study_id == study_id, Job.status.in_(JobStatus.active()))
        return list(session.scalars(query))


def cancel(*, session: Session, study_id: str, tenant_id: str) -> Study:
    """request_cancel, then cancel each active trial; the study is `cancelled` at once when none was running."""
    for job_id in request_cancel(session=session, study_id=study_id, tenant_id=tenant_id):
        jobs.request_cancel(session=session, job_id=job_id, tenant_id=tenant_id)
    with committing(session):
        advance(session, study_id)  # ends it now when no trial is left running
    study = get_study(session, tenant_id, study_id)
    assert study is not None
    return study


# ---------------------------------------------------------------------------------------------- sweep


def sweep(session: Session, *, max_active_jobs: int | None = None, limit: int = 100) -> list[Job]:
    """The reaper's part: advance every study that is not over (a decision lost with a process, or room freed by
    another study's trials); returns the trials made."""
    query = select(Study.study_id).where(Study.status.in_([StudyStatus.queued, StudyStatus.running])).limit(limit)
    made: list[Job] = []
    for study_id in list(session.scalars(query)):
        with committing(session):
            made += advance(session, study_id, max_active_jobs=max_active_jobs)
    return made


# ---------------------------------------------------------------------------------------------- reads


def get_study(session: Session, tenant_id: str, study_id: str) -> Study | None:
    query = select(Study).where(Study.study_id == study_id, Study.tenant_id == tenant_id)
    return session.scalar(query.execution_options(populate_existing=True))


def list_studies(
    session: Session, tenant_id: str, *, cursor: str | None = None, limit: int = 50
) -> tuple[list[Study], str | None]:
    """One page of the tenant's studies, newest first."""
    query = select(Study).where(Study.tenant_id == tenant_id)
    if cursor is not None:
        at, study_id = jobs.decode_cursor(cursor)
        query = query.where(or_(Study.created_at < at, and_(Study.created_at == at, Study.study_id < study_id)))
    rows = list(session.scalars(query.order_by(Study.created_at.desc(), Study.study_id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], jobs.encode_cursor(rows[limit - 1].created_at, rows[limit - 1].study_id)


def trial_results(session: Session, study: Study) -> list[TrialResult]:
    """The trials table: each trial's parameters, seed, status, objective and epochs used (two queries in all)."""
    spec = StudySpec.model_validate(study.spec)
    epochs = dict(
        session.execute(
            select(MetricPoint.job_id, func.max(MetricPoint.epoch))
            .join(Job, Job.job_id == MetricPoint.job_id)
            .where(Job.study_id == study.study_id, MetricPoint.name == "train/loss")
            .group_by(MetricPoint.job_id)
        ).all()
    )
    out = []
    for trial in _trials(session, study.study_id):
        value = _stored_value(trial)
        if value is None and trial.status in FINISHED_TRIAL and "objective" not in (trial.pruner_state or {}):
            value = objective_value(session, trial.job_id, spec)  # ended before its objective was kept
        out.append(
            TrialResult(
                number=trial.trial_number or 0,
                job_id=trial.job_id,
                params=dict(trial.params or {}),
                seed=trial.trial_seed,
                status=str(trial.status),
                value=value,
                epochs=int(epochs.get(trial.job_id) or 0),
            )
        )
    return out


BINS = 3  # a sampled number's range is judged in this many parts: each exact value has one trial


def study_verdict(session: Session, study: Study) -> tuple[list[TrialResult], dict[str, Any]]:
    """The trials table and the verdict computed from it (core.verdict). Paths sampled from a range (uniform,
    loguniform, int) are judged by thirds of their range ({"from": low, "to": high}; log-spaced for loguniform),
    since no two trials share an exact value (judged_value)."""
    spec = StudySpec.model_validate(study.spec)
    trials = trial_results(session, study)
    judged = [
        replace(t, params={path: judged_value(spec, path, value) for path, value in t.params.items()}) for t in trials
    ]
    return trials, verdict(judged, list(spec.space), spec.objective.mode or "max")


def judged_value(spec: StudySpec, path: str, value: Any) -> Any:
    """The value a trial's parameter is judged by in the verdict: itself, or the third of its range it is in."""
    distribution = spec.space.get(path)
    if distribution is None or distribution.kind in ("grid", "choice") or not isinstance(value, int | float):
        return value
    low, high = distribution.plain()[distribution.kind]
    if distribution.kind == "loguniform":
        cuts = [low * (high / low) ** (i / BINS) for i in range(BINS + 1)]
    else:
        cuts = [low + (high - low) * i / BINS for i in range(BINS + 1)]
    i = next((i for i in range(BINS) if value < cuts[i + 1]), BINS - 1)
    return {"from": float(f"{cuts[i]:.3g}"), "to": float(f"{cuts[i + 1]:.3g}")}


def list_events(session: Session, study_id: str, *, after: int = 0, limit: int = 1000) -> list[StudyEvent]:
    query = (
        select(StudyEvent)
        .where(StudyEvent.study_id == study_id, StudyEvent.study_event_id > after)
        .order_by(StudyEvent.study_event_id)
        .limit(limit)
    )
    return list(session.scalars(query))


def list_transitions(session: Session, study_id: str) -> list[StudyTransition]:
    query = select(StudyTransition).where(StudyTransition.study_id == study_id)
    return list(session.scalars(query.order_by(StudyTransition.study_transition_id)))


# ------------------------------------------------------------------------------------------- helpers


def _locked(session: Session, study_id: str) -> Study | None:
    # FOR UPDATE on PostgreSQL: the study's decisions are made one at a time (SQLite serialises every writer).
    return session.get(Study, study_id, with_for_update=True, populate_existing=True)


def _trials(session: Session, study_id: str) -> list[Job]:
    query = select(Job).where(Job.study_id == study_id).order_by(Job.trial_number)
    return list(session.scalars(query))


def _move(session: Session, study: Study, to: StudyStatus, reason: str) -> None:
    if to not in TRANSITIONS[study.status]:
        raise ValueError(f"study {study.study_id}: {study.status} -> {to} is not a legal move")
    now = _utcnow()
    _record(session, study, study.status, to, reason, now)
    study.status = to
    if to == StudyStatus.running:
        study.started_at = study.started_at or now
    if to.is_terminal:
        study.finished_at = now
        _event(session, study, "study_ended", None, {"status": str(to), "reason": reason, "best_job_id":
                                                       study.best_job_id, "best_value": study.best_value})  # fmt: skip


def _record(
    session: Session,
    study: Study,
    from_status: StudyStatus | None,
    to: StudyStatus,
    reason: str,
    now: datetime | None = None,
) -> None:
    now = now or _utcnow()
    session.add(StudyTransition(study_id=study.study_id, from_status=from_status, to_status=to, at=now, reason=reason))
    _event(session, study, "status", None, {"from": from_status and str(from_status), "to": str(to), "reason": reason})


def _event(session: Session, study: Study, kind: str, job: Job | None, data: dict[str, Any]) -> None:
    session.add(
        StudyEvent(
            study_id=study.study_id,
            kind=kind,
            job_id=None if job is None else job.job_id,
            trial_number=None if job is None else job.trial_number,
            data=jobs.json_safe(data),
            created_at=_utcnow(),
        )
    )


jobs.TRIAL_HOOKS.moved = trial_moved  # type: ignore[method-assign]
jobs.TRIAL_HOOKS.reported = prune_decision  # type: ignore[method-assign]
