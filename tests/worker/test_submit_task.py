"""The `trickserve.submit_job` task run in-process: the same rules as POST /v1/jobs (core.submit), then enqueue."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from core.config import Settings
from core.db import session_scope
from core.models import Job
from tests.worker.conftest import TENANT, load, make_spec, submit
from tests.worker.test_dispatch import sent_messages
from worker import celery_app, runner, tasks


@pytest.fixture
def app(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(celery_app, "app", celery_app.create_app(settings))
    return settings


def submit_task(spec: dict, key: str | None = None, tenant: str = TENANT) -> dict:
    return tasks.submit_job(spec, idempotency_key=key, tenant=tenant)


def test_creates_the_job_with_advice_then_enqueues_it(app):
    spec = make_spec(model={"dropout": 0.7})  # outside 0.2-0.5: advice, not a rejection
    answer = submit_task(spec, key="k1", tenant="new-tenant")
    assert answer["status"] == "queued"
    job = load(answer["job_id"])
    assert job.tenant_id == "new-tenant" and job.idempotency_key == "k1" and job.queue == "cpu"
    assert [a["code"] for a in job.advice] == ["DROPOUT_RANGE"]
    assert job.spec["model"]["dropout"] == 0.7 and job.spec["optim"]["betas"] == [0.9, 0.999]  # resolved
    assert sent_messages(app) == [("cpu", [job.job_id])] and job.dispatched_at is not None


def test_same_key_and_spec_returns_the_first_job_and_sends_nothing_for_a_finished_one(app):
    first = submit_task(make_spec(), key="same")
    assert runner.run_job(first["job_id"], worker_id="w", settings=app) == "succeeded"
    assert submit_task(make_spec(), key="same") == {"job_id": first["job_id"], "status": "succeeded"}
    assert len(sent_messages(app)) == 1
    with session_scope(read_only=True) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 1


def test_same_key_with_another_spec_is_rejected(app):
    submit_task(make_spec(), key="k")
    answer = submit_task(make_spec(name="other"), key="k")
    assert answer["job_id"] is None and answer["error"]["code"] == "idempotency_conflict"


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"data": {"dataset": "/etc/secrets.csv"}}, "data.dataset"),
        ({"transfer": {"from_path": "/srv/other-tenant/model.safetensors"}}, "transfer.from_path"),
        ({"data": {"dataset": "ds_nosuchdataset"}}, "data.dataset"),
        ({"transfer": {"from_job": "job_nosuchjob"}}, "transfer.from_job"),
    ],
)
def test_refused_specs_create_nothing(app, overrides, path):
    answer = submit_task(make_spec(**overrides))
    assert answer["status"] == "rejected" and answer["error"]["code"] == "invalid_spec"
    assert answer["error"]["message"].startswith(path)
    with session_scope(read_only=True) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0
    assert sent_messages(app) == []


def test_transfer_needs_a_trained_job_of_the_same_tenant(app):
    unfinished = submit(make_spec())
    assert submit_task(make_spec(transfer={"from_job": unfinished.job_id}))["error"]["message"].endswith(
        "has no trained model (it is queued)"
    )
    other_tenant = submit_task(make_spec(), tenant="someone-else")["job_id"]
    runner.run_job(other_tenant, worker_id="w", settings=app)
    answer = submit_task(make_spec(transfer={"from_job": other_tenant}))
    assert answer["status"] == "rejected" and other_tenant in answer["error"]["message"]


def test_cuda_specs_go_to_the_gpu_queue(app):
    answer = submit_task(make_spec(resources={"device": "cuda:0"}))
    assert load(answer["job_id"]).queue == "gpu" and sent_messages(app) == [("gpu", [answer["job_id"]])]


def test_a_tenant_over_its_active_job_limit_is_refused(app, monkeypatch):
    monkeypatch.setattr(app, "max_active_jobs_per_tenant", 2)
    monkeypatch.setattr(tasks, "get_settings", lambda: app)
    assert [submit_task(make_spec())["status"] for _ in range(3)] == ["queued", "queued", "rejected"]


def test_a_replay_of_a_queued_job_sends_it_no_second_time(app):
    first = submit_task(make_spec(), key="again")
    second = submit_task(make_spec(), key="again")
    assert second == {"job_id": first["job_id"], "status": "queued"}
    assert sent_messages(app) == [("cpu", [first["job_id"]])]
