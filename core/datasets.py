"""Uploaded datasets: store, find and list a tenant's dataset rows (the files live in the artifact store, under
`Dataset.key`), and sweep the temporary files that interrupted uploads left behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core import tenants
from core.db import committing
from core.jobs import decode_cursor, encode_cursor
from core.models import Dataset

UPLOAD_TEMP_PREFIX = ".upload-"  # an upload being received by an API process: `{dataset_dir}/{tenant}/.upload-*`


class StorageQuotaExceeded(Exception):
    """The tenant's datasets would be larger than its storage quota."""

    def __init__(self, max_bytes: int, used_bytes: int):
        mib = max_bytes / 2**20
        super().__init__(f"the tenant's datasets may hold at most {mib:g} MiB; {used_bytes / 2**20:.1f} MiB are stored")


def create_dataset(
    *,
    session: Session,
    tenant_id: str,
    dataset_id: str,
    name: str,
    filename: str,
    key: str,
    sha256: str,
    size_bytes: int,
    description: dict[str, Any],
    max_storage_bytes: int | None = None,
) -> Dataset:
    """Record a validated upload already stored under `key`; commits. Raises StorageQuotaExceeded when the
    tenant's datasets would then hold more than `max_storage_bytes`: checked in the inserting transaction, with the
    tenant locked, so that concurrent uploads cannot all pass it."""
    dataset = Dataset(
        dataset_id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        filename=filename,
        key=key,
        sha256=sha256,
        size_bytes=size_bytes,
        description=description,
    )
    with committing(session):
        if max_storage_bytes is not None:
            tenants.lock(session, tenant_id)
            check_storage(session, tenant_id, size_bytes, max_storage_bytes)
        session.add(dataset)
    return dataset


def check_storage(session: Session, tenant_id: str, size_bytes: int, max_bytes: int) -> None:
    """Raise StorageQuotaExceeded unless `size_bytes` more fit in the tenant's quota."""
    used = tenants.usage(session, tenant_id).dataset_bytes
    if used + size_bytes > max_bytes:
        raise StorageQuotaExceeded(max_bytes, used)


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
