"""Uploaded datasets: store, find and list a tenant's dataset rows (the files live under settings.dataset_dir), and
sweep the temporary files that interrupted uploads left behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core.jobs import decode_cursor, encode_cursor
from core.models import Dataset

UPLOAD_TEMP_PREFIX = ".upload-"  # an upload being received: `{dataset_dir}/{tenant}/.upload-*`


def create_dataset(
    *,
    session: Session,
    tenant_id: str,
    dataset_id: str,
    name: str,
    filename: str,
    path: str,
    size_bytes: int,
    description: dict[str, Any],
) -> Dataset:
    """Store a validated upload whose file is already at `path`; commits."""
    dataset = Dataset(
        dataset_id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        filename=filename,
        path=path,
        size_bytes=size_bytes,
        description=description,
    )
    try:
        session.add(dataset)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return dataset


def sweep_upload_temps(dataset_dir: Path, max_age_s: float) -> list[Path]:
    """Delete the temporary files of uploads untouched for `max_age_s` (their API stopped mid-upload); returns them.
    Uploads still arriving write to their file at least every settings.request_body_timeout_s."""
    cutoff = time.time() - max_age_s
    removed = []
    for path in dataset_dir.glob(f"*/{UPLOAD_TEMP_PREFIX}*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass  # finished or swept by another API process meanwhile
    return removed


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    """The tenant's dataset, or None (also when it belongs to another tenant)."""
    return session.scalar(select(Dataset).where(Dataset.dataset_id == dataset_id, Dataset.tenant_id == tenant_id))


def list_datasets(
    session: Session, tenant_id: str, *, cursor: str | None = None, limit: int = 50
) -> tuple[list[Dataset], str | None]:
    """One page of the tenant's datasets, newest first; returns (datasets, next cursor or None on the last page)."""
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    if cursor is not None:
        at, dataset_id = decode_cursor(cursor)
        older = or_(Dataset.created_at < at, and_(Dataset.created_at == at, Dataset.dataset_id < dataset_id))
        query = query.where(older)
    rows = list(session.scalars(query.order_by(Dataset.created_at.desc(), Dataset.dataset_id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], encode_cursor(rows[limit - 1].created_at, rows[limit - 1].dataset_id)
