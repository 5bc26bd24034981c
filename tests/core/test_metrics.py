"""The metric store on a real SQLite file and a real PostgreSQL: points written with their events (numbers only, NaN
as NULL, infinities kept), one per (name, step) across resumes, nothing from a fenced-out attempt, pages that count
events, series by name; and downsampling that keeps a curve's shape."""

from __future__ import annotations

import math
import random
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import jobs, metrics, tenants
from core.db import create_db_engine, init_db, make_sessionmaker
from core.models import utcnow
from tests.factories import claim, epoch_event, expected_points, make_job_spec, record

Sessions = sessionmaker[Session]


def submit(sessions: Sessions) -> str:
    with sessions() as s:
        tenants.create_tenant(session=s, tenant_id="acme")
        spec = make_job_spec(resources={"max_attempts": 3})
        return jobs.create_job(session=s, tenant_id="acme", spec=spec, advice=[]).job_id


def resume(sessions: Sessions, job_id: str, attempt: int, checkpoint_step: int) -> int:
    """The job's current attempt checkpoints at `checkpoint_step` and its worker is lost; the next attempt starts."""
    with sessions() as s:
        assert jobs.set_checkpoint(
            session=s, job_id=job_id, attempt=attempt, key="artifacts/j/attempt-1/ck.pt", step=checkpoint_step
        )
        assert jobs.requeue_expired(session=s, now=utcnow() + timedelta(hours=1)) == [job_id]
    return claim(sessions, job_id, worker="w2")


def page(sessions: Sessions, job_id: str, **kwargs: Any) -> metrics.MetricPage:
    with sessions() as s:
        return metrics.read_page(s, job_id, **kwargs)


def stored(sessions: Sessions, job_id: str) -> list[tuple[Any, ...]]:
    """Every point of the job as (cursor, step, epoch, name, value), in page order."""
    return [tuple(row[:5]) for row in page(sessions, job_id, limit=100_000).points]


def test_points_are_the_numbers_of_epoch_end_and_test_events(session_factory: Sessions) -> None:
    job_id = submit(session_factory)
    attempt = claim(session_factory, job_id)
    odd = {"val/loss": math.nan, "val/acc": math.inf, "lr": -math.inf, "grad/max": 3, "early_stopping/wait": 2,
           "flag": True, "note": "text", "nested": {"a": 1}, "given": "NaN"}  # fmt: skip
    record(session_factory, job_id, attempt, [
        {"kind": "progress", "step": 5, "epoch": 1, "data": {"train/loss": 9.0}},
        epoch_event(1, **odd),
        {"kind": "warning", "step": 10, "epoch": 1, "data": {"value": 1.0}},
        {"kind": "test", "step": 10, "epoch": 1, "data": {"test/loss": 0.25, "test/acc": 0.875}},
    ])  # fmt: skip
    points = stored(session_factory, job_id)
    assert points == expected_points(session_factory, job_id)
    assert [(name, value) for _, _, _, name, value in points] == [
        ("train/loss", 1.0), ("val/loss", None), ("val/acc", math.inf), ("lr", -math.inf), ("grad/max", 3.0),
        ("given", None), ("test/loss", 0.25), ("test/acc", 0.875),
    ]  # fmt: skip
    with session_factory() as s:
        epoch_end, test = (e.job_event_id for e in jobs.list_events(s, job_id, kinds=["epoch_end", "test"]))
    assert [cursor for cursor, *_ in points] == [epoch_end] * 6 + [test] * 2


def test_a_page_counts_events_and_holds_every_point_of_them(session_factory: Sessions) -> None:
    job_id = submit(session_factory)
    attempt = claim(session_factory, job_id)
    record(session_factory, job_id, attempt, [epoch_event(e) for e in range(1, 8)])
    record(session_factory, job_id, attempt, [epoch_event(8, **{"extra/x": 1.0})])  # a name only the last one has
    for names in (None, ["val/loss"], ["val/acc", "val/loss"], ["extra/x", "lr"]):
        whole = page(session_factory, job_id, names=names, limit=100)
        assert whole.next_cursor is None
        seen, after = [], 0
        while True:
            part = page(session_factory, job_id, names=names, after=after, limit=3)
            assert len({row[0] for row in part.points}) <= 3
            seen += part.points
            if part.next_cursor is None:
                assert part.last_cursor == (seen[-1][0] if seen else after)
                break
            after = part.next_cursor
        assert seen == whole.points
        assert {row[3] for row in whole.points} == set(names or ["train/loss", "val/loss", "val/acc", "lr", "extra/x"])
    assert page(session_factory, job_id, names=["nothing"]).points == []
    assert page(session_factory, job_id, after=10**12).last_cursor == 10**12


