"""Database tables (SQLAlchemy 2 typed ORM) and the enums stored in them; only core/jobs.py changes job rows."""

from __future__ import annotations

import enum
import secrets
import string
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.engine.events import ONE_PER_STEP_KINDS

# Named constraints make Alembic batch migrations on SQLite and plain ALTERs on PostgreSQL agree.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
_ALPHANUMERIC = string.ascii_letters + string.digits


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A public id: prefix + 20 random letters and digits (~119 bits; digits and letters only, so ds_ ids match
    the spec's dataset pattern)."""
    return prefix + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(20))


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    early_stopped = "early_stopped"
    failed = "failed"
    cancelled = "cancelled"
    pruned = "pruned"  # a study's pruner stopped the trial: its curve trailed the others' (core.studies)

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def holds_lease(self) -> bool:
        """A worker's attempt holds the job: its writes are accepted while the lease lasts."""
        return self in (JobStatus.running, JobStatus.cancelling)

    @property
    def is_active(self) -> bool:
        """Queued or held by a worker: counts against the tenant's cap on active jobs."""
        return self == JobStatus.queued or self.holds_lease

    @classmethod
    def leased(cls) -> tuple[JobStatus, ...]:
        return tuple(status for status in cls if status.holds_lease)

    @classmethod
    def active(cls) -> tuple[JobStatus, ...]:
        return tuple(status for status in cls if status.is_active)


TERMINAL = frozenset(
    {JobStatus.succeeded, JobStatus.early_stopped, JobStatus.failed, JobStatus.cancelled, JobStatus.pruned}
)


class StudyStatus(enum.StrEnum):
    queued = "queued"  # no trial has started yet
    running = "running"
    succeeded = "succeeded"  # every trial ended, and at least one has an objective value
    failed = "failed"  # every trial ended without one
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (StudyStatus.succeeded, StudyStatus.failed, StudyStatus.cancelled)


class FailureClass(enum.StrEnum):
    invalid_spec = "invalid_spec"
    diverged = "diverged"
    timeout = "timeout"
    worker_lost = "worker_lost"
    out_of_memory = "out_of_memory"
    disk_full = "disk_full"
    storage = "storage"
    internal = "internal"


class ArtifactKind(enum.StrEnum):
    checkpoint = "checkpoint"
    model = "model"
    spec = "spec"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive text, so UTC is implied there)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one (datetime.now(UTC))")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # VARCHAR + CHECK rather than a native PostgreSQL enum: the same DDL on both backends, easy to extend.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
    )


# SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere event ids may outgrow 32 bits.
EventId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenant"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_key"

    api_key_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.tenant_id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)  # sha256 hex; never the key
    prefix: Mapped[str] = mapped_column(String(16))  # first characters of the key, to recognise it
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_job_tenant_created", "tenant_id", "created_at", "job_id"),
        Index("ix_job_tenant_status_created", "tenant_id", "status", "created_at", "job_id"),
        Index("ix_job_status_lease", "status", "lease_expires_at"),  # the reaper and the outbox
        UniqueConstraint("study_id", "trial_number"),  # a trial is created once, whoever creates it
    )

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.tenant_id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "status"), default=JobStatus.queued)
    queue: Mapped[str] = mapped_column(String(64), default="cpu")
    spec: Mapped[dict[str, Any]]
    advice: Mapped[list[Any]] = mapped_column(default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    # Execution: attempt is the fencing token; every write of a worker names the attempt it holds.
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    dispatched_at: Mapped[datetime | None]  # outbox: null until sent to the broker

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    # Outcome.
    stop_reason: Mapped[str | None] = mapped_column(String(64))
    failure_class: Mapped[FailureClass | None] = mapped_column(_enum(FailureClass, "failure_class"))
    failure_message: Mapped[str | None] = mapped_column(Text)
    best_metrics: Mapped[dict[str, Any] | None]
    final_metrics: Mapped[dict[str, Any] | None]
    checkpoint_key: Mapped[str | None] = mapped_column(String(1024))  # keys in the artifact store (core.artifacts)
    checkpoint_step: Mapped[int | None]
    model_key: Mapped[str | None] = mapped_column(String(1024))

    # A study's trial: which study, its number there, the point of the space it runs and with which seed.
    study_id: Mapped[str | None] = mapped_column(ForeignKey("study.study_id", ondelete="CASCADE"))
    trial_number: Mapped[int | None]
    trial_point: Mapped[int | None]
    trial_seed: Mapped[int | None] = mapped_column(BigInteger)
    params: Mapped[dict[str, Any] | None]  # spec path -> value
    pruner_state: Mapped[dict[str, Any] | None]  # what the pruner keeps about the trial (Optuna's system attrs)


class Study(Base):
    """A comparison of trials (jobs) over a space of spec values and seeds; its spec is core.studyspec.StudySpec."""

    __tablename__ = "study"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_study_tenant_created", "tenant_id", "created_at", "study_id"),
        Index("ix_study_status", "status"),
    )

    study_id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("stu_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.tenant_id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "status"), default=StudyStatus.queued)
    spec: Mapped[dict[str, Any]]
    advice: Mapped[list[Any]] = mapped_column(default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    trials_planned: Mapped[int]  # points x seeds; lowered when a grid runs out of points
    trials_created: Mapped[int] = mapped_column(default=0)  # the next trial's number
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    best_job_id: Mapped[str | None] = mapped_column(String(40))
    best_value: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class StudyTransition(Base):
    """The study's lifecycle log: one row per status change, never updated."""

    __tablename__ = "study_transition"

    study_transition_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.study_id", ondelete="CASCADE"), index=True)
    from_status: Mapped[StudyStatus | None] = mapped_column(_enum(StudyStatus, "from_status"))
    to_status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "to_status"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)


class StudyEvent(Base):
    """What happened in a study (trial created, started, ended or pruned, new best, study ended); study_event_id is
    the cursor of its event stream."""

    __tablename__ = "study_event"
    __table_args__ = (Index("ix_study_event_cursor", "study_id", "study_event_id"),)

    study_event_id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.study_id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(40))
    trial_number: Mapped[int | None]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """One engine event (or a status change); job_event_id is the cursor of polling and the SSE id."""

    __tablename__ = "job_event"
    __table_args__ = (
        Index("ix_job_event_job_cursor", "job_id", "job_event_id"),
        # AUTOINCREMENT: SQLite must never reuse the id of a deleted (superseded) event, or cursors go back.
        {"sqlite_autoincrement": True},
    )

    job_event_id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.job_id", ondelete="CASCADE"))
    attempt: Mapped[int]
    kind: Mapped[str] = mapped_column(String(32))  # an EventKind's value
    step: Mapped[int]
    epoch: Mapped[int]
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# A retry that replays steps stores their metrics and progress once.
_one_per_step = JobEvent.kind.in_(ONE_PER_STEP_KINDS)
Index(
    "uq_job_event_metric_step",
    JobEvent.job_id,
    JobEvent.attempt,
    JobEvent.kind,
    JobEvent.step,
    unique=True,
    sqlite_where=_one_per_step,
    postgresql_where=_one_per_step,
)


class MetricPoint(Base):
    """One metric's value at one step of a job: a copy of a number of an epoch_end or test event, kept for reads.
    One series of one job after a cursor is one range of ix_metric_point_series. Written with its event and deleted
    with it (core.jobs); NaN is stored as NULL, infinities as themselves."""

    __tablename__ = "metric_point"
    __table_args__ = (
        # Covering (the columns after the first three are only read): a page is read from the index alone, which
        # halves the time SQLite takes to read 1,000 points.
        Index(
            "ix_metric_point_series",
            "job_id",
            "name",
            "job_event_id",
            "step",
            "epoch",
            "value",
            "created_at",
            "position",
        ),
        Index("ix_metric_point_job_cursor", "job_id", "job_event_id"),  # every name of a job, by cursor
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("job.job_id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[float | None] = mapped_column(Double)
    epoch: Mapped[int]
    attempt: Mapped[int]
    job_event_id: Mapped[int] = mapped_column(EventId)  # the cursor: the event the point comes from
    position: Mapped[int]  # the name's place among the event's keys: points of one event are served in this order
    created_at: Mapped[datetime]  # the event's


class JobTransition(Base):
    """The lifecycle log: one row per status change, never updated."""

    __tablename__ = "job_transition"

    job_transition_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.job_id", ondelete="CASCADE"), index=True)
    from_status: Mapped[JobStatus | None] = mapped_column(_enum(JobStatus, "from_status"))
    to_status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "to_status"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int]


class Dataset(Base):
    __tablename__ = "dataset"
    __table_args__ = (Index("ix_dataset_tenant_created", "tenant_id", "created_at"),)

    dataset_id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.tenant_id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(1024))  # in the artifact store (core.artifacts)
    sha256: Mapped[str | None] = mapped_column(String(64))  # of the file as uploaded; None for rows from before 0004
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[dict[str, Any]] = mapped_column(default=dict)  # shape, classes, counts...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifact"

    artifact_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.job_id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]
    kind: Mapped[ArtifactKind] = mapped_column(_enum(ArtifactKind, "kind"))
    key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
