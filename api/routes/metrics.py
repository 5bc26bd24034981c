"""A job's metrics: pages of per-epoch points for services that poll, and columnar series, downsampled, for plots.

Both read metric_point by index ranges and answer JSON encoded once by orjson: no model per point, and no
re-validation of the answer (the Response is returned as it is); the decorators keep the OpenAPI document exact.
The key and the job are checked in the same session as the read (401, 404 otherwise), not by TenantDep and JobDep:
one trip to the database and to the threadpool per request."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.auth import BearerKey, tenant_in
from api.deps import JobIdPath, PageLimitDep
from api.errors import ApiError, problem
from api.routes.events import INVALID_CURSOR, After
from api.schemas import ERRORS, MetricSeries, MetricsPage
from api.streaming import event_cursor
from core import jobs, metrics

# Tagged like the event stream: the points are what its epoch_end and test events hold.
router = APIRouter(prefix="/v1/jobs", tags=["events"], responses=ERRORS)

MAX_NAMES = 50
MAX_SERIES_POINTS = 10_000  # per name, downsampled; at least as many as a job has epochs
_NAME = "[A-Za-z0-9_./-]{1,200}"
# A comma-separated list of metric names (spaces around commas allowed), checked here exactly as documented.
NAMES_PATTERN = f"^ *{_NAME} *(, *{_NAME} *){{0,{MAX_NAMES - 1}}}$"
NAMES = {"pattern": NAMES_PATTERN}
Names = Annotated[
    str | None, Query(max_length=4000, description="comma-separated, e.g. val/loss,val/acc", json_schema_extra=NAMES)
]
INFINITY = math.inf


@router.get("/{job_id}/metrics", response_model=MetricsPage, responses=INVALID_CURSOR)
async def read_metrics(  # async: one trip to the threadpool (the read), where a sync route makes three
    job_id: JobIdPath,
    key: BearerKey,
    request: Request,
    limit: PageLimitDep,
    after: After = None,
    names: Names = None,
) -> Response:
    """Per-epoch metric points (from epoch_end and test events), oldest first: one per (name, step). `limit`
    counts events (each gives one point per metric); page with next_cursor, poll later from last_cursor."""
    start, wanted = event_cursor(after), None if names is None else _names(names)
    body = await run_in_threadpool(_page, request.app.state.read_sessions, key, job_id, start, wanted, limit)
    return Response(body, media_type="application/json")


@router.get("/{job_id}/metrics/series", response_model=MetricSeries, responses=INVALID_CURSOR)
async def read_metric_series(
    job_id: JobIdPath,
    key: BearerKey,
    request: Request,
    after: After = None,
    names: Names = None,
    max_points: Annotated[
        int | None,
        Query(ge=4, le=MAX_SERIES_POINTS, description="downsample each series to at most this many points"),
    ] = None,
) -> Response:
    """For plots: the points after the cursor of each metric named (or of every metric) as columns (step, epoch,
    value, cursor), oldest first. With max_points, a longer series keeps its first and last points and the lowest
    and highest of equal buckets between them, in step order (NaN is never a bucket's lowest or highest; a bucket
    of NaN only keeps one point); `total` counts the points before. Poll later from last_cursor for new points."""
    start, wanted = event_cursor(after), None if names is None else _names(names)
    sessions = request.app.state.read_sessions
    body = await run_in_threadpool(_series, sessions, key, job_id, start, wanted, max_points)
    return Response(body, media_type="application/json")


def _page(
    sessions: sessionmaker[Session], key: str, job_id: str, after: int, names: list[str] | None, limit: int
) -> bytes:
    """A MetricsPage as JSON."""
    with sessions() as session:
        jobs.check_job(session, tenant_in(session, key), job_id)
        page = metrics.read_page(session, job_id, after=after, names=names, limit=limit)
    items = [
        {"cursor": cursor, "step": step, "epoch": epoch, "name": name, "value": _spelled(value), "at": at}
        for cursor, step, epoch, name, value, at, _ in page.points
    ]
    return _json({"items": items, "next_cursor": page.next_cursor, "last_cursor": page.last_cursor})


def _series(
    sessions: sessionmaker[Session],
    key: str,
    job_id: str,
    after: int,
    names: list[str] | None,
    max_points: int | None,
) -> bytes:
    """A MetricSeries as JSON."""
    with sessions() as session:
        jobs.check_job(session, tenant_in(session, key), job_id)
        stored = metrics.read_series(session, job_id, names, after=after)
    last = max((rows[-1][1] for rows in stored.values() if rows), default=after)
    return _json({"series": {name: _columns(rows, max_points) for name, rows in stored.items()}, "last_cursor": last})


def _columns(rows: list[Any], max_points: int | None) -> dict[str, Any]:
    """One series as SeriesColumns; rows are (name, cursor, step, epoch, value)."""
    kept = rows if max_points is None else metrics.downsample(rows, max_points, lambda row: row[4])
    return {
        "step": [row[2] for row in kept],
        "epoch": [row[3] for row in kept],
        "value": [_spelled(row[4]) for row in kept],
        "cursor": [row[1] for row in kept],
        "total": len(rows),
    }


def _spelled(value: float | None) -> float | str:
    """A stored value as the API writes it: JSON has no NaN (stored as NULL) nor infinities, so they are words."""
    if value is not None and -INFINITY < value < INFINITY:
        return value
    return "NaN" if value is None else ("Infinity" if value > 0 else "-Infinity")


def _json(body: dict[str, Any]) -> bytes:
    # Timestamps as pydantic writes them (...Z); core.metrics reads them in UTC, naive on SQLite.
    return orjson.dumps(body, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)


def _names(value: str) -> list[str]:
    """The names asked for, each once, in the order given; 422 unless they match NAMES_PATTERN."""
    if not re.fullmatch(NAMES_PATTERN, value):
        message = f"names are up to {MAX_NAMES} comma-separated metric names of letters, digits and _./-"
        raise ApiError(422, "invalid_request", message, [problem("query.names", message, "pattern")])
    return list(dict.fromkeys(n.strip() for n in value.split(",")))
