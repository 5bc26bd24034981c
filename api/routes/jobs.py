"""Jobs: submit a spec, list, read, cancel, the lifecycle log, and the trained model and spec."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from api.deps import (
    AUTHENTICATED,
    FREE_DISK,
    JobDep,
    PageLimitDep,
    SendDep,
    SessionDep,
    SettingsDep,
    SpecBody,
    StoreDep,
    TenantDep,
    WriteSessionDep,
    require_json,
)
from api.errors import ApiError, problem
from api.schemas import (
    BAD_CURSOR,
    BAD_JSON_BODY,
    ERRORS,
    STORAGE_FULL,
    ErrorBody,
    JobPublic,
    JobsPage,
    TransitionPublic,
)
from core import jobs, notify
from core.artifacts import ObjectMissing, retrying
from core.dispatch import dispatch
from core.models import JobStatus
from core.submit import Caps, submit

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=AUTHENTICATED, responses=ERRORS)

IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=255,
        description="retrying with the same key and body returns the first job (200); another body is refused "
        "(422). Keys are per tenant and kept as long as the job they made (never expired, so at least 24 h)",
    ),
]


@router.post(
    "",
    status_code=201,
    dependencies=[Depends(require_json), *FREE_DISK],
    responses={200: {"model": JobPublic, "description": "replayed: the job an earlier request with this key made"},
               **BAD_JSON_BODY,
               429: {"model": ErrorBody, "description": "too many queued or running jobs; see Retry-After"},
               507: STORAGE_FULL},
)  # fmt: skip
def create_job(
    spec: SpecBody,
    response: Response,
    session: WriteSessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    send: SendDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Submit a job spec (the body is the spec itself). The job is stored and committed, then sent to a worker; if
    the broker is down it stays queued and is sent later. 201 with the job, its resolved spec and its advice."""
    submitted = submit(
        session=session,
        tenant_id=tenant,
        spec_dict=spec,
        idempotency_key=idempotency_key,
        max_active_jobs=settings.max_active_jobs_per_tenant,
        caps=Caps.from_settings(settings),
    )
    job = submitted.job
    # Only the request that created the job sends it: a replay could race that send. The outbox sweep sends
    # whatever the broker missed.
    if submitted.created and dispatch(session, job, send):
        session.refresh(job)  # marked dispatched (updated_at moved): answer exactly what a replay will answer
    response.status_code = 201 if submitted.created else 200
    response.headers["Location"] = f"/v1/jobs/{job.job_id}"
    return JobPublic.from_job(job)


@router.get("", responses=BAD_CURSOR)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: PageLimitDep,
    status: Annotated[list[str] | None, Query(description="keep these statuses (comma-separated or repeated)")] = None,
    name: Annotated[str | None, Query(max_length=200, description="keep jobs with exactly this name")] = None,
    study: Annotated[str | None, Query(max_length=40, description="keep the trials of this study")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobsPage:
    """The tenant's jobs, newest first; filters apply before the page limit."""
    items, next_cursor = jobs.list_jobs(
        session, tenant, status=_statuses(status), name=name, study_id=study, cursor=cursor, limit=limit
    )
    return JobsPage(items=[JobPublic.from_job(job) for job in items], next_cursor=next_cursor)


@router.get("/{job_id}")
async def read_job(job: JobDep) -> JobPublic:  # async: nothing to wait for, so no trip to the threadpool
    """Status, attempt, timings, best and final metrics, stop reason, failure, advice and the resolved spec."""
    return JobPublic.from_job(job)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, session: WriteSessionDep, tenant: TenantDep, settings: SettingsDep) -> JobPublic:
    """Ask the job to stop; idempotent. A queued job is cancelled at once, a running one becomes `cancelling` and
    ends `cancelled` after saving a checkpoint; a finished job is answered unchanged."""
    job = jobs.request_cancel(session=session, job_id=job_id, tenant_id=tenant)
    notify.publish(settings.redis_url, job_id)  # wake the job's event streams now
    return JobPublic.from_job(job)


@router.get("/{job_id}/transitions")
def read_transitions(job: JobDep, session: SessionDep) -> list[TransitionPublic]:
    """The lifecycle log, oldest first: every status change with its time, reason and attempt."""
    return [TransitionPublic.from_row(row) for row in jobs.list_transitions(session, job.job_id)]


@router.get(
    "/{job_id}/model",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "model.safetensors"},
        307: {"description": "with TRICKSERVE_STORAGE_PRESIGN_S on an S3 store: a short-lived URL of the file"},
        409: {"model": ErrorBody, "description": "the job has no trained model yet (model_not_ready)"},
        410: {"model": ErrorBody, "description": "the model's file is no longer in storage (model_missing)"},
        503: {"model": ErrorBody, "description": "the artifact store is unavailable (storage_unavailable)"},
    },
)
def download_model(job: JobDep, settings: SettingsDep, store: StoreDep) -> Response:
    """The trained weights as safetensors; the resolved spec is in the file's metadata (key `spec`)."""
    if not job.model_key:
        message = f"job {job.job_id} has no trained model yet (it is {job.status})"
        raise ApiError(409, "model_not_ready", message)  # the job exists: 404 would say it does not
    filename = f"{job.job_id}.safetensors"
    key = job.model_key
    path = store.local_path(key)
    if path is not None:
        if not path.is_file():
            raise _model_missing(job.job_id, key)
        return FileResponse(path, media_type="application/octet-stream", filename=filename)
    if settings.storage_presign_s:
        url = store.presign(key, settings.storage_presign_s, filename)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    try:
        obj = retrying(lambda: store.read(key), within_s=settings.storage_retry_s, what=f"job {job.job_id}: model")
    except ObjectMissing:
        raise _model_missing(job.job_id, key) from None
    headers = {"Content-Length": str(obj.size), "Content-Disposition": f'attachment; filename="{filename}"'}
    return StreamingResponse(obj.chunks, media_type="application/octet-stream", headers=headers)


def _model_missing(job_id: str, key: str) -> ApiError:
    log.error("job %s: its model %r is not in the artifact store", job_id, key)
    return ApiError(410, "model_missing", f"job {job_id}: its model file is no longer in storage")


@router.get("/{job_id}/spec")
def read_spec(job: JobDep) -> dict[str, Any]:
    """The job's resolved spec, ready to submit again."""
    return job.spec


def _statuses(values: list[str] | None) -> list[JobStatus] | None:
    if not values:
        return None
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in JobStatus.__members__]
    if unknown:
        message = f"unknown status {unknown[0]!r}; choose from {', '.join(JobStatus)}"
        raise ApiError(422, "invalid_request", message, [problem("query.status", message, "enum")])
    return [JobStatus(n) for n in names] or None
