"""The caller's limits and what it uses of them now."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import AUTHENTICATED, SessionDep, SettingsDep, TenantDep
from api.schemas import ERRORS, QuotaLimits, QuotasPublic, QuotaUsage
from core import tenants
from core.config import Settings

router = APIRouter(prefix="/v1/quotas", tags=["quotas"], dependencies=AUTHENTICATED, responses=ERRORS)


@router.get("")
def read_quotas(request: Request, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> QuotasPublic:
    """Every limit that applies to the caller, with its current use (jobs, streams, stored datasets)."""
    used = tenants.usage(session, tenant)
    usage = QuotaUsage(
        active_jobs=used.active_jobs,
        open_streams=request.app.state.stream_slots.open[tenant],
        datasets=used.datasets,
        dataset_bytes=used.dataset_bytes,
    )
    return QuotasPublic(tenant=tenant, limits=limits(settings), usage=usage)


def limits(settings: Settings) -> QuotaLimits:
    """The limits every tenant has (they are service settings, TRICKSERVE_*)."""
    return QuotaLimits(
        max_active_jobs=settings.max_active_jobs_per_tenant,
        max_open_streams=settings.sse_max_connections_per_tenant,
        max_epochs=settings.max_epochs,
        max_runtime_s=settings.max_runtime_s,
        max_dataset_examples=settings.max_dataset_examples,
        max_upload_bytes=settings.max_upload_mb * 2**20,
        max_dataset_storage_bytes=settings.max_dataset_storage_mb * 2**20,
        max_dataset_memory_bytes=settings.max_dataset_memory_mb * 2**20,
        max_body_bytes=settings.max_body_kb * 1024,
        max_page_size=settings.max_page_size,
    )
