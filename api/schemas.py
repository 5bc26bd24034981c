"""What the API answers, by family (JobPublic, JobsPage, ...); the request body of a job is core.spec.JobSpec itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.models import Dataset, FailureClass, Job, JobStatus, JobTransition, Study, StudyStatus


class Public(BaseModel):
    """Base of the answers: fields named after Python keywords (`class`, `from`) are written by their alias."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True, from_attributes=True)


class ErrorDetail(Public):
    code: str = Field(description="machine-readable, e.g. invalid_spec, not_found, invalid_cursor")
    message: str = Field(description="for people")
    details: Any = Field(None, description="invalid_spec/invalid_request: a list of {path, message, type}")


class ErrorBody(Public):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (401, "Missing, unknown or revoked API key"),
        (404, "Not found"),
        (422, "Invalid request or spec"),
        (500, "Internal error"),
    ]
}


BAD_CURSOR: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a cursor this API did not make (invalid_cursor)"}
}
STORAGE_FULL: dict[str, Any] = {
    "model": ErrorBody,
    "description": "the disk or the database is full (storage_full); see Retry-After",
}
BAD_JSON_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body cannot be read (not UTF-8, not JSON)"},
    413: {"model": ErrorBody, "description": "the body is larger than settings.max_body_kb"},
    415: {"model": ErrorBody, "description": "the body is not declared as application/json"},
}


# ---------------------------------------------------------------------------------------------- jobs


class Failure(Public):
    class_: FailureClass = Field(alias="class", description="why the job failed")
    message: str | None = None


class AdvicePublic(Public):
    code: str = Field(description="stable identifier, e.g. DROPOUT_RANGE")
    message: str
    path: str = Field(description="the spec field it concerns, e.g. model.dropout")
    severity: Literal["info", "warning", "danger"] = "warning"


class JobLinks(Public):
    self_: str = Field(alias="self")
    events: str
    metrics: str
    transitions: str
    cancel: str
    model: str
    spec: str


class JobPublic(Public):
    id: str
    name: str
    status: JobStatus
    attempt: int = Field(description="attempts started so far (a lost worker's job is retried from its checkpoint)")
    max_attempts: int
    queue: str = Field(description="broker queue: cpu or gpu")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    stop_reason: str | None = Field(description="e.g. early_stop, cancelled, timeout, diverged")
    failure: Failure | None = Field(description="set when status is failed")
    best_metrics: dict[str, Any] | None
    final_metrics: dict[str, Any] | None
    advice: list[AdvicePublic] = Field(description="good practices the spec departs from; never a rejection")
    spec: dict[str, Any] = Field(description="the resolved spec: every default filled in")
    links: JobLinks
    study_id: str | None = Field(None, description="the study this job is a trial of")
    trial_number: int | None = Field(None, description="its number in the study")
    params: dict[str, Any] | None = Field(None, description="the study's values this trial runs (spec path: value)")

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
        failure = None if job.failure_class is None else Failure(class_=job.failure_class, message=job.failure_message)
        return cls(
            id=job.job_id,
            name=job.name,
            status=job.status,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            queue=job.queue,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            stop_reason=job.stop_reason,
            failure=failure,
            best_metrics=job.best_metrics,
            final_metrics=job.final_metrics,
            advice=job.advice or [],
            spec=job.spec,
            links=job_links(job.job_id),
            study_id=job.study_id,
            trial_number=job.trial_number,
            params=job.params,
        )


def job_links(job_id: str) -> JobLinks:
    url = f"/v1/jobs/{job_id}"
    parts = ("events", "metrics", "transitions", "cancel", "model", "spec")
    return JobLinks(self_=url, **{part: f"{url}/{part}" for part in parts})


class JobsPage(Public):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class TransitionPublic(Public):
    from_: JobStatus | None = Field(alias="from", description="null for the submission")
    to: JobStatus
    at: datetime
    reason: str | None
    attempt: int

    @classmethod
    def from_row(cls, row: JobTransition) -> TransitionPublic:
        return cls(from_=row.from_status, to=row.to_status, at=row.at, reason=row.reason, attempt=row.attempt)


