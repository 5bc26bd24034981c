"""Health, readiness, Prometheus metrics, the OpenAPI document, and errors that must never leak a traceback."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from tests.factories import auth_headers, claim, epoch_event, make_spec, record

REDIS_URL = "redis://127.0.0.1:6379/0"
METRICS_TOKEN = "metrics-token-for-tests"


def test_healthz(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_the_database_and_the_filesystem_broker(client: TestClient, settings: Settings):
    r = client.get("/readyz")
    checks = {"database": "ok", "broker": "ok", "storage": "ok", "disk": "ok"}
    assert r.status_code == 200 and r.json() == {"status": "ready", "checks": checks}
    shutil.rmtree(settings.broker_dir)
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert r.json()["error"]["details"]["database"] == "ok"
    assert r.json()["error"]["details"]["broker"].startswith("unreachable")


def test_readyz_pings_a_redis_broker(make_client: Callable[..., TestClient]):
    down = make_client(broker_url="redis://127.0.0.1:1/0").get("/readyz")
    assert down.status_code == 503 and down.json()["error"]["details"]["broker"].startswith("unreachable")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip(f"Redis unreachable at {REDIS_URL}")
    assert make_client(broker_url=REDIS_URL).get("/readyz").status_code == 200


def test_readyz_reports_an_unreachable_database(make_app: Callable[[Settings], FastAPI], make_settings):
    settings = make_settings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    settings.ensure_dirs()
    r = TestClient(make_app(settings)).get("/readyz")  # no lifespan: startup would need the database
    assert r.status_code == 503 and r.json()["error"]["details"]["database"].startswith("unreachable")
    assert r.json()["error"]["details"]["broker"] == "ok"


def test_metrics_exposes_jobs_queue_depth_running_metrics_and_latency(
    make_client: Callable[..., TestClient], sessions: sessionmaker[Session]
):
    client = make_client(metrics_token=METRICS_TOKEN)
    client.post("/v1/jobs", json=make_spec(resources={"device": "cuda"}))
    running = client.post("/v1/jobs", json=make_spec()).json()["id"]
    state = {"early_stopping/wait": 1, "early_stopping/patience": 3}
    record(sessions, running, claim(sessions, running), [epoch_event(1), epoch_event(2, **state)])
    text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert 'trickserve_jobs{status="queued"} 1.0' in text and 'trickserve_jobs{status="running"} 1.0' in text
    assert 'trickserve_queue_depth{queue="gpu"} 1.0' in text and 'trickserve_queue_depth{queue="cpu"} 0.0' in text
    assert f'trickserve_job_metric{{job_id="{running}",name="val/loss"}} 0.75' in text  # epoch 2's value
    assert "early_stopping" not in text  # the callback's state is not a metric
    assert 'trickserve_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"} 2.0' in text


def test_openapi_document_builds_and_every_reference_resolves(client: TestClient):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert {"JobSpec", "DataSpec", "JobPublic", "JobsPage", "MetricsPage", "DatasetPublic", "ErrorBody"} <= set(schemas)
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    assert "/v1/jobs/{job_id}/events" in doc["paths"] and "/v1/datasets" in doc["paths"]
    refs = list(_refs(doc))
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)
    assert client.get("/docs").status_code == 200


def _refs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_unknown_paths_and_methods_answer_json(client: TestClient):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.delete("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_unexpected_errors_are_500_without_details(
    make_app: Callable[[Settings], FastAPI], settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret connection string postgres://admin:hunter2@db")

    monkeypatch.setattr("core.jobs.list_jobs", broken)
    with TestClient(make_app(settings), raise_server_exceptions=False) as client:
        r = client.get("/v1/jobs", headers=auth_headers(client.app, "default"))
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    assert "hunter2" not in r.text and "Traceback" not in r.text and r.json()["error"]["details"]["error_id"]
