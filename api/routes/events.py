"""A job's events: per-epoch metric points for services that poll, and the live Server-Sent Events stream."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import AUTHENTICATED, JobDep, PageLimitDep, SettingsDep, TenantDep
from api.errors import ApiError, problem
from api.hub import EventHub
from api.schemas import ERRORS, ErrorBody, MetricsPage, metric_points
from api.streaming import CURSOR_PATTERN, JobEventResponse, event_cursor, job_events
from core import jobs
from core.engine.events import METRIC_KINDS
from core.models import Job, JobEvent

router = APIRouter(prefix="/v1/jobs", tags=["events"], dependencies=AUTHENTICATED, responses=ERRORS)

MAX_NAMES = 50
_NAME = "[A-Za-z0-9_./-]{1,200}"
# A comma-separated list of metric names (spaces around commas allowed), checked here exactly as documented.
NAMES_PATTERN = f"^ *{_NAME} *(, *{_NAME} *){{0,{MAX_NAMES - 1}}}$"
NAMES = {"pattern": NAMES_PATTERN}
CURSOR = {"pattern": CURSOR_PATTERN}
INVALID_CURSOR = {400: {"model": ErrorBody, "description": "malformed cursor (after, Last-Event-ID)"}}

After = Annotated[
    str | None, Query(description="cursor: an event id; only later events are returned", json_schema_extra=CURSOR)
]


@router.get("/{job_id}/metrics", responses=INVALID_CURSOR)
async def read_metrics(  # async: one trip to the threadpool (the read), where a sync route makes three
    job: JobDep,
    request: Request,
    limit: PageLimitDep,
    after: After = None,
    names: Annotated[
        str | None,
        Query(max_length=4000, description="comma-separated, e.g. val/loss,val/acc", json_schema_extra=NAMES),
    ] = None,
) -> MetricsPage:
    """Per-epoch metric points (from epoch_end and test events), oldest first: one per (name, step). `limit`
    counts events (each gives one point per metric); page with next_cursor, poll later from last_cursor."""
    start, wanted = event_cursor(after), _names(names)
    events = await run_in_threadpool(
        _metric_events, request.app.state.read_sessions, job.job_id, start, sorted(wanted) if wanted else None, limit
    )
    page = events[:limit]
    items = [point for event in page for point in metric_points(event, wanted)]
    last = page[-1].job_event_id if page else start
    return MetricsPage(items=items, next_cursor=last if len(events) > limit else None, last_cursor=last)


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


def _metric_events(
    sessions: sessionmaker[Session], job_id: str, after: int, names: list[str] | None, limit: int
) -> list[JobEvent]:
    """Up to `limit` + 1 metric events: one more tells whether another page follows."""
    with sessions() as session:
        return jobs.list_events(session, job_id, after=after, kinds=METRIC_KINDS, names=names, limit=limit + 1)


def _has_events(request: Request, job: Job, after: int) -> bool:
    with request.app.state.read_sessions() as session:
        return bool(jobs.list_events(session, job.job_id, after=after, limit=1))


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    if not re.fullmatch(NAMES_PATTERN, value):
        message = f"names are up to {MAX_NAMES} comma-separated metric names of letters, digits and _./-"
        raise ApiError(422, "invalid_request", message, [problem("query.names", message, "pattern")])
    return {n.strip() for n in value.split(",")}
