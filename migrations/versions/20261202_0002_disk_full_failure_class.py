"""The failure class disk_full: a job that ran out of disk space.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("invalid_spec", "diverged", "timeout", "worker_lost", "out_of_memory", "internal")
AFTER = ("invalid_spec", "diverged", "timeout", "worker_lost", "out_of_memory", "disk_full", "internal")


def _failure_class(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name=op.f("ck_job_failure_class"), native_enum=False, create_constraint=True, length=32)


def _set_values(before: tuple[str, ...], after: tuple[str, ...]) -> None:
    # In batch mode SQLite copies the table with the new CHECK; PostgreSQL drops and adds the constraint.
    with op.batch_alter_table("job") as batch:
        batch.alter_column(
            "failure_class", existing_type=_failure_class(before), type_=_failure_class(after), existing_nullable=True
        )


def upgrade() -> None:
    _set_values(BEFORE, AFTER)


def downgrade() -> None:
    op.execute("UPDATE job SET failure_class = 'internal' WHERE failure_class = 'disk_full'")
    _set_values(AFTER, BEFORE)
