"""Liveness, readiness (database, broker and artifact store reachable, disk not full) and the Prometheus
exposition."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.auth import metrics_access
from api.deps import SettingsDep
from api.errors import ApiError
from api.schemas import ErrorBody, Health, Readiness
from core.config import Settings
from core.storage import least_free

router = APIRouter(tags=["health"])
PROBE_TIMEOUT_S = 1.0


@router.get("/healthz")
def healthz() -> Health:
    """Liveness: the process answers. No I/O."""
    return Health()


@router.get(
    "/readyz", responses={503: {"model": ErrorBody, "description": "a dependency is unreachable, or the disk is full"}}
)
def readyz(request: Request, settings: SettingsDep) -> Readiness:
    """Readiness: the database answers, the broker and the artifact store are reachable and the disk has
    min_free_disk_mb free; 503 naming what is not."""
    checks = {
        "database": _probe(lambda: _ping_database(request)),
        "broker": _probe(lambda: ping_broker(settings)),
        "storage": _probe(request.app.state.store.check),
        "disk": _disk(settings),
    }
    failing = [name for name, result in checks.items() if result != "ok"]
    if failing:
        problems = "; ".join(f"{name} {checks[name]}" for name in failing)
        raise ApiError(503, "not_ready", f"not ready: {problems}", checks)
    return Readiness(checks=checks)


@router.get(
    "/metrics",
    dependencies=[Depends(metrics_access)],
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition"},
        401: {"model": ErrorBody, "description": "TRICKSERVE_METRICS_TOKEN is set and was not sent"},
        403: {"model": ErrorBody, "description": "no metrics token is set and the client is not on this machine"},
    },
)
def metrics(request: Request) -> Response:
    """Prometheus text: jobs by status, queue depth, running jobs' latest metrics, request latency. It spans every
    tenant, so it takes the metrics token (TRICKSERVE_METRICS_TOKEN), or answers loopback clients when none is set."""
    return Response(generate_latest(request.app.state.monitoring.registry), media_type=CONTENT_TYPE_LATEST)


def ping_broker(settings: Settings) -> None:
    """Raise unless the broker can take messages now."""
    url = settings.broker_url
    if url.startswith("filesystem://"):
        for folder in map(Path, settings.broker_transport_options.values()):
            if not (folder.is_dir() and os.access(folder, os.W_OK)):
                raise OSError(f"broker folder {folder} is missing or not writable")
    elif url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    else:
        from kombu import Connection

        with Connection(url, connect_timeout=PROBE_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1)


def _disk(settings: Settings) -> str:
    least = least_free(settings.storage_folders())
    if least.free_bytes >= settings.min_free_disk_mb * 2**20:
        return "ok"
    mib = least.free_bytes / 2**20
    return (
        f"full: {least.path} has {mib:.1f} MiB free ({least.free_bytes} bytes), below {settings.min_free_disk_mb} MiB"
    )


def _ping_database(request: Request) -> None:
    with request.app.state.read_sessions() as session:
        session.execute(text("SELECT 1"))


def _probe(check: Callable[[], None]) -> str:
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - the answer names what failed
        return f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    return "ok"
