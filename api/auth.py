"""Who is calling: the tenant of a bearer API key, access to /metrics, and the embedded deployment's first key."""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from core import tenants
from core.config import Settings
from core.db import create_db_engine, make_sessionmaker

EMBEDDED_TENANT = "default"
KEY_FILE = "api-key"

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer tsk_...`; `trickserve keys create --tenant NAME` makes one",
)
metrics_bearer = HTTPBearer(
    auto_error=False, scheme_name="MetricsToken", description="`Authorization: Bearer <TRICKSERVE_METRICS_TOKEN>`"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
MetricsCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(metrics_bearer)]


def unauthorized(message: str, *, invalid: bool) -> ApiError:
    """401 with the challenge RFC 6750 asks for (and `invalid_token` when a key was sent but refused)."""
    challenge = 'Bearer error="invalid_token"' if invalid else "Bearer"
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def current_tenant(request: Request, credentials: Credentials) -> str:
    """The tenant of the request's API key; 401 when the key is missing, unknown or revoked."""
    if credentials is None:
        raise unauthorized("send an API key: Authorization: Bearer <key>", invalid=False)
    with request.app.state.read_sessions() as session:
        tenant_id = tenants.authenticate(session, credentials.credentials)
    if tenant_id is None:
        raise unauthorized("the API key is not valid (unknown or revoked)", invalid=True)
    return tenant_id


def metrics_access(request: Request, credentials: MetricsCredentials) -> None:
    """GET /metrics shows every tenant's running jobs, so no tenant key opens it: with settings.metrics_token set,
    that bearer token does; without it, only clients on this machine (loopback) may scrape."""
    token = request.app.state.settings.metrics_token
    if token is None:
        if not _is_loopback(request.client.host if request.client else None):
            raise ApiError(403, "forbidden", "/metrics answers local clients only; set TRICKSERVE_METRICS_TOKEN")
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise unauthorized("send the metrics token: Authorization: Bearer <TRICKSERVE_METRICS_TOKEN>", invalid=True)


def ensure_embedded_key(settings: Settings) -> tuple[str, bool]:
    """The key of the embedded `default` tenant, kept in {home}/api-key (mode 0600): the saved one while it still
    authenticates, else a new one (returned with True, so that `trickserve up` can print it once)."""
    path = settings.home / KEY_FILE
    engine = create_db_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            saved = _read_key(path)
            if saved and tenants.authenticate(session, saved):
                path.chmod(0o600)  # a copy someone loosened is tightened again
                return saved, False
            tenants.create_tenant(session=session, tenant_id=EMBEDDED_TENANT)
            key = tenants.create_api_key(session=session, tenant_id=EMBEDDED_TENANT, name="embedded")
    finally:
        engine.dispose()
    write_private(path, key + "\n")
    return key, True


def write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only, atomically: it is created 0600, never wider even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
