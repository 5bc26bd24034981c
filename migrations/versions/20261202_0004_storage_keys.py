"""Storage keys instead of local paths: job.checkpoint_key and model_key, dataset.key (with the upload's sha256),
artifact.key; and the failure class `storage`. Existing paths become the keys of the default folder store.

Old rows hold absolute paths (`/srv/.trickserve/artifacts/job_x/attempt-1/model.safetensors`) or paths relative to
their folder (`tenant/ds_x.npz` under dataset_dir). Their tail is their key, whatever folder they were under:
`artifacts/job_x/attempt-1/model.safetensors`, `datasets/tenant/ds_x.npz`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence
from pathlib import PurePath

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("invalid_spec", "diverged", "timeout", "worker_lost", "out_of_memory", "disk_full", "internal")
AFTER = ("invalid_spec", "diverged", "timeout", "worker_lost", "out_of_memory", "disk_full", "storage", "internal")
# table, old column, new column, the top folder of its keys, the path components a key keeps
RENAMES = (
    ("job", "checkpoint_path", "checkpoint_key", "artifacts", 3),
    ("job", "model_path", "model_key", "artifacts", 3),
    ("artifact", "path", "key", "artifacts", 3),
    ("dataset", "path", "key", "datasets", 2),
)
PRIMARY_KEYS = {"job": "job_id", "artifact": "artifact_id", "dataset": "dataset_id"}


def _failure_class(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name=op.f("ck_job_failure_class"), native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.alter_column(
            "failure_class", existing_type=_failure_class(BEFORE), type_=_failure_class(AFTER), existing_nullable=True
        )
        batch.alter_column("checkpoint_path", new_column_name="checkpoint_key", existing_type=sa.String(1024))
        batch.alter_column("model_path", new_column_name="model_key", existing_type=sa.String(1024))
    with op.batch_alter_table("artifact") as batch:
        batch.alter_column("path", new_column_name="key", existing_type=sa.String(1024), existing_nullable=False)
    with op.batch_alter_table("dataset") as batch:
        batch.alter_column("path", new_column_name="key", existing_type=sa.String(1024), existing_nullable=False)
        batch.add_column(sa.Column("sha256", sa.String(64), nullable=True))
    for table, _, column, top, keep in RENAMES:
        _rewrite(table, column, lambda value, top=top, keep=keep: _key(value, top, keep))


def downgrade() -> None:
    # Keys become paths relative to the default folders again (the API and worker resolved relative paths there).
    for table, _, column, top, _ in RENAMES:
        _rewrite(table, column, lambda value, top=top: value.removeprefix(f"{top}/"))
    op.execute("UPDATE job SET failure_class = 'internal' WHERE failure_class = 'storage'")
    with op.batch_alter_table("dataset") as batch:
        batch.drop_column("sha256")
        batch.alter_column("key", new_column_name="path", existing_type=sa.String(1024), existing_nullable=False)
    with op.batch_alter_table("artifact") as batch:
        batch.alter_column("key", new_column_name="path", existing_type=sa.String(1024), existing_nullable=False)
    with op.batch_alter_table("job") as batch:
        batch.alter_column("model_key", new_column_name="model_path", existing_type=sa.String(1024))
        batch.alter_column("checkpoint_key", new_column_name="checkpoint_path", existing_type=sa.String(1024))
        batch.alter_column(
            "failure_class", existing_type=_failure_class(AFTER), type_=_failure_class(BEFORE), existing_nullable=True
        )


def _key(path: str, top: str, keep: int) -> str:
    if path.startswith(f"{top}/") and len(PurePath(path).parts) == keep + 1:
        return path  # a key already
    return "/".join((top, *PurePath(path).parts[-keep:]))


def _rewrite(table: str, column: str, convert) -> None:
    pk = PRIMARY_KEYS[table]
    t = sa.table(table, sa.column(pk), sa.column(column, sa.String()))
    bind = op.get_bind()
    rows = bind.execute(sa.select(t.c[pk], t.c[column]).where(t.c[column].is_not(None))).all()
    for row_id, value in rows:
        new = convert(value)
        if new != value:
            bind.execute(sa.update(t).where(t.c[pk] == row_id).values({column: new}))
