"""Who is calling: the tenant of a bearer API key, and access to /metrics."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from core import tenants

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


async def current_tenant(request: Request, credentials: Credentials) -> str:
    """The tenant of the request's API key; 401 when the key is missing, unknown or revoked."""
    if credentials is None:
        raise unauthorized("send an API key: Authorization: Bearer <key>", invalid=False)
    tenant_id = await request.app.state.quick_reads(_authenticate, credentials.credentials)
    if tenant_id is None:
        raise unauthorized("the API key is not valid (unknown or revoked)", invalid=True)
    return tenant_id


def _authenticate(sessions: sessionmaker[Session], key: str) -> str | None:
    with sessions() as session:
        return tenants.authenticate(session, key)


def bearer_key(credentials: Credentials) -> str:
    """The API key sent, not checked yet: for a route that checks it in the session of its own read (tenant_in),
    one trip to the database instead of two. 401 when none was sent."""
    if credentials is None:
        raise unauthorized("send an API key: Authorization: Bearer <key>", invalid=False)
    return credentials.credentials


def tenant_in(session: Session, key: str) -> str:
    """The tenant of `key`, read in the caller's session; 401 when the key is unknown or revoked."""
    tenant_id = tenants.authenticate(session, key)
    if tenant_id is None:
        raise unauthorized("the API key is not valid (unknown or revoked)", invalid=True)
    return tenant_id


BearerKey = Annotated[str, Depends(bearer_key)]


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


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
