"""Studies: submit one (its trials are jobs), list, read with its trials table and verdict, cancel, its lifecycle
log, and its events over Server-Sent Events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from pydantic import WithJsonSchema
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import (
    AUTHENTICATED,
    FREE_DISK,
    PageLimitDep,
    SendDep,
    SessionDep,
    SettingsDep,
    TenantDep,
    WriteSessionDep,
    require_json,
)
from api.errors import ApiError
from api.schemas import (
    BAD_CURSOR,
    BAD_JSON_BODY,
    ERRORS,
    STORAGE_FULL,
    ErrorBody,
    StudiesPage,
    StudyDetail,
    StudyPublic,
    StudyTransitionPublic,
    TrialRow,
)
from api.streaming import CURSOR_PATTERN, event_cursor
from core import studies
from core.dispatch import dispatch
from core.models import Study, StudyEvent, StudyStatus
from core.notify import POLL_INTERVAL_S
from core.submit import Caps

router = APIRouter(prefix="/v1/studies", tags=["studies"], dependencies=AUTHENTICATED, responses=ERRORS)

# The body of POST /v1/studies, validated by the route so that every problem comes back with its path. OpenAPI
# documents it as StudySpec (see api.main).
StudyBody = Annotated[dict[str, Any], WithJsonSchema({"$ref": "#/components/schemas/StudySpec"}), Body()]
StudyIdPath = Annotated[str, Path(max_length=40, description="stu_...")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=255,
        description="retrying with the same key and body returns the first study (200); another body is refused (422)",
    ),
]
CURSOR = {"pattern": CURSOR_PATTERN}
STUDY_POLL_S = max(POLL_INTERVAL_S, 0.25)  # study events come at trial pace, not step pace


@router.post(
    "",
    status_code=201,
    dependencies=[Depends(require_json), *FREE_DISK],
    responses={200: {"model": StudyPublic, "description": "replayed: the study an earlier request with this key made"},
               **BAD_JSON_BODY,
               422: {"model": ErrorBody, "description": "invalid_spec (every problem with its path: space.<path>, "
                                                        "base.<path>, ...) or too_many_trials"},
               507: STORAGE_FULL},
)  # fmt: skip
def create_study(
    body: StudyBody,
    response: Response,
    session: WriteSessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    send: SendDep,
    idempotency_key: IdempotencyKey = None,
) -> StudyPublic:
    """Submit a study: a base job spec, a space over spec paths, seeds, a sampler, an objective and a pruner.
    Every trial spec it can make is resolved and checked first. Its first trials (up to max_concurrent) are
    queued and sent at once; the rest follow as trials end."""
    created = studies.submit_study(
        session=session,
        tenant_id=tenant,
        raw=body,
        caps=Caps.from_settings(settings),
        max_trials=settings.max_study_trials,
        idempotency_key=idempotency_key,
        max_active_jobs=settings.max_active_jobs_per_tenant,
    )
    if created.trials:
        dispatch(session, created.trials, send)
    session.refresh(created.study)
    response.status_code = 201 if created.created else 200
    response.headers["Location"] = f"/v1/studies/{created.study.study_id}"
    return StudyPublic.from_study(created.study)


@router.get("", responses=BAD_CURSOR)
def list_studies(
    session: SessionDep,
    tenant: TenantDep,
    limit: PageLimitDep,
    cursor: Annotated[str | None, Query(min_length=1, description="next_cursor of the previous page")] = None,
) -> StudiesPage:
    """The tenant's studies, newest first."""
    rows, next_cursor = studies.list_studies(session, tenant, cursor=cursor, limit=limit)
    return StudiesPage(items=[StudyPublic.from_study(row) for row in rows], next_cursor=next_cursor)


@router.get("/{study_id}")
def read_study(study_id: StudyIdPath, session: SessionDep, tenant: TenantDep) -> StudyDetail:
    """The study, its trials table (params, seed, status, objective, epochs used) and its verdict: for every value
    of every path, the objective's mean, sd and 95% interval over the trials that finished, and its difference from
    the best value with the interval of that difference. Computed from the numbers at each read."""
    study = _study(session, tenant, study_id)
    trials, verdict = studies.study_verdict(session, study)
    rows = [TrialRow.model_validate(trial, from_attributes=True) for trial in trials]
    return StudyDetail(**StudyPublic.from_study(study).model_dump(), trials=rows, verdict=verdict)


