"""Jobs that cannot fit and a full disk: a job estimated to need more memory than the service allows is refused with
the estimate and the limit; a full disk answers 507 and makes /readyz fail, and passes when space comes back."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from core import jobs
from tests.factories import fill_disk, make_spec, npz_bytes

MIB = 2**20

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


@pytest.fixture
def on_small_disk(small_disk: Path, migrated_template: Path, make_client: Callable[..., TestClient]) -> Callable:
    """A client of a service whose home and SQLite database are on a 30 MiB filesystem."""
    shutil.copy(migrated_template, small_disk / "trickserve.db")

    def make(**overrides: Any) -> TestClient:
        return make_client(home=small_disk, database_url=f"sqlite:///{small_disk / 'trickserve.db'}", **overrides)

    return make


def upload(client: TestClient, n: int = 60) -> Any:
    return client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(n=n, features=100))})


def assert_storage_full(r: Any) -> None:
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "storage_full" and int(r.headers["Retry-After"]) > 0


def test_below_the_free_space_minimum_jobs_and_uploads_get_507_and_readyz_503(on_small_disk, small_disk: Path):
    client = on_small_disk(min_free_disk_mb=5)
    assert client.get("/readyz").status_code == 200
    filler = fill_disk(small_disk, leave_bytes=2 * MIB)

    r = client.post("/v1/jobs", json=make_spec())
    assert_storage_full(r)
    assert r.json()["error"]["message"].startswith(f"the disk is full: {small_disk}")
    assert_storage_full(upload(client))
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert ready.json()["error"]["details"]["disk"].startswith(f"full: {small_disk} has 2.0 MiB free")
    assert client.get("/v1/jobs").status_code == 200  # reading goes on

    filler.unlink()
    assert client.post("/v1/jobs", json=make_spec()).status_code == 201
    assert upload(client).status_code == 201 and client.get("/readyz").status_code == 200


def test_a_database_or_disk_that_fills_up_gives_507_and_keeps_no_partial_upload(on_small_disk, small_disk: Path):
    client = on_small_disk(min_free_disk_mb=0)  # no minimum: the writes themselves run out of space
    filler = fill_disk(small_disk)
    r = client.post("/v1/jobs", json=make_spec())
    assert_storage_full(r)
    assert r.json()["error"]["message"].startswith("the database is full")  # SQLite: database or disk is full
    filler.unlink()
    filler = fill_disk(small_disk, leave_bytes=256 * 1024)
    assert_storage_full(upload(client, n=2000))  # about 800 KiB: the upload runs out of space while streaming
    assert list((small_disk / "datasets").rglob("*")) in ([], [small_disk / "datasets" / "default"])
    filler.unlink()
    assert client.post("/v1/jobs", json=make_spec()).status_code == 201
    assert upload(client, n=2000).status_code == 201


def test_postgresql_out_of_disk_is_a_507(client: TestClient, monkeypatch: pytest.MonkeyPatch):
    # PostgreSQL's disk cannot be filled here: its error (SQLSTATE 53100) stands in, as psycopg raises it.
    full = OperationalError("INSERT INTO job ...", {}, psycopg.errors.DiskFull("could not extend file: No space"))
    monkeypatch.setattr(jobs, "create_job", lambda **_: (_ for _ in ()).throw(full))
    assert_storage_full(client.post("/v1/jobs", json=make_spec()))
    monkeypatch.setattr(jobs, "create_job", lambda **_: (_ for _ in ()).throw(OperationalError("x", {}, None)))
    assert client.post("/v1/jobs", json=make_spec()).status_code == 500  # other database errors stay internal
