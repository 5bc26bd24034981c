"""Idempotency-Key on POST /v1/jobs: one job and one dispatch per (tenant, key), sequentially and under 20
concurrent requests on a real server (SQLite and PostgreSQL); another body is 422; keys last at least 24 h."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import create_db_engine, make_sessionmaker
from core.models import Job, utcnow
from tests.api.conftest import RecordingEnqueue
from tests.factories import as_tenant, make_spec

KEY = {"Idempotency-Key": "nightly-2024-06-01"}
CONCURRENT = 20


def job_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def test_a_repeated_request_replays_the_same_answer(
    client: TestClient, enqueue: RecordingEnqueue, sessions: sessionmaker[Session]
):
    first = client.post("/v1/jobs", json=make_spec(), headers=KEY)
    again = client.post("/v1/jobs", json=make_spec(), headers=KEY)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert job_count(sessions) == 1 and enqueue.calls == [(first.json()["id"], "cpu")]


def test_the_same_key_with_another_body_is_422_and_creates_nothing(
    client: TestClient, enqueue: RecordingEnqueue, sessions: sessionmaker[Session]
):
    client.post("/v1/jobs", json=make_spec(), headers=KEY)
    r = client.post("/v1/jobs", json=make_spec(train={"epochs": 4}), headers=KEY)
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert job_count(sessions) == 1 and len(enqueue.calls) == 1


def test_equivalent_bodies_are_the_same_request(client: TestClient, sessions: sessionmaker[Session]):
    first = client.post("/v1/jobs", json=make_spec(), headers=KEY).json()
    spelled_out = make_spec(optim={"weight_decay": 0.0, "grad_clip": None})  # the defaults, written down
    assert client.post("/v1/jobs", json=spelled_out, headers=KEY).json()["id"] == first["id"]


def test_the_key_belongs_to_the_tenant(client: TestClient, enqueue: RecordingEnqueue):
    mine = client.post("/v1/jobs", json=make_spec(), headers=KEY)
    theirs = as_tenant(client, "other").post("/v1/jobs", json=make_spec(train={"epochs": 9}), headers=KEY)
    assert (mine.status_code, theirs.status_code) == (201, 201)  # no conflict, and no replay of my job
    assert mine.json()["id"] != theirs.json()["id"] and len(enqueue.calls) == 2


def test_keys_are_honoured_after_24_hours(
    client: TestClient, enqueue: RecordingEnqueue, sessions: sessionmaker[Session]
):
    first = client.post("/v1/jobs", json=make_spec(), headers=KEY).json()
    with sessions() as s:
        s.execute(update(Job).values(created_at=utcnow() - timedelta(hours=25)))
        s.commit()
    again = client.post("/v1/jobs", json=make_spec(), headers=KEY)
    assert again.status_code == 200 and again.json()["id"] == first["id"] and len(enqueue.calls) == 1


def test_requests_without_a_key_are_independent(client: TestClient, sessions: sessionmaker[Session]):
    client.post("/v1/jobs", json=make_spec())
    client.post("/v1/jobs", json=make_spec())
    assert job_count(sessions) == 2


def test_concurrent_duplicates_make_one_job_and_one_dispatch(
    make_server: Callable[..., Any], enqueue: RecordingEnqueue, db_url: str
):
    served = make_server(database_url=db_url)
    barrier = threading.Barrier(CONCURRENT)

    def post(_: int) -> httpx.Response:
        with served.client(timeout=60) as http:
            barrier.wait()  # every request leaves at once
            return http.post("/v1/jobs", json=make_spec(), headers=KEY)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(post, range(CONCURRENT)))

    assert all(r.status_code in (200, 201) for r in answers), [r.text for r in answers if r.status_code >= 300]
    assert sorted(r.status_code for r in answers) == [200] * (CONCURRENT - 1) + [201]
    assert len({r.json()["id"] for r in answers}) == 1
    engine = create_db_engine(db_url)
    try:
        assert job_count(make_sessionmaker(engine)) == 1
    finally:
        engine.dispose()
    assert enqueue.calls == [(answers[0].json()["id"], "cpu")]
