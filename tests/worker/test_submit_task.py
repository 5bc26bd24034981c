"""The `trickserve.submit_job` and `trickserve.submit_study` tasks run in-process: the same rules as POST /v1/jobs
(core.submit) and POST /v1/studies (core.studies), then enqueue."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa

from core.models import Job, Study, Tenant
from tests.factories import TENANT, Backend, make_spec
from tests.worker.test_dispatch import sent_messages
from worker import runner
from worker.celery_app import SUBMIT_STUDY_TASK, SUBMIT_TASK, WorkerApp


@pytest.fixture
def submit_task(app: WorkerApp):
    """Run the task in this process, on `app` (as a worker runs it), and return its answer."""

    def run(spec: dict, key: str | None = None, tenant: str = TENANT) -> dict:
        return app.tasks[SUBMIT_TASK](spec, idempotency_key=key, tenant=tenant)

    return run


def run(app: WorkerApp, job_id: str) -> str:
    return runner.run_job(job_id, worker_id="w", settings=app.settings, db=app.db)


def test_creates_the_job_with_advice_then_enqueues_it(backend, app, submit_task):
    spec = make_spec(model={"dropout": 0.7})  # outside 0.2-0.5: advice, not a rejection
    answer = submit_task(spec, key="k1", tenant="new-tenant")
    assert answer["status"] == "queued"
    job = backend.load(answer["job_id"])
    assert job.tenant_id == "new-tenant" and job.idempotency_key == "k1" and job.queue == "cpu"
    assert [a["code"] for a in job.advice] == ["DROPOUT_RANGE"]
    assert job.spec["model"]["dropout"] == 0.7 and job.spec["optim"]["betas"] == [0.9, 0.999]  # resolved
    assert sent_messages(app.settings) == [("cpu", [job.job_id])] and job.dispatched_at is not None


def test_same_key_and_spec_returns_the_first_job_and_sends_nothing_for_a_finished_one(backend, app, submit_task):
    first = submit_task(make_spec(), key="same")
    assert run(app, first["job_id"]) == "succeeded"
    assert submit_task(make_spec(), key="same") == {"job_id": first["job_id"], "status": "succeeded"}
    assert len(sent_messages(app.settings)) == 1
    with backend.session(read_only=True) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 1


def test_same_key_with_another_spec_is_rejected(backend, app, submit_task):
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
def test_refused_specs_create_nothing(backend, app, submit_task, overrides, path):
    answer = submit_task(make_spec(**overrides))
    assert answer["status"] == "rejected" and answer["error"]["code"] == "invalid_spec"
    assert answer["error"]["message"].startswith(path)
    with backend.session(read_only=True) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0
    assert sent_messages(app.settings) == []


def test_transfer_needs_a_trained_job_of_the_same_tenant(backend, app, submit_task):
    unfinished = backend.submit(make_spec())
    assert submit_task(make_spec(transfer={"from_job": unfinished.job_id}))["error"]["message"].endswith(
        "has no trained model (it is queued)"
    )
    other_tenant = submit_task(make_spec(), tenant="someone-else")["job_id"]
    run(app, other_tenant)
    answer = submit_task(make_spec(transfer={"from_job": other_tenant}))
    assert answer["status"] == "rejected" and other_tenant in answer["error"]["message"]


def test_cuda_specs_go_to_the_gpu_queue(backend, app, submit_task):
    answer = submit_task(make_spec(resources={"device": "cuda:0"}))
    assert backend.load(answer["job_id"]).queue == "gpu"
    assert sent_messages(app.settings) == [("gpu", [answer["job_id"]])]


def test_a_tenant_over_its_active_job_limit_is_refused(app, submit_task):
    app.settings = app.settings.model_copy(update={"max_active_jobs_per_tenant": 2})
    assert [submit_task(make_spec())["status"] for _ in range(3)] == ["queued", "queued", "rejected"]


def test_a_replay_of_a_queued_job_sends_it_no_second_time(backend, app, submit_task):
    first = submit_task(make_spec(), key="again")
    second = submit_task(make_spec(), key="again")
    assert second == {"job_id": first["job_id"], "status": "queued"}
    assert sent_messages(app.settings) == [("cpu", [first["job_id"]])]


@pytest.mark.parametrize("tenant", ["../etc", "", "a" * 65, "tenant with spaces", 7])
def test_a_bad_tenant_name_is_refused_logged_and_creates_nothing(
    backend: Backend, app: WorkerApp, submit_task, caplog: pytest.LogCaptureFixture, tenant
):
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        answer = submit_task(make_spec(), tenant=tenant)
    assert answer["status"] == "rejected" and answer["error"]["code"] == "invalid_tenant"
    assert any("submit_job rejected" in r.getMessage() and repr(tenant) in r.getMessage() for r in caplog.records)
    with backend.session(read_only=True) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Tenant)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0
    assert sent_messages(app.settings) == []


# ---------------------------------------------------------------------------------------------- studies


def study(**overrides: Any) -> dict[str, Any]:
    body = {"name": "lr", "base": make_spec(), "space": {"optim.lr": {"grid": [0.01, 0.1]}}, "seeds": [0, 1]}
    return {**body, **overrides}


@pytest.fixture
def submit_study(app: WorkerApp):
    """Run the study task in this process, on `app`, and return its answer."""

    def run(spec: dict, key: str | None = None, tenant: str = TENANT) -> dict:
        return app.tasks[SUBMIT_STUDY_TASK](spec, idempotency_key=key, tenant=tenant)

    return run


def trials_of(backend: Backend, study_id: str) -> list[Job]:
    with backend.session(read_only=True) as session:
        return list(session.scalars(sa.select(Job).where(Job.study_id == study_id).order_by(Job.trial_number)))


def test_a_study_is_stored_and_its_first_trials_sent_and_the_same_key_replays_it(backend, app, submit_study):
    answer = submit_study(study(max_concurrent=3), key="s1", tenant="new-tenant")
    assert answer["status"] == "queued"
    with backend.session(read_only=True) as session:
        stored = session.get_one(Study, answer["study_id"])
    assert (stored.tenant_id, stored.idempotency_key, stored.trials_planned) == ("new-tenant", "s1", 4)
    trials = trials_of(backend, answer["study_id"])
    assert [t.trial_number for t in trials] == [0, 1, 2] and {t.tenant_id for t in trials} == {"new-tenant"}
    assert all(t.dispatched_at is not None and t.spec["optim"]["lr"] == t.params["optim.lr"] for t in trials)
    assert sent_messages(app.settings) == sorted(("cpu", [t.job_id]) for t in trials)

    assert submit_study(study(max_concurrent=3), key="s1", tenant="new-tenant") == answer
    conflict = submit_study(study(max_concurrent=2), key="s1", tenant="new-tenant")
    assert conflict["study_id"] is None and conflict["error"]["code"] == "idempotency_key_reused"
    assert len(trials_of(backend, answer["study_id"])) == 3 and len(sent_messages(app.settings)) == 3


@pytest.mark.parametrize(
    ("overrides", "tenant", "code", "message"),
    [
        ({"space": {"model.dropout": {"grid": [0.1, 1.5]}}}, TENANT, "invalid_spec", "space.model.dropout: 1.5: "),
        ({"base": make_spec(train={"epochs": 0})}, TENANT, "invalid_spec", "base.train.epochs: "),
        ({}, "../etc", "invalid_tenant", "tenant ids are"),
    ],
)  # fmt: skip
def test_a_refused_study_is_answered_with_its_code_and_creates_nothing(
    backend, app, submit_study, caplog: pytest.LogCaptureFixture, overrides, tenant, code, message
):
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        answer = submit_study(study(**overrides), tenant=tenant)
    assert answer["study_id"] is None and answer["status"] == "rejected" and answer["error"]["code"] == code
    assert message in answer["error"]["message"]
    assert any("submit_study rejected" in r.getMessage() for r in caplog.records)
    with backend.session(read_only=True) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Study)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0
    assert sent_messages(app.settings) == []


def test_a_study_over_the_services_trial_limit_is_refused(app, submit_study):
    app.settings = app.settings.model_copy(update={"max_study_trials": 3})
    answer = submit_study(study())
    assert answer["error"] == {"code": "too_many_trials", "message": "2 points x 2 seeds = 4 trials; at most 3"}
    assert submit_study(study(seeds=[0]))["status"] == "queued"