def test_a_resume_keeps_one_point_per_name_and_step_the_newest_attempts(session_factory: Sessions) -> None:
    job_id = submit(session_factory)
    claim(session_factory, job_id)
    record(session_factory, job_id, 1, [epoch_event(e) for e in range(1, 9)])
    second = resume(session_factory, job_id, 1, checkpoint_step=50)
    assert {step for _, step, *_ in stored(session_factory, job_id)} == {10, 20, 30, 40, 50}  # 60-80 will come again
    before = {(step, name): cursor for cursor, step, _, name, _ in stored(session_factory, job_id)}

    # The checkpoint would not load: the attempt replays from epoch 4, with other values.
    record(session_factory, job_id, second, [epoch_event(e, **{"val/loss": 100.0 + e}) for e in range(4, 11)])
    points = stored(session_factory, job_id)
    assert points == expected_points(session_factory, job_id)
    by_step = {step: (cursor, value) for cursor, step, _, name, value in points if name == "val/loss"}
    assert sorted(by_step) == [10 * e for e in range(1, 11)]  # one point per step
    assert [by_step[10 * e][1] for e in range(4, 11)] == [100.0 + e for e in range(4, 11)]
    assert all(by_step[40][0] > cursor for cursor in before.values())  # the replayed step has the new cursor
    assert by_step[30][0] == before[(30, "val/loss")]


def test_times_are_read_in_utc_whatever_the_servers_zone(empty_db_url: str) -> None:
    init_db(empty_db_url)
    engine = create_db_engine(empty_db_url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE {engine.url.database} SET TimeZone = 'Asia/Tokyo'")
        engine.dispose()  # new connections take the database's zone, unless told otherwise
    sessions = make_sessionmaker(engine)
    job_id = submit(sessions)
    record(sessions, job_id, claim(sessions, job_id), [epoch_event(1)])
    with sessions() as s:
        [event] = jobs.list_events(s, job_id, kinds=["epoch_end"])
    at = page(sessions, job_id, names=["val/loss"]).points[0].at
    assert at.utcoffset() in (None, timedelta(0))  # naive (SQLite) is UTC too
    assert at.replace(tzinfo=event.created_at.tzinfo) == event.created_at
    engine.dispose()


def test_a_fenced_out_attempt_stores_no_points(session_factory: Sessions) -> None:
    job_id = submit(session_factory)
    claim(session_factory, job_id)
    record(session_factory, job_id, 1, [epoch_event(1)])
    resume(session_factory, job_id, 1, checkpoint_step=10)
    with session_factory() as s:
        assert not jobs.record_events(session=s, job_id=job_id, attempt=1, events=[epoch_event(2)])
    assert {step for _, step, *_ in stored(session_factory, job_id)} == {10}


def test_series_are_read_by_name_after_a_cursor(session_factory: Sessions) -> None:
    job_id = submit(session_factory)
    attempt = claim(session_factory, job_id)
    record(
        session_factory, job_id, attempt, [epoch_event(e, **{"val/loss": math.nan if e == 2 else e}) for e in (1, 2, 3)]
    )
    with session_factory() as s:
        series = metrics.read_series(s, job_id, ["val/loss", "nothing", "lr"])
        assert list(series) == ["val/loss", "nothing", "lr"] and series["nothing"] == []
        assert [(row.step, row.epoch, row.value) for row in series["val/loss"]] == [
            (10, 1, 1.0),
            (20, 2, None),
            (30, 3, 3.0),
        ]
        later = metrics.read_series(s, job_id, ["val/loss"], after=series["val/loss"][0].job_event_id)
        assert [row.step for row in later["val/loss"]] == [20, 30]


# ------------------------------------------------------------------------------------------ downsampling


def kept_values(values: list[float | None], max_points: int) -> list[int]:
    """The indexes downsampling keeps of a series of these values."""
    return metrics.downsample(list(range(len(values))), max_points, values.__getitem__)


@pytest.mark.parametrize("max_points", [4, 5, 7, 10, 64, 999])
def test_downsampling_keeps_first_last_min_and_max_in_order(max_points: int) -> None:
    rng = random.Random(max_points)
    for n in (1, 3, max_points, max_points + 1, 2 * max_points + 1, 1000, 2345):
        values = [rng.gauss(0, 1) + i / 100 for i in range(n)]
        kept = kept_values(values, max_points)
        assert len(kept) <= max_points
        assert kept == sorted(set(kept))  # in order, each once
        assert {0, n - 1, values.index(min(values)), values.index(max(values))} <= set(kept)
        if n <= max_points:
            assert kept == list(range(n))


def test_downsampling_never_picks_nan_over_a_number_and_keeps_a_gap_of_nan() -> None:
    # 52 points, max_points 12: the first, the last, and five buckets of ten between them (1-10, 11-20, ...).
    values: list[float | None] = [0.0, *[None] * 14, 5.0, *[None] * 5, *[float(i % 7) for i in range(30)], 1.0]
    values[25], values[35] = math.inf, -math.inf
    kept = kept_values(values, 12)
    assert len(kept) <= 12 and {0, 51} <= set(kept)
    assert [i for i in kept if values[i] is None] == [1]  # the bucket of NaN only keeps one point: the gap shows
    assert 15 in kept  # the one number of a bucket otherwise NaN
    assert {25, 35} <= set(kept)  # infinities are the extremes they are


def test_downsampling_needs_four_points_or_more() -> None:
    with pytest.raises(ValueError):
        metrics.downsample([1, 2, 3], 3, float)
