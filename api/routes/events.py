"""A job's events: the live Server-Sent Events stream (their metric points: api.routes.metrics)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import AUTHENTICATED, JobDep, SettingsDep, TenantDep
from api.hub import EventHub
from api.schemas import ERRORS, ErrorBody
from api.streaming import CURSOR_PATTERN, JobEventResponse, event_cursor, job_events
from core import jobs
from core.models import Job

router = APIRouter(prefix="/v1/jobs", tags=["events"], dependencies=AUTHENTICATED, responses=ERRORS)

CURSOR = {"pattern": CURSOR_PATTERN}
INVALID_CURSOR = {400: {"model": ErrorBody, "description": "malformed cursor (after, Last-Event-ID)"}}

After = Annotated[
    str | None, Query(description="cursor: an event id; only later events are returned", json_schema_extra=CURSOR)
]


@router.get(
    "/{job_id}/events",
    status_code=200,
    response_class=JobEventResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "id: event id, event: kind, data: JSON"},
        204: {"description": "resumed (Last-Event-ID) after the last event of a finished job: stop reconnecting"},
        **INVALID_CURSOR,
        429: {"model": ErrorBody, "description": "too many open streams; see Retry-After"},
        503: {"model": ErrorBody, "description": "the server is busy (streams or database); see Retry-After"},
    },
)
async def stream_events(
    job: JobDep,
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    after: After = None,
    last_event_id: Annotated[
        str | None, Header(description="resume after this event id (wins over `after`)", json_schema_extra=CURSOR)
    ] = None,
) -> Response:
    """Server-Sent Events: every event of the job in id order (metrics, progress, status changes, early stop,
    checkpoints, test...) as `id: <event id>`, `event: <kind>`, `data: {kind, step, epoch, attempt, data, at}`,
    with keep-alive comments; `event: end` follows the terminal status and closes the stream. Reconnect with
    Last-Event-ID (or ?after=) to continue without gap or repeat."""
    after_id, resumed = event_cursor(after), event_cursor(last_event_id)  # both checked, whichever is used
    start = resumed if last_event_id else after_id
    if last_event_id and job.status.is_terminal and not await run_in_threadpool(_has_events, request, job, start):
        return Response(status_code=204)  # the SSE way to tell a client that reconnects after the end to stop
    hub: EventHub = request.app.state.hub
    give_back = await request.app.state.stream_slots.take(tenant)
    try:
        subscriber = await hub.subscribe(
            job.job_id, start
        )  # 503 here, before the stream begins, if the database is busy
    except BaseException:
        await give_back()
        raise

    async def close() -> None:
        hub.unsubscribe(job.job_id, subscriber)
        await give_back()

    stream = job_events(request.app.state.stream_sessions, job.job_id, subscriber, after=start)
    return JobEventResponse(stream, close=close, send_timeout_s=settings.write_timeout_s, ping=settings.sse_ping_s)


def _has_events(request: Request, job: Job, after: int) -> bool:
    with request.app.state.read_sessions() as session:
        return bool(jobs.list_events(session, job.job_id, after=after, limit=1))
