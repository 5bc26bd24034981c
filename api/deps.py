"""Route dependencies as Annotated aliases: settings, sessions, the caller's tenant, the caller's job, limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Body, Depends, Path, Query, Request
from pydantic import WithJsonSchema
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.auth import current_tenant
from api.errors import ApiError, problem
from core import jobs
from core.artifacts import Store
from core.config import Settings
from core.dispatch import Send
from core.models import Job
from core.storage import check_free_space


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_store(request: Request) -> Store:
    return request.app.state.store


StoreDep = Annotated[Store, Depends(get_store)]


async def read_session(request: Request) -> AsyncIterator[Session]:
    """A session for reads: on SQLite it never takes the write lock (BEGIN DEFERRED)."""
    async for session in _session(request.app.state.read_sessions):
        yield session


async def write_session(request: Request) -> AsyncIterator[Session]:
    """A session for core functions that change state (they commit themselves)."""
    async for session in _session(request.app.state.sessions):
        yield session


async def _session(sessions: sessionmaker[Session]) -> AsyncIterator[Session]:
    # Async, so that no trip to the threadpool is spent on opening a session (which does no I/O: the route's first
    # query connects) nor on closing one that never connected.
    session = sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)  # a rollback and the connection back to the pool: I/O
        else:
            session.close()


# scope="function": the session closes when the route returns, before a (streamed) answer is sent.
SessionDep = Annotated[Session, Depends(read_session, scope="function")]
WriteSessionDep = Annotated[Session, Depends(write_session, scope="function")]


# The caller's tenant, from its API key (401 without one); every query below filters by it.
TenantDep = Annotated[str, Depends(current_tenant)]
# Router-level: every route of a router carrying it answers 401 before anything else without a valid key.
AUTHENTICATED = [Depends(current_tenant)]


JobIdPath = Annotated[str, Path(description="job id, e.g. job_...")]


async def caller_job(job_id: JobIdPath, request: Request, tenant: TenantDep) -> Job:
    """The caller's job, or 404 (also for another tenant's job, so ids cannot be probed). Read in a short session
    of its own: a cheap request (GET /v1/jobs/{id}) reads nothing else."""
    job = await request.app.state.quick_reads(_read_job, tenant, job_id)
    if job is None:
        raise jobs.JobNotFound(job_id)
    return job


def _read_job(sessions: sessionmaker[Session], tenant: str, job_id: str) -> Job | None:
    with sessions() as session:
        return jobs.get_job(session, tenant, job_id)  # every column is loaded: readable once the session is closed


JobDep = Annotated[Job, Depends(caller_job)]


def page_limit(
    settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=1, description="items per page; at most settings.max_page_size")] = None,
) -> int:
    """The page size asked for, the default when none, 422 above the maximum."""
    if limit is None:
        return settings.default_page_size
    if limit > settings.max_page_size:
        details = [problem("query.limit", f"must be at most {settings.max_page_size}", "less_than_equal")]
        raise ApiError(422, "invalid_request", f"limit must be at most {settings.max_page_size}", details)
    return limit


PageLimitDep = Annotated[int, Depends(page_limit)]


def refuse_nul(request: Request) -> None:
    """422 for a NUL character in a path or query parameter: PostgreSQL text cannot hold one, and no id or name
    needs one. (HTTP servers refuse NUL in headers themselves.)"""
    where = _nul_in(request)
    if where is not None:
        message = f"{where}: must not contain NUL characters"
        raise ApiError(422, "invalid_request", message, [problem(where, message, "nul_character")])


def _nul_in(request: Request) -> str | None:
    for name, value in request.path_params.items():
        if "\x00" in str(value):
            return f"path.{name}"
    for name, value in request.query_params.multi_items():
        if "\x00" in name + value:
            return f"query.{name.replace(chr(0), '')}"
    return None


def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON (FastAPI would otherwise report a confusing type error)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")


# The body of POST /v1/jobs and /v1/specs/validate: the spec itself, validated by the route so that every
# problem comes back as invalid_spec with its dotted path. OpenAPI documents it as JobSpec (see api.main).
SpecBody = Annotated[dict[str, Any], WithJsonSchema({"$ref": "#/components/schemas/JobSpec"}), Body()]


def get_send(request: Request) -> Send:
    """How a stored job is sent to the workers: what the entry point gave create_app."""
    return request.app.state.send


SendDep = Annotated[Send, Depends(get_send)]


def require_free_disk(settings: SettingsDep) -> None:
    """507 (StorageFull) when a folder the service writes to has less than settings.min_free_disk_mb free: a job or
    an upload accepted now would fail for lack of space, and might take the database down with it."""
    if settings.min_free_disk_mb:
        check_free_space(settings.storage_folders(), settings.min_free_disk_mb)


# On the routes that store something new (jobs, uploads).
FREE_DISK = [Depends(require_free_disk)]
