"""Prometheus metrics: request latency from a middleware, job gauges read from the database at each scrape."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.engine.events import EventKind, is_metric_name
from core.models import Job, JobEvent, JobStatus

log = logging.getLogger(__name__)
MAX_RUNNING_SERIES = 100  # running jobs whose latest metrics are exported; bounds the scrape's size
QUEUES = ("cpu", "gpu")
SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class Monitoring:
    """The app's own registry (apps built side by side in one process do not share series)."""

    def __init__(self, read_sessions: sessionmaker[Session]):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "trickserve_http_request_duration_seconds",
            "Time from the request to the start of its answer (s)",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(JobsCollector(read_sessions))


class LatencyMiddleware:
    """Observes each request's time to the start of its answer, labelled by route template (not the raw path)."""

    def __init__(self, app: ASGIApp, monitoring: Monitoring):
        self.app, self.latency = app, monitoring.latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, answered = time.perf_counter(), False

        async def timed_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self._observe(scope, message["status"], start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            if not answered:
                self._observe(scope, 500, start)
            raise

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "(unmatched)"
        self.latency.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)


class JobsCollector(Collector):
    """Jobs by status, queue depth, and the latest epoch metrics of running jobs, read at scrape time."""

    def __init__(self, read_sessions: sessionmaker[Session]):
        self.sessions = read_sessions

    def collect(self) -> Iterator[Metric]:
        try:
            with self.sessions() as session:
                counts = session.execute(select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue))
                counts = counts.all()
                latest = _latest_epoch_events(session)
        except Exception as exc:  # noqa: BLE001 - a scrape still reports the request metrics
            log.warning("metrics: cannot read jobs: %s", exc)
            return
        yield from _job_gauges(counts)
        yield _metric_gauge(latest)


def _job_gauges(counts: list[Any]) -> Iterator[Metric]:
    by_status: Counter[str] = Counter()
    depth: Counter[str] = Counter(dict.fromkeys(QUEUES, 0))
    for status, queue, n in counts:
        by_status[str(status)] += n
        if status == JobStatus.queued:
            depth[queue] += n
    jobs = GaugeMetricFamily("trickserve_jobs", "Jobs by status", labels=["status"])
    for status in JobStatus:
        jobs.add_metric([status.value], by_status[status.value])
    queued = GaugeMetricFamily("trickserve_queue_depth", "Queued jobs waiting for a worker", labels=["queue"])
    for queue, n in sorted(depth.items()):
        queued.add_metric([queue], n)
    yield jobs
    yield queued


def _metric_gauge(events: list[JobEvent]) -> Metric:
    gauge = GaugeMetricFamily(
        "trickserve_job_metric", "Latest epoch metrics of running jobs", labels=["job_id", "name"]
    )
    for event in events:
        for name, value in sorted(event.data.items()):
            number = _number(value) if is_metric_name(name) else None
            if number is not None:
                gauge.add_metric([event.job_id, name], number)
    return gauge


def _latest_epoch_events(session: Session) -> list[JobEvent]:
    running = select(Job.job_id).where(Job.status == JobStatus.running).order_by(Job.job_id)
    last = (
        select(func.max(JobEvent.job_event_id))
        .where(JobEvent.job_id.in_(running.limit(MAX_RUNNING_SERIES)), JobEvent.kind == EventKind.epoch_end)
        .group_by(JobEvent.job_id)
    )
    return list(session.scalars(select(JobEvent).where(JobEvent.job_event_id.in_(last))))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    return SPECIAL.get(value) if isinstance(value, str) else None
