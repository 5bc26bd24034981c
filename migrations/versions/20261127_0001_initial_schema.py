"""Initial schema: tenant, api_key, dataset, job, job_event, job_transition, artifact.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Values frozen here as they were at this revision; a later revision that adds one changes the CHECK.
JOB_STATUSES = ("queued", "running", "cancelling", "succeeded", "early_stopped", "failed", "cancelled")
FAILURE_CLASSES = ("invalid_spec", "diverged", "timeout", "worker_lost", "out_of_memory", "internal")
ARTIFACT_KINDS = ("checkpoint", "model", "spec")
METRIC_KINDS = sa.text("kind IN ('progress', 'epoch_end', 'test')")


def _enum(values: tuple[str, ...], check: str) -> sa.Enum:
    # VARCHAR + a named CHECK, as core.models declares it (named like the metadata's naming convention).
    return sa.Enum(*values, name=op.f(check), native_enum=False, create_constraint=True, length=32)


def _at(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(column: str, target: str, table: str) -> sa.ForeignKeyConstraint:
    name = f"fk_{table}_{column}_{target.split('.')[0]}"
    return sa.ForeignKeyConstraint([column], [target], name=op.f(name), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "tenant",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        _at("created_at"),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenant")),
    )
    op.create_table(
        "api_key",
        sa.Column("api_key_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        _at("created_at"),
        _at("revoked_at", nullable=True),
        _fk("tenant_id", "tenant.tenant_id", "api_key"),
        sa.PrimaryKeyConstraint("api_key_id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_key_key_hash")),
    )
    op.create_index(op.f("ix_api_key_tenant_id"), "api_key", ["tenant_id"])

    op.create_table(
        "dataset",
        sa.Column("dataset_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("description", sa.JSON(), nullable=False),
        _at("created_at"),
        _fk("tenant_id", "tenant.tenant_id", "dataset"),
        sa.PrimaryKeyConstraint("dataset_id", name=op.f("pk_dataset")),
    )
    op.create_index("ix_dataset_tenant_created", "dataset", ["tenant_id", "created_at"])

    op.create_table(
        "job",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", _enum(JOB_STATUSES, "ck_job_status"), nullable=False),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("advice", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        _at("lease_expires_at", nullable=True),
        _at("heartbeat_at", nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        _at("dispatched_at", nullable=True),
        _at("created_at"),
        _at("updated_at"),
        _at("started_at", nullable=True),
        _at("finished_at", nullable=True),
        sa.Column("stop_reason", sa.String(64), nullable=True),
        sa.Column("failure_class", _enum(FAILURE_CLASSES, "ck_job_failure_class"), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("best_metrics", sa.JSON(), nullable=True),
        sa.Column("final_metrics", sa.JSON(), nullable=True),
        sa.Column("checkpoint_path", sa.String(1024), nullable=True),
        sa.Column("checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("model_path", sa.String(1024), nullable=True),
        _fk("tenant_id", "tenant.tenant_id", "job"),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job")),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name=op.f("uq_job_tenant_id_idempotency_key")),
    )
    op.create_index("ix_job_status_lease", "job", ["status", "lease_expires_at"])
    op.create_index("ix_job_tenant_created", "job", ["tenant_id", "created_at", "job_id"])
    op.create_index("ix_job_tenant_status_created", "job", ["tenant_id", "status", "created_at", "job_id"])

    op.create_table(
        "artifact",
        sa.Column("artifact_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", _enum(ARTIFACT_KINDS, "ck_artifact_kind"), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        _at("created_at"),
        _fk("job_id", "job.job_id", "artifact"),
        sa.PrimaryKeyConstraint("artifact_id", name=op.f("pk_artifact")),
    )
    op.create_index(op.f("ix_artifact_job_id"), "artifact", ["job_id"])

    op.create_table(
        "job_event",
        sa.Column(
            "job_event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        _at("created_at"),
        _fk("job_id", "job.job_id", "job_event"),
        sa.PrimaryKeyConstraint("job_event_id", name=op.f("pk_job_event")),
        sqlite_autoincrement=True,  # ids of deleted (superseded) events are never reused: cursors only go forward
    )
    op.create_index("ix_job_event_job_cursor", "job_event", ["job_id", "job_event_id"])
    op.create_index(
        "uq_job_event_metric_step",
        "job_event",
        ["job_id", "attempt", "kind", "step"],
        unique=True,
        sqlite_where=METRIC_KINDS,
        postgresql_where=METRIC_KINDS,
    )

    op.create_table(
        "job_transition",
        sa.Column("job_transition_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("from_status", _enum(JOB_STATUSES, "ck_job_transition_from_status"), nullable=True),
        sa.Column("to_status", _enum(JOB_STATUSES, "ck_job_transition_to_status"), nullable=False),
        _at("at"),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _fk("job_id", "job.job_id", "job_transition"),
        sa.PrimaryKeyConstraint("job_transition_id", name=op.f("pk_job_transition")),
    )
    op.create_index(op.f("ix_job_transition_job_id"), "job_transition", ["job_id"])


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in ("job_transition", "job_event", "artifact", "job", "dataset", "api_key", "tenant"):
        op.drop_table(table)
