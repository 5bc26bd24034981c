"""Tenants and their API keys: create, revoke, list, authenticate a bearer key, and what a tenant uses now.

A key is shown once, when it is made; the database keeps only its SHA-256 and a short prefix to recognise it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from core.db import committing, insert_ignoring_duplicates
from core.models import ApiKey, Dataset, Job, JobStatus, Tenant, utcnow

KEY_PREFIX = "tsk_"
SHOWN_CHARS = 12  # "tsk_" and 8 random characters: enough to tell keys apart, far too few to guess the rest
TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also a folder name (uploads live per tenant)


class InvalidTenantId(ValueError):
    """A tenant id that could not be a folder name or is too long."""


@dataclass(frozen=True)
class Usage:
    """What a tenant holds now, for quotas."""

    active_jobs: int
    datasets: int
    dataset_bytes: int


def create_tenant(*, session: Session, tenant_id: str, name: str | None = None) -> Tenant:
    """The tenant, created if new (commits; safe to call concurrently); raises InvalidTenantId for ids that are not
    safe names. Every path that makes tenants (key administration, the embedded key, queue submissions) goes here."""
    if not isinstance(tenant_id, str) or not TENANT_ID.match(tenant_id):
        raise InvalidTenantId(f"tenant ids are 1-64 letters, digits, '_', '.', '-', not {tenant_id!r}")
    with committing(session):
        session.execute(insert_ignoring_duplicates(session, Tenant).values(tenant_id=tenant_id, name=name or tenant_id))
        tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    return tenant


def create_api_key(*, session: Session, tenant_id: str, name: str | None = None) -> str:
    """A new key for an existing tenant (commits); the plaintext is returned here and stored nowhere."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
    with committing(session):
        session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:SHOWN_CHARS], name=name))
    return key


def revoke_api_key(*, session: Session, key_or_prefix: str) -> bool:
    """Revoke the key given whole or by its shown prefix (commits); False when no live key matches."""
    value = key_or_prefix.strip()
    match = ApiKey.key_hash == hash_key(value) if len(value) > SHOWN_CHARS else ApiKey.prefix == value
    with committing(session):
        result = session.execute(update(ApiKey).where(match, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow()))
    return result.rowcount > 0  # type: ignore[attr-defined]


def list_api_keys(session: Session, tenant_id: str | None = None) -> list[ApiKey]:
    """Keys (their prefixes, names and dates; never a key), oldest first, of one tenant or all."""
    query = select(ApiKey).order_by(ApiKey.tenant_id, ApiKey.api_key_id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(query))


# Built once: every request runs it, and building a statement costs more than running it on an indexed column.
# Of the table's columns, not the class's: a Core statement skips the ORM's work on every execution.
_key = ApiKey.__table__.c
_LIVE_KEY = select(_key.key_hash, _key.tenant_id).where(_key.key_hash == bindparam("digest"), _key.revoked_at.is_(None))


def authenticate(session: Session, key: str) -> str | None:
    """The tenant of a live key, or None (unknown, malformed or revoked)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    row = session.execute(_LIVE_KEY, {"digest": digest}).first()
    # The lookup is by hash, so its timing says nothing about the key; the comparison is constant-time anyway.
    if row is None or not secrets.compare_digest(row.key_hash, digest):
        return None
    return row.tenant_id


def lock(session: Session, tenant_id: str) -> None:
    """Hold the tenant's row until the transaction ends, so that concurrent checks of its quotas (count, then
    insert) run one after another. PostgreSQL: SELECT ... FOR NO KEY UPDATE, which leaves the foreign-key checks
    of other inserts alone; SQLite: its writers are serialised already (BEGIN IMMEDIATE), and SQLAlchemy leaves the
    clause out."""
    session.execute(select(Tenant.tenant_id).where(Tenant.tenant_id == tenant_id).with_for_update(key_share=True))


def usage(session: Session, tenant_id: str) -> Usage:
    """The tenant's queued and running jobs, and its datasets with their total size."""
    active = select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(JobStatus.active()))
    stored = select(func.count(), func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    n_datasets, n_bytes = session.execute(stored).one()
    return Usage(active_jobs=session.scalar(active) or 0, datasets=n_datasets, dataset_bytes=int(n_bytes))


def hash_key(key: str) -> str:
    """What is stored of a key: keys are 256 random bits, so a fast unsalted hash cannot be brute-forced."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
