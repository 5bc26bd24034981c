"""A job's events: per-epoch metric points for services that poll, and the live Server-Sent Events stream."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from api.deps import AUTHENTICATED, JobDep, PageLimitDep, SessionDep, SettingsDep, TenantDep
from api.errors import ApiError, problem
from api.schemas import ERRORS, ErrorBody, MetricsPage, metric_points
from api.streaming import JobEventResponse, event_cursor, job_events
from core import jobs

router = APIRouter(prefix="/v1/jobs", tags=["events"], dependencies=AUTHENTICATED, responses=ERRORS)

METRIC_KINDS = ("epoch_end", "test")
METRIC_NAME = re.compile(r"^[\w./-]{1,200}$")
MAX_NAMES = 50

After = Annotated[str | None, Query(description="cursor: an event id; only later events are returned")]


@router.get("/{job_id}/metrics", responses={400: {"model": ErrorBody, "description": "invalid cursor"}})
def read_metrics(
    job: JobDep,
    session: SessionDep,
    limit: PageLimitDep,
    after: After = None,
    names: Annotated[str | None, Query(max_length=4000, description="comma-separated, e.g. val/loss,val/acc")] = None,
) -> MetricsPage:
    """Per-epoch metric points (from epoch_end and test events), oldest first: one per (name, step). `limit`
    counts events (each gives one point per metric); page with next_cursor, poll later from last_cursor."""
    start, wanted = event_cursor(after), _names(names)
    events = jobs.list_events(
        session, job.job_id, after=start, kinds=METRIC_KINDS, names=sorted(wanted) if wanted else None, limit=limit + 1
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
        429: {"model": ErrorBody, "description": "too many open streams"},
    },
)
async def stream_events(
    job: JobDep,
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    after: After = None,
    last_event_id: Annotated[str | None, Header(description="resume after this event id (wins over `after`)")] = None,
) -> JobEventResponse:
    """Server-Sent Events: every event of the job in id order (metrics, progress, status changes, early stop,
    checkpoints, test...) as `id: <event id>`, `event: <kind>`, `data: {kind, step, epoch, attempt, data, at}`,
    with keep-alive comments; `event: end` follows the terminal status and closes the stream. Reconnect with
    Last-Event-ID (or ?after=) to continue without gap or repeat."""
    start = event_cursor(last_event_id if last_event_id is not None else after)
    give_back = request.app.state.stream_slots.take(tenant)
    stream = job_events(request.app.state.read_sessions, job.job_id, after=start, redis_url=settings.redis_url)
    return JobEventResponse(stream, give_back=give_back, ping=settings.sse_ping_s)


def _names(value: str | None) -> set[str] | None:
    names = {n.strip() for n in (value or "").split(",") if n.strip()}
    bad = sorted(n for n in names if not METRIC_NAME.match(n))
    if bad or len(names) > MAX_NAMES:
        message = f"not a metric name: {bad[0]!r}" if bad else f"at most {MAX_NAMES} names"
        raise ApiError(422, "invalid_request", message, [problem("query.names", message)])
    return names or None
