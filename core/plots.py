"""What the plots of a job and of a study show, read from the metric store and the event logs as plain data (the
drawing, in core.drawing, needs no session), and the version of each: its newest events, which any change adds to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import jobs, metrics, studies
from core.engine.events import EventKind
from core.models import Job, JobEvent, JobStatus, Study, StudyEvent
from core.spec import MONITORS, JobSpec
from core.studyspec import StudySpec, value_key

DEFAULT_JOB_METRICS = ("train/loss", "val/loss", "train/acc", "val/acc")  # those a job has points of
# Names a job may not have points of yet and still be asked for: every run reports them (test/ at its end).
ENGINE_METRICS = frozenset((*MONITORS, "lr", "test/loss", "test/acc"))
MARK_EVENTS = (EventKind.early_stop, EventKind.restored, EventKind.resumed, EventKind.pruned, EventKind.status)
MAX_MARK_EVENTS = 10_000
# A study's trials whose curves are averaged: those that ran their course (or stopped early), and those running.
FOLLOWED = frozenset(map(str, [*studies.FINISHED_TRIAL, *JobStatus.active()]))


class UnknownName(ValueError):
    """A metric or a study path the plot cannot show; `known` lists what it can."""

    def __init__(self, what: str, name: str, known: Sequence[str]):
        super().__init__(f"unknown {what} {name!r}; known: {', '.join(known) or 'none yet'}")
        self.what, self.name, self.known = what, name, list(known)


@dataclass(frozen=True)
class Curve:
    """One metric per epoch, oldest first; NaN where the value was not finite (a gap in the line)."""

    epochs: list[int]
    values: list[float]


@dataclass(frozen=True)
class Mark:
    """Something that happened at an epoch: the best epoch, an early stop, a resumed attempt, a pruning decision.
    `metric` and `value` place it on a curve; `threshold` is the pruning rule's."""

    kind: Literal["best", "early_stop", "resume", "pruned"]
    epoch: float
    label: str
    metric: str | None = None
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class JobPlot:
    title: str
    curves: dict[str, Curve]  # in the order asked for
    marks: list[Mark]


@dataclass(frozen=True)
class ValueGroup:
    """The trials of one value of the plotted path: the curves averaged (finished and running trials), the curves
    the pruner cut short, and the value's objective from the verdict."""

    label: str
    seeds: list[Curve]
    pruned: list[Curve]
    n: int
    mean: float | None
    ci95: tuple[float, float] | None
    n_pruned: int
    n_failed: int
    best: bool


@dataclass(frozen=True)
class StudyPlot:
    title: str
    path: str
    metric: str  # the curves'
    objective: str  # the objective's axis label
    groups: list[ValueGroup] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- versions


def job_version(session: Session, job_id: str) -> tuple[int, int]:
    """(newest event id, number of events) of the job: every change a plot shows adds an event. The count also
    moves when a transaction that took an older id commits after a newer one (PostgreSQL), or events are replaced."""
    query = select(func.max(JobEvent.job_event_id), func.count()).where(JobEvent.job_id == job_id)
    newest, count = session.execute(query).one()
    return newest or 0, count


def study_version(session: Session, study_id: str) -> tuple[int, int, int, int]:
    """The study's job_version, for its own events and for those of all its trials together."""
    own = select(func.max(StudyEvent.study_event_id), func.count()).where(StudyEvent.study_id == study_id)
    trials = (
        select(func.max(JobEvent.job_event_id), func.count())
        .join(Job, Job.job_id == JobEvent.job_id)
        .where(Job.study_id == study_id)
    )
    (newest, count), (trial_newest, trial_count) = session.execute(own).one(), session.execute(trials).one()
    return newest or 0, count, trial_newest or 0, trial_count


# ----------------------------------------------------------------------------------------------- a job


