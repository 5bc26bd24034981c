"""Tenant isolation: another tenant's job or dataset answers 404 on every operation (streams and downloads too),
specs cannot refer to it, lists and quotas never show it; clients cannot set server fields (mass assignment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.models import Job
from tests.factories import as_tenant, claim, epoch_event, finish, make_spec, npz_bytes, record


@dataclass
class Owned:
    """What tenant `default` owns: a finished job with a model and events, a queued job, a dataset."""

    job: str
    queued: str
    dataset: str


@pytest.fixture
def owned(client: TestClient, sessions: sessionmaker[Session]) -> Owned:
    ds = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes())}).json()["id"]
    job = client.post("/v1/jobs", json=make_spec()).json()["id"]
    attempt = claim(sessions, job)
    record(sessions, job, attempt, [epoch_event(1)])
    model = client.app.state.settings.artifact_dir / job / "attempt-1" / "model.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    finish(sessions, job, attempt, model_key=f"artifacts/{job}/attempt-1/model.safetensors")
    queued = client.post("/v1/jobs", json=make_spec(name="waiting")).json()["id"]
    return Owned(job, queued, ds)


@pytest.fixture
def intruder(client: TestClient) -> TestClient:
    return as_tenant(client, "intruder")


def object_operations(client: TestClient, owned: Owned) -> list[tuple[str, str]]:
    """(method, url) of every operation in the OpenAPI document that names a job or a dataset, with owned ids."""
    paths = client.get("/openapi.json").json()["paths"]
    operations = [
        (method.upper(), path.format(job_id=owned.job, dataset_id=owned.dataset))
        for path, ops in paths.items()
        if "{job_id}" in path or "{dataset_id}" in path
        for method in ops
    ]
    assert len(operations) >= 8  # read, cancel, transitions, model, spec, metrics, events, dataset
    return operations


def test_every_operation_on_another_tenants_object_is_404(
    client: TestClient, intruder: TestClient, owned: Owned, sessions: sessionmaker[Session]
):
    for method, url in object_operations(client, owned):
        theirs = intruder.request(method, url)
        assert theirs.status_code == 404, (method, url, theirs.text)
        assert theirs.json()["error"]["code"] == "not_found"
        mine = client.request(method, url)  # the owner gets an answer: the 404 above is about tenancy
        assert mine.status_code == 200, (method, url, mine.text)
    r = intruder.post(f"/v1/jobs/{owned.queued}/cancel")
    assert r.status_code == 404
    with sessions() as s:
        assert s.get(Job, owned.queued).status == "queued"  # nothing happened to it


def test_a_foreign_id_looks_exactly_like_a_missing_one(client: TestClient, intruder: TestClient, owned: Owned):
    foreign = intruder.get(f"/v1/jobs/{owned.job}").json()["error"]
    missing = intruder.get("/v1/jobs/job_doesnotexist00000000").json()["error"]
    assert foreign["message"].replace(owned.job, "ID") == missing["message"].replace("job_doesnotexist00000000", "ID")


def test_the_event_stream_and_the_model_download_are_404(client: TestClient, intruder: TestClient, owned: Owned):
    with intruder.stream("GET", f"/v1/jobs/{owned.job}/events") as r:
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    r = intruder.get(f"/v1/jobs/{owned.job}/model")
    assert r.status_code == 404 and b"weights" not in r.content
    with client.stream("GET", f"/v1/jobs/{owned.job}/events") as r:
        assert r.status_code == 200 and "epoch_end" in r.read().decode()
    assert client.get(f"/v1/jobs/{owned.job}/model").content == b"weights"


def test_lists_and_quotas_show_only_the_callers_objects(client: TestClient, intruder: TestClient, owned: Owned):
    assert intruder.get("/v1/jobs").json()["items"] == []
    assert intruder.get("/v1/datasets").json()["items"] == []
    assert intruder.get("/v1/quotas").json()["usage"] == {
        "active_jobs": 0, "open_streams": 0, "datasets": 0, "dataset_bytes": 0
    }  # fmt: skip
    assert {j["id"] for j in client.get("/v1/jobs").json()["items"]} == {owned.job, owned.queued}
    assert client.get("/v1/quotas").json()["usage"]["active_jobs"] == 1


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/specs/validate"])
@pytest.mark.parametrize(
    ("field", "spec_of"),
    [
        ("data.dataset", lambda ids: make_spec(data={"dataset": ids["dataset"]})),
        ("transfer.from_job", lambda ids: make_spec(transfer={"from_job": ids["job"]})),
    ],
)
def test_a_spec_cannot_use_another_tenants_dataset_or_model(
    client: TestClient, intruder: TestClient, owned: Owned, route: str, field: str, spec_of: Any
):
    foreign = intruder.post(route, json=spec_of({"dataset": owned.dataset, "job": owned.job}))
    missing = intruder.post(route, json=spec_of({"dataset": "ds_nosuchdataset1", "job": "job_nosuchjob0000000000"}))
    for r in (foreign, missing):
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"
        assert [d["path"] for d in r.json()["error"]["details"]] == [field]
    assert client.post(route, json=spec_of({"dataset": owned.dataset, "job": owned.job})).status_code in (200, 201)
    assert intruder.get("/v1/jobs").json()["items"] == []


def test_another_tenants_streams_do_not_count_against_mine(make_server: Any):
    served = make_server(sse_max_connections_per_tenant=1)
    with served.client(timeout=5) as mine, served.client("other", timeout=5) as theirs:
        my_job = mine.post("/v1/jobs", json=make_spec()).json()["id"]
        their_job = theirs.post("/v1/jobs", json=make_spec()).json()["id"]
        with mine.stream("GET", f"/v1/jobs/{my_job}/events") as r:
            assert r.status_code == 200
            with theirs.stream("GET", f"/v1/jobs/{their_job}/events") as r2:
                assert r2.status_code == 200


# ------------------------------------------------------------------------------------ mass assignment

SERVER_FIELDS = ["tenant_id", "tenant", "status", "attempt", "priority", "id", "job_id", "owner", "max_attempts"]


@pytest.mark.parametrize("field", SERVER_FIELDS)
def test_server_fields_in_a_spec_are_refused(client: TestClient, sessions: sessionmaker[Session], field: str):
    r = client.post("/v1/jobs", json={**make_spec(), field: "intruder"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"
    assert field in [d["path"] for d in r.json()["error"]["details"]]
    assert client.post("/v1/specs/validate", json={**make_spec(), field: 1}).status_code == 422
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


@pytest.mark.parametrize("part", ["data", "model", "train", "resources", "optim"])
def test_unknown_fields_in_any_part_of_a_spec_are_refused(client: TestClient, part: str):
    r = client.post("/v1/jobs", json=make_spec(**{part: {"tenant_id": "intruder"}}))
    assert r.status_code == 422 and f"{part}.tenant_id" in [d["path"] for d in r.json()["error"]["details"]]


def test_dataset_uploads_ignore_unknown_form_fields(client: TestClient):
    r = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes())}, data={"tenant_id": "other", "id": "x"})
    assert r.status_code == 201 and r.json()["id"].startswith("ds_")
    assert client.get(f"/v1/datasets/{r.json()['id']}").status_code == 200  # stored under the caller's tenant
