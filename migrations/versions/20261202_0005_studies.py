"""Studies: the study, its transitions and events; a job's trial columns; the job status `pruned`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_BEFORE = ("queued", "running", "cancelling", "succeeded", "early_stopped", "failed", "cancelled")
JOB_AFTER = (*JOB_BEFORE, "pruned")
STUDY_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _enum(values: tuple[str, ...], check: str) -> sa.Enum:
    return sa.Enum(*values, name=op.f(check), native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    op.create_table(
        "study",
        sa.Column("study_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", _enum(STUDY_STATUSES, "ck_study_status"), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("advice", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("trials_planned", sa.Integer(), nullable=False),
        sa.Column("trials_created", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("best_job_id", sa.String(40), nullable=True),
        sa.Column("best_value", sa.Double(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenant.tenant_id"], name=op.f("fk_study_tenant_id_tenant"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_study")),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name=op.f("uq_study_tenant_id_idempotency_key")),
    )
    op.create_index("ix_study_tenant_created", "study", ["tenant_id", "created_at", "study_id"])
    op.create_index("ix_study_status", "study", ["status"])
    op.create_table(
        "study_transition",
        sa.Column("study_transition_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_id", sa.String(40), nullable=False),
        sa.Column("from_status", _enum(STUDY_STATUSES, "ck_study_transition_from_status"), nullable=True),
        sa.Column("to_status", _enum(STUDY_STATUSES, "ck_study_transition_to_status"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["study.study_id"], name=op.f("fk_study_transition_study_id_study"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("study_transition_id", name=op.f("pk_study_transition")),
    )
    op.create_index(op.f("ix_study_transition_study_id"), "study_transition", ["study_id"])
    op.create_table(
        "study_event",
        sa.Column("study_event_id", EVENT_ID, autoincrement=True, nullable=False),
        sa.Column("study_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["study.study_id"], name=op.f("fk_study_event_study_id_study"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("study_event_id", name=op.f("pk_study_event")),
    )
    op.create_index("ix_study_event_cursor", "study_event", ["study_id", "study_event_id"])
    with op.batch_alter_table("job") as batch:
        batch.alter_column(
            "status", existing_type=_enum(JOB_BEFORE, "ck_job_status"), type_=_enum(JOB_AFTER, "ck_job_status")
        )
        batch.add_column(sa.Column("study_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("trial_number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("trial_point", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("trial_seed", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("params", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("pruner_state", sa.JSON(), nullable=True))
        batch.create_foreign_key(op.f("fk_job_study_id_study"), "study", ["study_id"], ["study_id"], ondelete="CASCADE")
        batch.create_unique_constraint(op.f("uq_job_study_id_trial_number"), ["study_id", "trial_number"])
    with op.batch_alter_table("job_transition") as batch:
        for column, check in (
            ("from_status", "ck_job_transition_from_status"),
            ("to_status", "ck_job_transition_to_status"),
        ):
            batch.alter_column(column, existing_type=_enum(JOB_BEFORE, check), type_=_enum(JOB_AFTER, check))


def downgrade() -> None:
    op.execute("DELETE FROM job WHERE study_id IS NOT NULL")
    with op.batch_alter_table("job_transition") as batch:
        for column, check in (
            ("from_status", "ck_job_transition_from_status"),
            ("to_status", "ck_job_transition_to_status"),
        ):
            batch.alter_column(column, existing_type=_enum(JOB_AFTER, check), type_=_enum(JOB_BEFORE, check))
    with op.batch_alter_table("job") as batch:
        batch.drop_constraint(op.f("uq_job_study_id_trial_number"), type_="unique")
        batch.drop_constraint(op.f("fk_job_study_id_study"), type_="foreignkey")
        for column in ("pruner_state", "params", "trial_seed", "trial_point", "trial_number", "study_id"):
            batch.drop_column(column)
        batch.alter_column(
            "status", existing_type=_enum(JOB_AFTER, "ck_job_status"), type_=_enum(JOB_BEFORE, "ck_job_status")
        )
    op.drop_table("study_event")
    op.drop_table("study_transition")
    op.drop_table("study")