@router.post("/{study_id}/cancel")
def cancel_study(study_id: StudyIdPath, session: WriteSessionDep, tenant: TenantDep) -> StudyPublic:
    """Cancel the study; idempotent. No trial is made any more; queued trials are cancelled, running ones save a
    checkpoint and end `cancelled`, and the study ends `cancelled` once none is left running (at once when none
    was: until then it answers with cancel_requested true)."""
    try:
        study = studies.cancel(session=session, study_id=study_id, tenant_id=tenant)
    except studies.StudyNotFound:
        raise ApiError(404, "not_found", f"no study {study_id}") from None
    return StudyPublic.from_study(study)


@router.get("/{study_id}/transitions")
def read_transitions(study_id: StudyIdPath, session: SessionDep, tenant: TenantDep) -> list[StudyTransitionPublic]:
    """The study's lifecycle log, oldest first."""
    study = _study(session, tenant, study_id)
    return [
        StudyTransitionPublic(from_=t.from_status, to=t.to_status, at=t.at, reason=t.reason)
        for t in studies.list_transitions(session, study.study_id)
    ]


@router.get(
    "/{study_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "id: event id, event: kind, data: JSON"},
        204: {"description": "resumed (Last-Event-ID) after the last event of a finished study: stop reconnecting"},
        400: {"model": ErrorBody, "description": "malformed cursor (after, Last-Event-ID)"},
        429: {"model": ErrorBody, "description": "too many open streams; see Retry-After"},
    },
)
async def stream_events(
    study_id: StudyIdPath,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    after: Annotated[str | None, Query(description="an event id: only later events", json_schema_extra=CURSOR)] = None,
    last_event_id: Annotated[
        str | None, Header(description="resume after this event id (wins over `after`)", json_schema_extra=CURSOR)
    ] = None,
) -> Response:
    """Server-Sent Events of the study: `trial_created`, `trial_started`, `trial_ended`, `trial_pruned`,
    `new_best`, `status` and `study_ended`, as `id: <event id>`, `event: <kind>`, `data: {kind, job_id,
    trial_number, data, at}`; `event: end` closes the stream once the study has ended. Reconnect with
    Last-Event-ID to continue without gap or repeat."""
    start = event_cursor(last_event_id) if last_event_id else event_cursor(after)
    study = await run_in_threadpool(_read_study, request, tenant, study_id)
    if last_event_id and study.status.is_terminal and not await run_in_threadpool(_events, request, study_id, start):
        return Response(status_code=204)
    give_back = await request.app.state.stream_slots.take(tenant)
    stream = _follow(request, study_id, start)

    async def content() -> AsyncIterator[dict[str, Any]]:
        try:
            async for item in stream:
                yield item
        finally:
            await give_back()

    return EventSourceResponse(content(), ping=settings.sse_ping_s, send_timeout=settings.write_timeout_s)


async def _follow(request: Request, study_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
    """The study's events after `after`, then new ones as they are stored (polled), then `end`."""
    while True:
        # The status first: the study's end is committed with its last events, so a terminal status read now
        # means the read below sees every one of them.
        terminal = (await run_in_threadpool(_status, request, study_id)).is_terminal
        events = await run_in_threadpool(_events, request, study_id, after)
        for event in events:
            after = event.study_event_id
            yield {"id": str(event.study_event_id), "event": event.kind, "data": _encode(event)}
        if any(e.kind == "study_ended" for e in events):
            yield {"event": "end", "data": "{}"}
            return
        if not events:
            if terminal:  # a cursor past its end
                yield {"event": "end", "data": "{}"}
                return
            await asyncio.sleep(STUDY_POLL_S)


def _encode(event: StudyEvent) -> str:
    body = {"kind": event.kind, "job_id": event.job_id, "trial_number": event.trial_number, "data": event.data,
            "at": event.created_at.isoformat()}  # fmt: skip
    return orjson.dumps(body).decode()


def _events(request: Request, study_id: str, after: int) -> list[StudyEvent]:
    with request.app.state.stream_sessions() as session:
        return studies.list_events(session, study_id, after=after, limit=500)


def _status(request: Request, study_id: str) -> StudyStatus:
    with request.app.state.stream_sessions() as session:
        return session.get_one(Study, study_id).status


def _read_study(request: Request, tenant: str, study_id: str) -> Study:
    with request.app.state.read_sessions() as session:
        return _study(session, tenant, study_id)


def _study(session: Any, tenant: str, study_id: str) -> Study:
    study = studies.get_study(session, tenant, study_id)
    if study is None:
        raise ApiError(404, "not_found", f"no study {study_id}")
    return study
