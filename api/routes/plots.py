"""Plots as PNG or SVG: a job's learning curves with its marks, a study's curves by value with each value's
objective. Drawn in threads of their own (a slow drawing never holds up other requests), and kept, per process,
until the job or study has new events; the ETag names that version, so a client can poll with If-None-Match."""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import AUTHENTICATED, JobDep, TenantDep
from api.errors import ApiError, problem
from api.routes.metrics import MAX_NAMES, NAMES_PATTERN
from api.routes.studies import StudyIdPath
from api.schemas import ERRORS
from core import drawing, jobs, plots, studies
from core.models import Study
from core.studyspec import METRIC

router = APIRouter(tags=["plots"], dependencies=AUTHENTICATED, responses=ERRORS)

DRAWING_THREADS = 4  # at most this many drawings at once per process; other requests keep the threadpool
CACHED_PLOTS = 128  # per process: one entry per (id, format, query), holding its newest version only
Metrics = Annotated[
    str | None,
    Query(
        max_length=4000,
        description="comma-separated metric names; default: train/loss, val/loss, train/acc, val/acc (those the "
        "job has)",
        json_schema_extra={"pattern": NAMES_PATTERN},
    ),
]
IfNoneMatch = Annotated[str | None, Header(description="an ETag of this plot: 304 while it is unchanged")]


def _image(fmt: str) -> dict[int | str, dict[str, Any]]:
    """The answers of a plot route, in OpenAPI."""
    picture = {"type": "string", "format": "binary"} if fmt == "png" else {"type": "string"}
    return {
        200: {"content": {drawing.FORMATS[fmt]: {"schema": picture}}, "description": "the picture; ETag: its version"},
        304: {"description": "If-None-Match named the current version: nothing new to draw"},
    }


Key = tuple[Any, ...]


@router.get("/v1/jobs/{job_id}/plot.png", response_class=Response, responses=_image("png"), operation_id="plot_job_png")
@router.get("/v1/jobs/{job_id}/plot.svg", response_class=Response, responses=_image("svg"), operation_id="plot_job_svg")
async def plot_job(
    job: JobDep, request: Request, metrics: Metrics = None, if_none_match: IfNoneMatch = None
) -> Response:
    """Learning curves of the job as it stands (a running job: what has arrived so far): a loss panel and an
    accuracy panel, train and val together, or the metrics named. Marked: the best epoch, an early stop with its
    reason, where a later attempt took over, a pruning decision with its threshold. 422 unknown_metric for a name
    the job has no points of and no run reports."""
    names, fmt = None if metrics is None else _names(metrics), _format(request)
    sessions = request.app.state.read_sessions
    version = await run_in_threadpool(_read, sessions, plots.job_version, job.job_id)
    draw = functools.partial(_draw_job, sessions, job.tenant_id, job.job_id, names, fmt)
    return await _answer(request, ("job", job.job_id, fmt, names), version, draw, if_none_match)


@router.get(
    "/v1/studies/{study_id}/plot.png", response_class=Response, responses=_image("png"), operation_id="plot_study_png"
)
@router.get("/v1/studies/{study_id}/plot.svg", response_class=Response, responses=_image("svg"),
            operation_id="plot_study_svg")  # fmt: skip
async def plot_study(
    study_id: StudyIdPath,
    request: Request,
    tenant: TenantDep,
    path: Annotated[str | None, Query(max_length=200, description="a path of the space; default: its first")] = None,
    metric: Annotated[
        str | None, Query(pattern=METRIC, description="the curves' metric; default: the objective's, per epoch")
    ] = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The study by the values of one path: per value, the mean curve over its seeds with a min-max band, and the
    partial curve of each pruned trial; beside it, each value's objective with its 95% interval (the verdict's).
    422 unknown_path for a path not in the space, unknown_metric for a metric no trial has."""
    sessions, fmt = request.app.state.read_sessions, _format(request)
    version = await run_in_threadpool(_study_version, sessions, tenant, study_id)
    draw = functools.partial(_draw_study, sessions, tenant, study_id, path, metric, fmt)
    return await _answer(request, ("study", study_id, fmt, path, metric), version, draw, if_none_match)


async def _answer(
    request: Request, key: Key, version: Key, draw: Callable[[], bytes], if_none_match: str | None
) -> Response:
    """The cached picture of this version, else a new drawing (kept); 304 when the client has this version."""
    fmt = key[2]
    etag = 'W/"' + hashlib.sha256(repr((key, version)).encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match is not None and etag in (tag.strip() for tag in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    cache, threads = _drawing_state(request)
    body = cache.get(key, version)
    if body is None:
        body = await anyio.to_thread.run_sync(draw, limiter=threads)
        cache.put(key, version, body)
    headers["Content-Disposition"] = f'inline; filename="{key[1]}.{fmt}"'
    return Response(body, media_type=drawing.FORMATS[fmt], headers=headers)


def _format(request: Request) -> str:
    """png or svg: the suffix of the route's path."""
    return request.url.path.rpartition(".")[2]