# ------------------------------------------------------------------------------------------- metrics


class MetricPoint(Public):
    cursor: int = Field(description="id of the event the point comes from")
    step: int = Field(description="optimizer steps taken when it was measured")
    epoch: int
    name: str = Field(description="e.g. val/loss, train/acc, test/acc, lr")
    value: float | str | None = Field(description='a number, or "NaN", "Infinity", "-Infinity"')
    at: datetime


class MetricsPage(Public):
    items: list[MetricPoint]
    next_cursor: int | None = Field(description="more are stored: ask again at once with after=next_cursor")
    last_cursor: int = Field(description="poll later with after=last_cursor (the last event read, or `after`)")


class SeriesColumns(Public):
    """One metric's points as columns, oldest first: the i-th point is step[i], epoch[i], value[i], cursor[i]."""

    step: list[int] = Field(description="optimizer steps taken when each point was measured")
    epoch: list[int]
    value: list[float | Literal["NaN", "Infinity", "-Infinity"]]
    cursor: list[int] = Field(description="id of the event each point comes from")
    total: int = Field(description="points stored after the cursor: more than the columns hold when downsampled")


class MetricSeries(Public):
    series: dict[str, SeriesColumns] = Field(
        description="by metric name: those asked for, in that order (empty columns for a name with no points), or all"
    )
    last_cursor: int = Field(description="poll later with after=last_cursor (the last point read, or `after`)")


# ------------------------------------------------------------------------------------------ datasets


class DatasetDescription(Public):
    model_config = ConfigDict(extra="allow")

    shape: list[int] = Field(description="shape of one example: [F] vectors, [C, L] signals, [C, H, W] images")
    kind: Literal["vector", "signal", "image"]
    n_examples: int
    n_classes: int
    classes: list[str]
    has_test_split: bool = False
    label_column: str | None = None


class DatasetPublic(Public):
    id: str = Field(description="use it as data.dataset in a job spec")
    name: str
    filename: str
    size_bytes: int
    sha256: str | None = Field(description="of the file as uploaded; null for datasets uploaded before it was kept")
    description: DatasetDescription
    created_at: datetime

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetPublic:
        return cls(
            id=row.dataset_id,
            name=row.name,
            filename=row.filename,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            description=DatasetDescription.model_validate(row.description),
            created_at=row.created_at,
        )


class DatasetsPage(Public):
    items: list[DatasetPublic]
    next_cursor: str | None


# --------------------------------------------------------------------------------------------- specs


class MemoryEstimatePublic(Public):
    """The memory a job is estimated to need (bytes), refused above the service's max_job_memory_mb."""

    total_bytes: int = Field(description="the peak: while loading the data, or while training")
    loading_bytes: int = Field(description="while the dataset is read, split and normalized")
    data_bytes: int = Field(description="every split's inputs and labels, kept while training")
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int = Field(description="optimizer state and the temporaries of one step")
    activation_bytes: int = Field(description="one training batch (forward and backward) or one evaluation batch")


class SpecValidation(Public):
    valid: bool = True
    spec: dict[str, Any] = Field(description="the resolved spec: every default filled in")
    advice: list[AdvicePublic]
    parameter_count: int = Field(description="parameters of the model built for the dataset's inputs")
    memory: MemoryEstimatePublic | None = Field(description="the memory the job is estimated to need")
    input_shape: list[int]
    n_classes: int
    queue: str


# -------------------------------------------------------------------------------------------- health


class Health(Public):
    status: Literal["ok"] = "ok"


class Readiness(Public):
    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(description="database, broker, storage and disk: ok")


# -------------------------------------------------------------------------------------------- quotas