def read_job_plot(session: Session, job: Job, names: Sequence[str] | None = None) -> JobPlot:
    """The job's curves of `names` (default: those of DEFAULT_JOB_METRICS it has points of) as they stand, and
    its marks. UnknownName for a name that is neither the job's nor one every run reports."""
    series = metrics.read_series(session, job.job_id)
    stored = {name: _curve(rows) for name, rows in series.items()}
    for name in names or ():
        if name not in stored and name not in ENGINE_METRICS:
            raise UnknownName("metric", name, sorted(stored))
    shown = list(names) if names else [n for n in DEFAULT_JOB_METRICS if n in stored]
    spec = JobSpec.model_validate(job.spec)
    events = jobs.list_events(session, job.job_id, kinds=MARK_EVENTS, limit=MAX_MARK_EVENTS)
    marks = [m for m in [_best(job, spec, stored, events), _early_stop(events)] if m is not None]
    ends = sorted({(row[2], row[3]) for rows in series.values() for row in rows})  # (step, epoch) of each point
    marks += _resumes(events, ends) + [_pruned(e) for e in events if e.kind == EventKind.pruned]
    done = max((c.epochs[-1] for c in stored.values() if c.epochs), default=0)
    title = f"{job.name}  ·  {job.job_id}  ·  {job.status}"
    if not job.status.is_terminal:
        title += f"  ·  epoch {done} of {spec.train.epochs}"
    return JobPlot(title, {name: stored.get(name, Curve([], [])) for name in shown}, marks)


def _curve(rows: Sequence[Any]) -> Curve:
    """A Curve from read_series rows (name, cursor, step, epoch, value)."""
    return Curve([row[3] for row in rows], [_finite(row[4]) for row in rows])


def _finite(value: float | None) -> float:
    return math.nan if value is None or not math.isfinite(value) else float(value)


def _best(job: Job, spec: JobSpec, stored: dict[str, Curve], events: Sequence[JobEvent]) -> Mark | None:
    """The best epoch as early stopping counted it (its events), else the monitored metric's best point."""
    counted = next((e for e in reversed(events) if e.kind in (EventKind.early_stop, EventKind.restored)), None)
    if counted is not None:
        monitor, epoch = counted.data["monitor"], int(counted.data["best_epoch"])
    else:
        stopping = spec.train.early_stopping
        monitor = stopping.monitor if stopping else ("val/loss" if "val/loss" in stored else "train/loss")
        mode = stopping.resolved_mode() if stopping else ("max" if monitor.endswith("acc") else "min")
        curve = stored.get(monitor, Curve([], []))
        points = [(v if mode == "min" else -v, e) for e, v in zip(curve.epochs, curve.values, strict=True)]
        finite = [p for p in points if not math.isnan(p[0])]
        if not finite:
            return None
        epoch = min(finite)[1]
    curve = stored.get(monitor, Curve([], []))
    value = dict(zip(curve.epochs, curve.values, strict=True)).get(epoch)
    label = f"best epoch {epoch}" + ("" if job.status.is_terminal else " so far")
    label += "" if value is None else f": {monitor} {value:.4g}"
    return Mark("best", epoch, label, monitor, value)


def _early_stop(events: Sequence[JobEvent]) -> Mark | None:
    stop = next((e for e in reversed(events) if e.kind == EventKind.early_stop), None)
    if stop is None:
        return None
    data = stop.data
    label = (
        f"early stop at epoch {data['stopped_epoch']}: no better {data['monitor']} for {data['wait']} epochs "
        f"(patience {data['patience']})"
    )
    return Mark("early_stop", int(data["stopped_epoch"]), label, data["monitor"])


def _resumes(events: Sequence[JobEvent], ends: Sequence[tuple[int, int]]) -> list[Mark]:
    """Where each attempt after the first took over: the epoch its `resumed` event names, else (an attempt that
    had no checkpoint to load, or has not loaded it yet) the epoch of the step its start recorded."""
    resumed = {e.attempt: int(e.data.get("from_epoch", 0)) for e in events if e.kind == EventKind.resumed}
    for event in events:
        starts = event.kind == EventKind.status and event.data.get("to") == JobStatus.running
        if starts and event.attempt > 1 and event.attempt not in resumed:
            resumed[event.attempt] = max((epoch for step, epoch in ends if step <= event.step), default=0)
    return [
        Mark("resume", epoch + 0.5, f"attempt {attempt} " + (f"resumed after epoch {epoch}" if epoch else "restarted"))
        for attempt, epoch in sorted(resumed.items())
    ]


