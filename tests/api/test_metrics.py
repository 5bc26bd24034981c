"""GET /v1/jobs/{id}/metrics: per-epoch points for pollers, bounded pages, name filter, cursors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.factories import claim, epoch_event, make_spec, record

EPOCHS = 5
TEST_EVENT = {"kind": "test", "step": EPOCHS * 10, "epoch": EPOCHS, "data": {"test/loss": 0.3, "test/acc": 0.9}}


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
