"""GET /v1/jobs/{id}/metrics (per-epoch points for pollers: bounded pages, name filter, cursors) and
GET /v1/jobs/{id}/metrics/series (columns for plots, downsampled), on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.schemas import MetricSeries, MetricsPage
from core import jobs
from core.models import utcnow
from tests.factories import as_tenant, claim, epoch_event, expected_points, make_spec, record

EPOCHS = 5
TEST_EVENT = {"kind": "test", "step": EPOCHS * 10, "epoch": EPOCHS, "data": {"test/loss": 0.3, "test/acc": 0.9}}
SPECIAL = {"NaN": None, "Infinity": math.inf, "-Infinity": -math.inf}


@pytest.fixture
def client(make_client: Callable[..., TestClient], db_url: str) -> TestClient:
    return make_client(database_url=db_url)


@pytest.fixture
def sessions(client: TestClient) -> sessionmaker[Session]:
    return client.app.state.sessions


def all_points(client: TestClient, job_id: str, **params: Any) -> list[dict[str, Any]]:
    """Every point, page after page, each page checked against the documented schema."""
    points, after = [], None
    while True:
        page = client.get(f"/v1/jobs/{job_id}/metrics", params={**params, **({"after": after} if after else {})})
        points += MetricsPage.model_validate(page.json()).model_dump(mode="json")["items"]
        if (after := page.json()["next_cursor"]) is None:
            return points


def series(client: TestClient, job_id: str, **params: Any) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}/metrics/series", params=params)
    assert r.status_code == 200, r.text
    MetricSeries.model_validate(r.json())
    return r.json()


@pytest.fixture
def job_id(client: TestClient, sessions: sessionmaker[Session]) -> str:
    """A running job with five epochs, progress events between them, and a test result."""
    job_id = client.post("/v1/jobs", json=make_spec()).json()["id"]
    attempt = claim(sessions, job_id)
    for epoch in range(1, EPOCHS + 1):
        progress = {"kind": "progress", "step": epoch * 10 - 5, "epoch": epoch, "data": {"train/loss": 9.0}}
        record(sessions, job_id, attempt, [progress, epoch_event(epoch)])
    record(sessions, job_id, attempt, [TEST_EVENT])
    return job_id


def test_points_come_from_epoch_end_and_test_events_only(client: TestClient, job_id: str):
    page = client.get(f"/v1/jobs/{job_id}/metrics").json()
    points = page["items"]
    assert len(points) == EPOCHS * 4 + 2  # train/loss, val/loss, val/acc, lr per epoch; test loss and acc
    assert 9.0 not in [p["value"] for p in points]  # progress events are not per-epoch points
    first = next(p for p in points if p["name"] == "val/loss")
    assert (first["epoch"], first["step"], first["value"]) == (1, 10, 1.5)
    assert {"cursor", "step", "epoch", "name", "value", "at"} == set(first)
    assert points[-1]["name"].startswith("test/")
    assert page["next_cursor"] is None and page["last_cursor"] == points[-1]["cursor"]


def test_points_carry_the_time_of_their_event(client: TestClient, job_id: str, sessions: sessionmaker[Session]):
    with sessions() as s:
        at = {e.job_event_id: e.created_at for e in jobs.list_events(s, job_id, kinds=["epoch_end", "test"])}
    for point in client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]:
        assert point["at"] == at[point["cursor"]].isoformat().replace("+00:00", "Z")


def test_a_replayed_batch_adds_no_points(client: TestClient, job_id: str, sessions: sessionmaker[Session]):
    before = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    record(sessions, job_id, 1, [epoch_event(EPOCHS), TEST_EVENT])  # a flush retried after its commit got lost
    assert client.get(f"/v1/jobs/{job_id}/metrics").json()["items"] == before


def test_early_stopping_state_is_not_a_metric(client: TestClient, job_id: str, sessions: sessionmaker[Session]):
    last = client.get(f"/v1/jobs/{job_id}/metrics").json()["last_cursor"]
    state = {"early_stopping/wait": 1, "early_stopping/patience": 3, "early_stopping/best": 1.5}
    record(sessions, job_id, 1, [epoch_event(EPOCHS + 1, **state)])
    new = client.get(f"/v1/jobs/{job_id}/metrics", params={"after": last}).json()["items"]
    assert sorted(p["name"] for p in new) == ["lr", "train/loss", "val/acc", "val/loss"]
    asked = client.get(f"/v1/jobs/{job_id}/metrics", params={"names": "early_stopping/wait,val/acc"}).json()
    assert {p["name"] for p in asked["items"]} == {"val/acc"}


def test_names_filter_and_pages(client: TestClient, job_id: str):
    seen, after, pages = [], None, 0
    while True:
        params = {"names": "val/loss,val/acc", "limit": 2, **({"after": after} if after is not None else {})}
        page = client.get(f"/v1/jobs/{job_id}/metrics", params=params).json()
        pages += 1
        assert {p["name"] for p in page["items"]} <= {"val/loss", "val/acc"}
        seen += [(p["epoch"], p["name"]) for p in page["items"]]
        after = page["next_cursor"]
        if after is None:
            break
    assert pages == 3  # five epochs, two per page; the test event has neither name
    assert seen == [(e, n) for e in range(1, EPOCHS + 1) for n in ("val/loss", "val/acc")]


def test_polling_from_last_cursor_gets_only_new_points(
    client: TestClient, job_id: str, sessions: sessionmaker[Session]
):
    page = client.get(f"/v1/jobs/{job_id}/metrics", params={"names": "val/acc"}).json()
    assert len(page["items"]) == EPOCHS
    empty = client.get(f"/v1/jobs/{job_id}/metrics", params={"after": page["last_cursor"], "names": "val/acc"}).json()
    assert empty["items"] == [] and empty["last_cursor"] == page["last_cursor"]
    record(sessions, job_id, 1, [epoch_event(6, **{"val/loss": float("nan")})])
    new = client.get(f"/v1/jobs/{job_id}/metrics", params={"after": page["last_cursor"], "names": "val/loss"}).json()
    assert [(p["epoch"], p["value"]) for p in new["items"]] == [(6, "NaN")]


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"after": "abc"}, 400, "invalid_cursor"),
        ({"after": "-1"}, 400, "invalid_cursor"),
        ({"after": "9" * 40}, 400, "invalid_cursor"),
        ({"names": "val/loss,bad name!"}, 422, "invalid_request"),
        ({"limit": 101}, 422, "invalid_request"),
        ({"limit": 0}, 422, "invalid_request"),
    ],
)
def test_bad_parameters(client: TestClient, job_id: str, params: dict, status: int, code: str):
    r = client.get(f"/v1/jobs/{job_id}/metrics", params=params)
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_pages_serve_every_point_the_events_hold(client: TestClient, job_id: str, sessions: sessionmaker[Session]):
    for limit in (1, 2, 100):
        served = [
            (p["cursor"], p["step"], p["epoch"], p["name"], p["value"]) for p in all_points(client, job_id, limit=limit)
        ]
        assert served == expected_points(sessions, job_id)


def test_nan_and_infinities_are_served_as_words(client: TestClient, job_id: str, sessions: sessionmaker[Session]):
    odd = {"val/loss": float("nan"), "val/acc": float("inf"), "lr": float("-inf")}
    record(sessions, job_id, 1, [epoch_event(EPOCHS + 1, **odd)])
    last = all_points(client, job_id, names="val/loss,val/acc,lr")[-3:]
    assert [p["value"] for p in last] == ["NaN", "Infinity", "-Infinity"]
    columns = series(client, job_id, names="val/loss,val/acc,lr")["series"]
    assert [columns[name]["value"][-1] for name in ("val/loss", "val/acc", "lr")] == ["NaN", "Infinity", "-Infinity"]


def test_a_resumed_job_serves_one_point_per_step_the_newest_attempts(
    client: TestClient, job_id: str, sessions: sessionmaker[Session]
):
    first = all_points(client, job_id, names="val/loss")
    with sessions() as s:
        assert jobs.set_checkpoint(session=s, job_id=job_id, attempt=1, key="artifacts/j/attempt-1/ck.pt", step=30)
        assert jobs.requeue_expired(session=s, now=utcnow() + timedelta(hours=1)) == [job_id]
    attempt = claim(sessions, job_id, worker="w2")
    record(sessions, job_id, attempt, [epoch_event(e, **{"val/loss": 10.0 * e}) for e in range(4, EPOCHS + 3)])

    points = all_points(client, job_id, names="val/loss", limit=2)
    assert [(p["epoch"], p["value"]) for p in points] == [(e, 1.5 / e) for e in (1, 2, 3)] + [
        (e, 10.0 * e) for e in range(4, EPOCHS + 3)
    ]
    assert points[:3] == first[:3]  # before the checkpoint: the first attempt's, cursors and all
    assert min(p["cursor"] for p in points[3:]) > first[-1]["cursor"]  # replayed steps come again, after the cursor
    columns = series(client, job_id, names="val/loss")["series"]["val/loss"]
    assert columns["step"] == [p["step"] for p in points] and columns["cursor"] == [p["cursor"] for p in points]


def test_series_are_columns_by_name(client: TestClient, job_id: str):
    answer = series(client, job_id, names="val/acc,nothing,val/loss")
    assert list(answer["series"]) == ["val/acc", "nothing", "val/loss"]
    loss = answer["series"]["val/loss"]
    points = all_points(client, job_id, names="val/loss")
    assert loss == {
        "step": [p["step"] for p in points],
        "epoch": [p["epoch"] for p in points],
        "value": [p["value"] for p in points],
        "cursor": [p["cursor"] for p in points],
        "total": EPOCHS,
    }
    assert answer["series"]["nothing"] == {"step": [], "epoch": [], "value": [], "cursor": [], "total": 0}
    everything = series(client, job_id)["series"]
    assert sorted(everything) == ["lr", "test/acc", "test/loss", "train/loss", "val/acc", "val/loss"]
    assert everything["val/loss"] == loss


def test_series_poll_from_the_last_cursor(client: TestClient, job_id: str, sessions: sessionmaker[Session]):
    answer = series(client, job_id, names="val/loss")
    assert answer["last_cursor"] == answer["series"]["val/loss"]["cursor"][-1]
    again = series(client, job_id, names="val/loss", after=answer["last_cursor"])
    assert again["series"]["val/loss"]["step"] == [] and again["last_cursor"] == answer["last_cursor"]
    record(sessions, job_id, 1, [epoch_event(EPOCHS + 1)])
    new = series(client, job_id, names="val/loss", after=answer["last_cursor"])["series"]["val/loss"]
    assert new["epoch"] == [EPOCHS + 1] and new["total"] == 1


@pytest.mark.parametrize("max_points", [4, 9, 50])
def test_downsampled_series_keep_the_shape_of_the_curve(
    client: TestClient, sessions: sessionmaker[Session], max_points: int
):
    job_id = client.post("/v1/jobs", json=make_spec()).json()["id"]
    attempt = claim(sessions, job_id)
    values = [math.sin(e / 7) + (e % 5) / 10 for e in range(1, 301)]
    values[97], values[211] = float("nan"), 3.0  # a hole, and a spike that must survive
    record(sessions, job_id, attempt, [epoch_event(e, **{"val/loss": v}) for e, v in enumerate(values, 1)])

    full = series(client, job_id, names="val/loss")["series"]["val/loss"]
    cut = series(client, job_id, names="val/loss", max_points=max_points)["series"]["val/loss"]
    assert cut["total"] == full["total"] == 300
    assert 4 <= len(cut["step"]) <= max_points
    assert cut["step"] == sorted(set(cut["step"]))  # in step order, each once
    kept = dict(zip(cut["step"], cut["value"], strict=True))
    numbers = [(v, s) for s, v in zip(full["step"], full["value"], strict=True) if v != "NaN"]
    must = {full["step"][0], full["step"][-1], min(numbers)[1], max(numbers)[1]}
    assert must <= set(kept) and kept[max(numbers)[1]] == 3.0
    for column in ("epoch", "cursor", "value"):  # each kept point is whole
        assert [full[column][full["step"].index(s)] for s in cut["step"]] == cut[column]


@pytest.mark.parametrize(
    ("params", "status", "where"),
    [
        ({"max_points": 3}, 422, "query.max_points"),
        ({"max_points": 10_001}, 422, "query.max_points"),
        ({"max_points": "many"}, 422, "query.max_points"),
        ({"names": "val/loss,bad name!"}, 422, "query.names"),
        ({"after": "abc"}, 400, None),
    ],
)
def test_bad_series_parameters(client: TestClient, job_id: str, params: dict, status: int, where: str | None):
    r = client.get(f"/v1/jobs/{job_id}/metrics/series", params=params)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == ("invalid_request" if status == 422 else "invalid_cursor")
    if where:
        assert [d["path"] for d in error["details"]] == [where]


def test_another_tenants_metrics_are_not_found(client: TestClient, job_id: str):
    intruder = as_tenant(client, "intruder")
    for path in ("metrics", "metrics/series"):
        assert intruder.get(f"/v1/jobs/{job_id}/{path}").status_code == 404
        assert intruder.get(f"/v1/jobs/{job_id}/{path}", params={"names": "val/loss"}).json()["error"]["code"] == (
            "not_found"
        )
        assert client.get(f"/v1/jobs/job_nonexistent/{path}").status_code == 404


def test_the_largest_cursor_reads_nothing_new(client: TestClient, job_id: str):
    for path in ("metrics", "metrics/series"):
        r = client.get(f"/v1/jobs/{job_id}/{path}", params={"after": "9" * 18})
        assert r.status_code == 200 and r.json()["last_cursor"] == int("9" * 18)
