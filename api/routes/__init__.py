"""The API's routers, collected in one place, and the body limits of the routes that take uploads."""

from __future__ import annotations

from fastapi import FastAPI

from api.routes import datasets, events, health, jobs, metrics, plots, quotas, specs, studies
from core.config import Settings

ROUTERS = (
    health.router,
    jobs.router,
    metrics.router,
    events.router,
    studies.router,
    plots.router,
    specs.router,
    datasets.router,
    quotas.router,
)


def include_routers(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)


def upload_limits(settings: Settings) -> dict[str, int]:
    """Request paths whose body may exceed settings.max_body_kb, with their own limit in bytes."""
    return {datasets.router.prefix: datasets.upload_limit(settings.max_upload_mb)}