def _pruned(event: JobEvent) -> Mark:
    data = event.data
    compared, threshold = data.get("compared"), data.get("threshold")
    label = f"pruned at epoch {data['epoch']} ({data['rule']} rule)"
    if isinstance(compared, int | float) and isinstance(threshold, int | float):
        label += f": {data['metric']} {compared:.4g} vs threshold {threshold:.4g}"
    value = data.get("value")
    return Mark(
        "pruned",
        int(data["epoch"]),
        label,
        data["metric"],
        float(value) if isinstance(value, int | float) else None,
        float(threshold) if isinstance(threshold, int | float) else None,
    )


# --------------------------------------------------------------------------------------------- a study


def read_study_plot(session: Session, study: Study, path: str | None = None, metric: str | None = None) -> StudyPlot:
    """The study's curves of `metric` (default: the objective's per-epoch metric) grouped by the value of `path`
    (default: the space's first), and each value's objective from the verdict. UnknownName for a path not in the
    space, or a metric no trial has and no run reports."""
    spec = StudySpec.model_validate(study.spec)
    paths = list(spec.space)
    path = path or paths[0]
    if path not in paths:
        raise UnknownName("path", path, paths)
    metric = metric or studies.prune_metric(spec)
    trials, verdict = studies.study_verdict(session, study)
    curves = {t.job_id: _curve(metrics.read_series(session, t.job_id, [metric])[metric]) for t in trials}
    if metric not in ENGINE_METRICS and not any(c.epochs for c in curves.values()):
        raise UnknownName("metric", metric, sorted(ENGINE_METRICS))
    rows = next(p for p in verdict["parameters"] if p["path"] == path)["values"]
    groups = []
    for row in _in_order(rows):
        members = [
            t
            for t in trials
            if value_key(studies.judged_value(spec, path, t.params.get(path))) == value_key(row["value"])
        ]
        averaged = [t for t in members if t.status in FOLLOWED]
        groups.append(
            ValueGroup(
                label=value_label(row["value"]),
                seeds=[curves[t.job_id] for t in averaged if curves[t.job_id].epochs],
                pruned=[curves[t.job_id] for t in members if t.status == JobStatus.pruned and curves[t.job_id].epochs],
                n=row["n"],
                mean=row["mean"],
                ci95=None if row["ci95"] is None else (row["ci95"][0], row["ci95"][1]),
                n_pruned=row["n_pruned"],
                n_failed=row["n_failed"],
                best=row["verdict"] == "best",
            )
        )
    objective = spec.objective
    label = f"{objective.metric} ({objective.take} epoch; {'higher' if objective.mode == 'max' else 'lower'} is better)"
    return StudyPlot(_study_title(study, trials), path, metric, label, groups)


def _in_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The verdict's rows by value when every value is a number, else in the order the trials came."""
    numbers = all(isinstance(r["value"], int | float) and not isinstance(r["value"], bool) for r in rows)
    if all(isinstance(r["value"], dict) and r["value"].keys() == {"from", "to"} for r in rows):
        return sorted(rows, key=lambda r: r["value"]["from"])
    return sorted(rows, key=lambda r: r["value"]) if numbers else rows


def value_label(value: Any) -> str:
    """A parameter value as a legend or a tick shows it."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and value.keys() == {"from", "to"}:  # a third of a sampled range
        return f"{value['from']:.3g} to {value['to']:.3g}"
    text = value if isinstance(value, str) else value_key(value)
    return text if len(text) <= 24 else text[:23] + "…"


def _study_title(study: Study, trials: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    told = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{study.name}  ·  {study.study_id}  ·  {study.status}  ·  {len(trials)} trials" + (
        f" ({told})" if told else ""
    )
