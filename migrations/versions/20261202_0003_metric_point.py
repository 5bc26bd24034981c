"""metric_point: the numbers of epoch_end and test events as one row per (job, name, step), read by index ranges;
filled from the events already stored.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql, sqlite

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The rules of core.metrics.points_of, frozen here as they were at this revision.
METRIC_KINDS = ("epoch_end", "test")
STATE_PREFIXES = ("early_stopping/",)
NOT_FINITE = {"NaN": None, "Infinity": float("inf"), "-Infinity": float("-inf")}
MAX_NAME_CHARS = 200
BATCH = 1000  # events read and copied at a time

EVENTS = sa.table(
    "job_event",
    *(sa.column(name, sa.Integer()) for name in ("job_event_id", "attempt", "step", "epoch")),
    sa.column("job_id", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("data", sa.JSON()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    points = op.create_table(
        "metric_point",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("job_event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["job.job_id"], name=op.f("fk_metric_point_job_id_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "name", "step", name=op.f("pk_metric_point")),
    )
    series = ["job_id", "name", "job_event_id", "step", "epoch", "value", "created_at", "position"]
    op.create_index("ix_metric_point_series", "metric_point", series)  # covering
    op.create_index("ix_metric_point_job_cursor", "metric_point", ["job_id", "job_event_id"])
    insert = (postgresql.insert if op.get_bind().dialect.name == "postgresql" else sqlite.insert)(points)
    for batch in _metric_events():
        rows = [point for event in batch for point in _points(event)]
        if rows:
            # Two events of one step naming the same metric keep the first, as core.jobs does.
            op.get_bind().execute(insert.on_conflict_do_nothing(), rows)


def _metric_events() -> Iterator[list[Any]]:
    """The stored epoch_end and test events, BATCH at a time, oldest first."""
    after = 0
    while True:
        query = sa.select(EVENTS).where(EVENTS.c.kind.in_(METRIC_KINDS), EVENTS.c.job_event_id > after)
        batch = op.get_bind().execute(query.order_by(EVENTS.c.job_event_id).limit(BATCH)).all()
        if not batch:
            return
        yield batch
        after = batch[-1].job_event_id


def _points(event: Any) -> list[dict[str, Any]]:
    return [
        {
            "job_id": event.job_id,
            "name": name,
            "step": event.step,
            "value": NOT_FINITE[value] if isinstance(value, str) else float(value),
            "epoch": event.epoch,
            "attempt": event.attempt,
            "job_event_id": event.job_event_id,
            "position": position,
            "created_at": event.created_at,
        }
        for position, (name, value) in enumerate(event.data.items())
        if not name.startswith(STATE_PREFIXES) and _is_number(value) and len(name) <= MAX_NAME_CHARS
    ]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and value in NOT_FINITE)


def downgrade() -> None:
    op.drop_table("metric_point")  # and its indexes