class QuotaLimits(Public):
    max_active_jobs: int = Field(description="queued + running jobs; more answers 429 with Retry-After")
    max_open_streams: int = Field(description="open event streams (per API process); more answers 429")
    max_epochs: int = Field(description="largest train.epochs")
    max_runtime_s: float = Field(description="largest resources.max_runtime_s (s)")
    max_dataset_examples: int = Field(description="most examples of an uploaded or synthetic dataset")
    max_upload_bytes: int = Field(description="largest dataset file")
    max_dataset_storage_bytes: int = Field(description="total size of the tenant's datasets")
    max_dataset_memory_bytes: int = Field(description="most memory one uploaded dataset may take to read, decoded")
    max_body_bytes: int = Field(description="largest JSON request body")
    max_page_size: int = Field(description="most items one page may hold")


class QuotaUsage(Public):
    active_jobs: int = Field(description="queued, running and cancelling jobs")
    open_streams: int = Field(description="event streams open on the API process that answered")
    datasets: int
    dataset_bytes: int


class QuotasPublic(Public):
    tenant: str
    limits: QuotaLimits
    usage: QuotaUsage


# -------------------------------------------------------------------------------------------- studies


class StudyBest(Public):
    job_id: str
    value: float


class StudyPublic(Public):
    id: str
    name: str
    status: StudyStatus
    trials_planned: int = Field(description="points x seeds (fewer when a grid has run out of points)")
    trials_created: int
    cancel_requested: bool
    best: StudyBest | None = Field(description="the trial with the best objective so far")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    advice: list[AdvicePublic]
    spec: dict[str, Any] = Field(description="the study as stored: its base is the resolved job spec")

    @classmethod
    def from_study(cls, study: Study) -> StudyPublic:
        best = None
        if study.best_job_id is not None and study.best_value is not None:
            best = StudyBest(job_id=study.best_job_id, value=study.best_value)
        return cls(
            id=study.study_id,
            name=study.name,
            status=study.status,
            trials_planned=study.trials_planned,
            trials_created=study.trials_created,
            cancel_requested=study.cancel_requested,
            best=best,
            created_at=study.created_at,
            started_at=study.started_at,
            finished_at=study.finished_at,
            advice=study.advice or [],
            spec=study.spec,
        )


class TrialRow(Public):
    number: int
    job_id: str
    params: dict[str, Any]
    seed: int | None
    status: JobStatus
    value: float | None = Field(description="the objective: null while running, or when pruned, failed, cancelled")
    epochs: int = Field(description="epochs trained")


class Effect(Public):
    diff: float = Field(description="this value's mean minus the best value's (over pairs when paired)")
    ci95: list[float] | None = Field(description="95% interval of the difference; null below 2 trials or pairs")
    excludes_zero: bool | None
    method: Literal["paired", "welch"] = Field(
        description="paired: over trials sharing a seed and the other paths' values (2 or more pairs); welch: as "
        "independent samples"
    )
    n: int = Field(description="pairs (paired), or the smaller group's trials (welch)")


class ValueSummary(Public):
    value: Any
    n: int = Field(description="trials with an objective")
    mean: float | None
    sd: float | None
    ci95: list[float] | None = Field(description="95% interval of the mean (Student's t); null below 2 trials")
    n_pruned: int
    n_failed: int
    effect: Effect | None = Field(description="against the best value; null for the best value itself")
    verdict: Literal["best", "worse", "no clear difference", "inconclusive"]


class ParameterVerdict(Public):
    path: str
    best_value: Any
    conclusion: str = Field(description="one line, computed from the values' verdicts")
    values: list[ValueSummary]


class BestTrial(Public):
    number: int
    job_id: str
    params: dict[str, Any]
    seed: int | None
    value: float


class Verdict(Public):
    mode: Literal["max", "min"]
    best_trial: BestTrial | None
    parameters: list[ParameterVerdict]


class StudyDetail(StudyPublic):
    trials: list[TrialRow]
    verdict: Verdict


class StudiesPage(Public):
    items: list[StudyPublic]
    next_cursor: str | None


class StudyTransitionPublic(Public):
    from_: StudyStatus | None = Field(alias="from")
    to: StudyStatus
    at: datetime
    reason: str | None
