"""Jobs that cannot fit and a full disk: a job estimated to need more memory than the service allows is refused with
the estimate and the limit; a full disk answers 507 and makes /readyz fail, and passes when space comes back."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.factories import make_spec, npz_bytes

HUGE = {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 150_000, "n_features": 10_000}}


def test_a_job_too_big_for_memory_is_refused_naming_the_estimate_the_limit_and_the_field(
    make_client: Callable[..., TestClient], db_url: str
):
    client = make_client(database_url=db_url)
    r = client.post("/v1/jobs", json=make_spec(data=HUGE))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_spec" and [d["path"] for d in error["details"]] == ["data.synthetic.n_samples"]
    assert "would need about 22893 MiB of memory" in error["message"] and "allows 4096 MiB" in error["message"]
    assert client.get("/v1/jobs").json()["items"] == []
    assert client.post("/v1/jobs", json=make_spec()).status_code == 201


def test_the_dry_run_shows_the_memory_estimate_and_refuses_what_a_submission_refuses(client: TestClient):
    r = client.post("/v1/specs/validate", json=make_spec())
    assert r.status_code == 200
    memory = r.json()["memory"]
    assert memory["data_bytes"] == 400 * (12 * 4 + 8)  # make_spec: 400 synthetic examples of 12 features
    assert memory["total_bytes"] >= memory["data_bytes"] + memory["parameter_bytes"] > memory["data_bytes"]
    refused = client.post("/v1/specs/validate", json=make_spec(data=HUGE))
    assert refused.status_code == 422 and refused.json() == client.post("/v1/jobs", json=make_spec(data=HUGE)).json()


def test_an_uploaded_dataset_is_sized_from_its_description(make_client: Callable[..., TestClient], db_url: str):
    client = make_client(database_url=db_url, max_job_memory_mb=2)
    big = client.post("/v1/datasets", files={"file": ("big.npz", npz_bytes(n=2000, features=100))}).json()["id"]
    small = client.post("/v1/datasets", files={"file": ("small.npz", npz_bytes(n=60))}).json()["id"]
    r = client.post("/v1/jobs", json=make_spec(data={"dataset": big}))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["path"] == "data.dataset"
    assert client.post("/v1/jobs", json=make_spec(data={"dataset": small})).status_code == 201
