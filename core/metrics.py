"""The metric store: the points of a job's epoch_end and test events as rows of metric_point, read by index
ranges (pages by cursor, whole series), and downsampling that keeps a curve's shape. core.jobs writes the rows."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import CompoundSelect, DateTime, Integer, Row, Select, bindparam, func, select, type_coerce, union_all
from sqlalchemy.orm import Session

from core.engine.events import is_metric_name, is_metric_value
from core.models import MetricPoint

MAX_NAME_CHARS = 200  # metric_point.name; the longest name a query can ask for
T = TypeVar("T")
AnyRow = Row[*tuple[Any, ...]]  # a row of whatever columns its query selects

_point = MetricPoint.__table__.c
# `at` as the driver reads it, in UTC: naive on SQLite, aware on PostgreSQL (core.db sets the session's zone).
# Converting it row by row, as UTCDateTime does, would be a third of the cost of a page.
_AT = type_coerce(_point.created_at, DateTime(timezone=True)).label("at")
# A page's row: (cursor, step, epoch, name, value, at, position); the value None stands for NaN.
_PAGE_COLUMNS = (_point.job_event_id, _point.step, _point.epoch, _point.name, _point.value, _AT)


def points_of(event: Mapping[str, Any], job_event_id: int) -> list[dict[str, Any]]:
    """The metric_point rows of a stored epoch_end or test event (a row of job_event, its data JSON-safe): one per
    metric name with a numeric value, NaN as NULL."""
    return [
        {
            "job_id": event["job_id"],
            "name": name,
            "step": event["step"],
            "value": _stored(value),
            "epoch": event["epoch"],
            "attempt": event["attempt"],
            "job_event_id": job_event_id,
            "position": position,
            "created_at": event["created_at"],
        }
        for position, (name, value) in enumerate(event["data"].items())
        if is_metric_name(name) and is_metric_value(value) and len(name) <= MAX_NAME_CHARS
    ]


def _stored(value: int | float | str) -> float | None:
    number = float(value)  # "Infinity" and "-Infinity" too
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class MetricPage:
    """The points of up to `limit` events, in cursor order (then in the order of each event's keys)."""

    points: Sequence[AnyRow]  # (cursor, step, epoch, name, value, at, position); value None is NaN, at in UTC
    next_cursor: int | None  # set when more are stored: the last event of this page
    last_cursor: int  # the last event read, or `after` when none


def read_page(
    session: Session, job_id: str, *, after: int = 0, names: Sequence[str] | None = None, limit: int = 1000
) -> MetricPage:
    """The points of the job's first `limit` metric events after the cursor `after`, of `names` only when given:
    one indexed range scan per name. `limit` counts events, each with one point per name it holds."""
    names = list(names or ())
    params: dict[str, Any] = {"job_id": job_id, "after": after, "fetch": limit + 1}
    params.update({f"name_{i}": name for i, name in enumerate(names)})
    rows = session.execute(_page_query(len(names)), params).all()
    # Up to limit + 1 events were read: the extra one tells that another page follows, and is left out.
    events, end, previous = 0, len(rows), None
    for i, row in enumerate(rows):
        if row[0] != previous:
            events, previous = events + 1, row[0]
            if events > limit:
                end = i
                break
    last = rows[end - 1][0] if end else after
    return MetricPage(rows[:end], last if end < len(rows) else None, last)


@functools.cache
def _page_query(n_names: int) -> Select[Any] | CompoundSelect:
    """The page query for `n_names` names (0: every name), built once per count; bound: job_id, after, fetch
    (events to read), name_0..."""
    job = bindparam("job_id", type_=_point.job_id.type)
    after, fetch = bindparam("after", type_=_point.job_event_id.type), bindparam("fetch", type_=Integer())
    if n_names == 0:
        # Every name: the points of the first `fetch` events, by the (job_id, job_event_id) index.
        first = select(_point.job_event_id).where(_point.job_id == job, _point.job_event_id > after)
        first = first.distinct().order_by(_point.job_event_id).limit(fetch)
        bound = select(func.max(first.subquery().c.job_event_id)).scalar_subquery()
        query = select(*_PAGE_COLUMNS, _point.position)
        query = query.where(_point.job_id == job, _point.job_event_id > after, _point.job_event_id <= bound)
        return query.order_by(_point.job_event_id, _point.position)
    # One range of (job_id, name, job_event_id) per name, each at most `fetch` long: an event has one point per
    # name, so every point of the first `fetch` events is in them.
    series = [
        select(*_PAGE_COLUMNS, _point.position)
        .where(_point.job_id == job, _point.name == bindparam(f"name_{i}"), _point.job_event_id > after)
        .order_by(_point.job_event_id)
        .limit(fetch)
        for i in range(n_names)
    ]
    if n_names == 1:
        return series[0]
    union = union_all(*(select(*s.subquery().c) for s in series))  # SQLite allows LIMIT only in a subquery
    return union.order_by(_point.job_event_id.name, _point.position.name)


# Ranges of (job_id, name, job_event_id): of every name, or of the names bound.
_ALL_SERIES = (
    select(_point.name, _point.job_event_id, _point.step, _point.epoch, _point.value)
    .where(_point.job_id == bindparam("job_id"), _point.job_event_id > bindparam("after"))
    .order_by(_point.name, _point.job_event_id)
)
_SERIES = _ALL_SERIES.where(_point.name.in_(bindparam("names", expanding=True)))


def read_series(
    session: Session, job_id: str, names: Sequence[str] | None = None, *, after: int = 0
) -> dict[str, list[AnyRow]]:
    """Every point after the cursor `after` of each of `names` (an empty list for a name with none), or of every
    name the job has points of (by name), oldest first: rows of (name, cursor, step, epoch, value), None for NaN."""
    series: dict[str, list[AnyRow]] = {name: [] for name in names or ()}
    query, params = (_ALL_SERIES, {}) if names is None else (_SERIES, {"names": list(series)})
    for row in session.execute(query, {"job_id": job_id, "after": after, **params}):
        series.setdefault(row[0], []).append(row)
    return series


def downsample(points: Sequence[T], max_points: int, value: Callable[[T], float | None]) -> list[T]:
    """At most `max_points` (4 or more) of `points`, in their order, keeping the shape of the curve: the first and
    the last point, and between them the lowest and the highest of each of (max_points - 2) // 2 buckets of equal
    count; so the global minimum and maximum are kept too. NaN (a value None) is never a bucket's lowest or highest
    point, and a bucket of NaN only keeps its first point, so that a plot still shows the gap. Infinities are
    the extremes they are."""
    if max_points < 4:
        raise ValueError("max_points must be at least 4")
    n = len(points)
    if n <= max_points:
        return list(points)
    buckets, inner = (max_points - 2) // 2, n - 2
    kept = [0]
    for b in range(buckets):
        start, stop = 1 + b * inner // buckets, 1 + (b + 1) * inner // buckets
        numbers = [(v, i) for i in range(start, stop) if (v := value(points[i])) is not None]
        if numbers:
            kept += sorted({min(numbers)[1], max(numbers)[1]})
        else:
            kept.append(start)  # NaN only
    kept.append(n - 1)
    return [points[i] for i in kept]