def _drawing_state(request: Request) -> tuple[PlotCache, anyio.CapacityLimiter]:
    """The app's cache and its limit on drawing threads, made at the first plot (in the event loop: no race)."""
    state = request.app.state
    if not hasattr(state, "plot_cache"):
        state.plot_cache = PlotCache(CACHED_PLOTS)
        state.plot_threads = anyio.CapacityLimiter(DRAWING_THREADS)
    return state.plot_cache, state.plot_threads


class PlotCache:
    """The pictures last drawn, least recently used first out; each key keeps only its newest version."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict[Key, tuple[Key, bytes]]()
        self.lock = threading.Lock()  # the drawing threads put, the event loop gets

    def get(self, key: Key, version: Key) -> bytes | None:
        with self.lock:
            stored = self.items.get(key)
            if stored is None or stored[0] != version:
                return None
            self.items.move_to_end(key)
            return stored[1]

    def put(self, key: Key, version: Key, body: bytes) -> None:
        with self.lock:
            self.items[key] = (version, body)
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


# ------------------------------------------------------------------------------------------ in threads
# Each drawing reads what it draws after the version was read: a job or study that changed since is drawn as it is
# now, never older than the version it is kept under.


def _read(sessions: sessionmaker[Session], read: Callable[..., Any], *args: Any) -> Any:
    with sessions() as session:
        return read(session, *args)


def _study_version(sessions: sessionmaker[Session], tenant: str, study_id: str) -> Key:
    with sessions() as session:
        _study(session, tenant, study_id)
        return plots.study_version(session, study_id)


def _draw_job(
    sessions: sessionmaker[Session], tenant: str, job_id: str, names: tuple[str, ...] | None, fmt: str
) -> bytes:
    with sessions() as session:
        job = jobs.get_job(session, tenant, job_id)
        if job is None:
            raise jobs.JobNotFound(job_id)
        try:
            plot = plots.read_job_plot(session, job, names)
        except plots.UnknownName as exc:
            raise _unknown(exc, "query.metrics") from None
    return drawing.draw_job(plot, fmt)


def _draw_study(
    sessions: sessionmaker[Session], tenant: str, study_id: str, path: str | None, metric: str | None, fmt: str
) -> bytes:
    with sessions() as session:
        study = _study(session, tenant, study_id)
        try:
            plot = plots.read_study_plot(session, study, path, metric)
        except plots.UnknownName as exc:
            raise _unknown(exc, f"query.{exc.what}") from None
    return drawing.draw_study(plot, fmt)


def _study(session: Session, tenant: str, study_id: str) -> Study:
    study = studies.get_study(session, tenant, study_id)
    if study is None:
        raise ApiError(404, "not_found", f"no study {study_id}")
    return study


def _unknown(exc: plots.UnknownName, where: str) -> ApiError:
    """422 unknown_metric or unknown_path, naming what is known."""
    return ApiError(422, f"unknown_{exc.what}", str(exc), [problem(where, str(exc), f"unknown_{exc.what}")])


def _names(value: str) -> tuple[str, ...]:
    """The metric names asked for, each once, in the order given; 422 unless they match NAMES_PATTERN."""
    if not re.fullmatch(NAMES_PATTERN, value):
        message = f"metrics are up to {MAX_NAMES} comma-separated metric names of letters, digits and _./-"
        raise ApiError(422, "invalid_request", message, [problem("query.metrics", message, "pattern")])
    return tuple(dict.fromkeys(n.strip() for n in value.split(",")))
