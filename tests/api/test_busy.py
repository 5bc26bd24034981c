"""When a resource runs out the API answers 503 with Retry-After and the error envelope, never 500: the request
pool's connections, or the event streams' own pool."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.factories import make_spec

EXHAUSTIBLE = {"db_pool_size": 1, "db_pool_overflow": 0, "db_pool_timeout_s": 0.2, "sse_db_pool_size": 1}


def assert_busy(answer, code: str) -> None:  # type: ignore[no-untyped-def]
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == code and int(answer.headers["retry-after"]) > 0


def test_an_exhausted_database_pool_answers_503_with_retry_after(make_client: Callable[..., TestClient]):
    client = make_client(**EXHAUSTIBLE)
    assert client.get("/v1/jobs").status_code == 200
    with client.app.state.db.engine.connect():  # every connection of the requests' pool is busy
        assert_busy(client.get("/v1/jobs"), "database_busy")
    assert client.get("/v1/jobs").status_code == 200  # and it serves again once one is free


def test_streams_have_their_own_pool_and_answer_503_before_streaming_when_it_is_exhausted(
    make_client: Callable[..., TestClient],
):
    client = make_client(**EXHAUSTIBLE)
    job_id = client.post("/v1/jobs", json=make_spec()).json()["id"]
    with client.app.state.stream_db.engine.connect():
        assert_busy(client.get(f"/v1/jobs/{job_id}/events"), "database_busy")
        assert client.get(f"/v1/jobs/{job_id}/metrics").status_code == 200  # polling is not starved by streams
    assert client.app.state.hub.feeds == {} and client.app.state.stream_slots.open["default"] == 0


def test_a_database_locked_past_the_busy_timeout_answers_503(make_client: Callable[..., TestClient], settings):
    client = make_client(sqlite_busy_timeout_s=0.2)
    locker = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock for longer than the API waits for it
    try:
        assert_busy(client.post("/v1/jobs", json=make_spec()), "database_busy")
    finally:
        locker.rollback()
        locker.close()
    assert client.post("/v1/jobs", json=make_spec()).status_code == 201
