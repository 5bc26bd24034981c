"""POST /v1/specs/validate: the dry run answers the resolved spec, advice and parameter count, or every problem."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from core.engine.models import build_model
from core.spec import BUILTINS, ModelSpec
from tests.api.conftest import RecordingEnqueue
from tests.factories import make_spec, npz_bytes


def parameters(model: dict, shape: tuple[int, ...], n_classes: int) -> int:
    return sum(p.numel() for p in build_model(ModelSpec(**model), shape, n_classes).parameters())


@pytest.mark.parametrize(
    ("data", "model", "shape", "n_classes"),
    [
        ({"dataset": "builtin:digits"}, {"arch": "mlp", "layers": [16]}, (1, 8, 8), 10),
        ({"dataset": "builtin:mnist1d"}, {"arch": "cnn", "layers": [8, 16]}, (1, 40), 10),
        ({"dataset": "builtin:synthetic", "synthetic": {"n_features": 7, "n_classes": 4}}, {"arch": "linear"}, (7,), 4),
        ({"dataset": "builtin:digits", "classes": [3, 5, 8]}, {"arch": "resnet", "layers": [8]}, (1, 8, 8), 3),
    ],
)
def test_dry_run_counts_the_parameters_of_the_model_for_the_data(
    client: TestClient, enqueue: RecordingEnqueue, data: dict, model: dict, shape: tuple, n_classes: int
):
    r = client.post("/v1/specs/validate", json=make_spec(data=data, model=model))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] and body["input_shape"] == list(shape) and body["n_classes"] == n_classes
    assert body["parameter_count"] == parameters(model, shape, n_classes)
    assert body["spec"]["optim"]["name"] == "adam" and body["queue"] == "cpu"
    assert enqueue.calls == [] and client.get("/v1/jobs").json()["items"] == []  # nothing was submitted


@pytest.mark.parametrize("name", BUILTINS)
def test_dry_run_reports_the_builtin_table_shape_and_classes(client: TestClient, name: str):
    spec = {**make_spec(model={"arch": "linear"}), "data": {"dataset": name}}  # the table's own sizes
    r = client.post("/v1/specs/validate", json=spec)
    assert r.status_code == 200, r.text
    table = BUILTINS[name]
    assert (r.json()["input_shape"], r.json()["n_classes"]) == (list(table.input_shape), table.n_classes)


def test_dry_run_gives_the_same_advice_as_a_submission(client: TestClient):
    spec = make_spec(model={"arch": "mlp", "layers": [16], "dropout": 0.7}, optim={"name": "sgd"})
    checked = client.post("/v1/specs/validate", json=spec).json()
    submitted = client.post("/v1/jobs", json=spec).json()
    assert {a["code"] for a in checked["advice"]} >= {"DROPOUT_RANGE", "SGD_NO_MOMENTUM"}
    assert checked["advice"] == submitted["advice"] and checked["spec"] == submitted["spec"]


def test_huge_models_are_counted_without_being_allocated(make_client: Callable[..., TestClient]):
    client = make_client(max_job_memory_mb=10**9)  # an estimate over the limit would be refused
    started = time.monotonic()
    r = client.post("/v1/specs/validate", json=make_spec(model={"arch": "mlp", "layers": [65536] * 8}))
    assert r.status_code == 200 and r.json()["parameter_count"] > 30_000_000_000
    assert time.monotonic() - started < 5


def test_uploaded_dataset_shape_and_kind_are_used(client: TestClient):
    ds = client.post("/v1/datasets", files={"file": ("f.npz", npz_bytes(features=5, classes=4))}).json()["id"]
    r = client.post("/v1/specs/validate", json=make_spec(data={"dataset": ds}, model={"arch": "linear"}))
    assert r.status_code == 200 and (r.json()["input_shape"], r.json()["n_classes"]) == ([5], 4)
    assert r.json()["parameter_count"] == 5 * 4 + 4
    r = client.post("/v1/specs/validate", json=make_spec(data={"dataset": ds, "augment": {"rotate": {}}}))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["path"] == "data.augment.rotate"


def test_every_problem_is_listed(client: TestClient):
    spec = make_spec(data={"split": {"val": 2}}, optim={"lr": 0, "betas": [0.9, 1.5]}, train={"batch_size": 0})
    r = client.post("/v1/specs/validate", json=spec)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"
    paths = {d["path"] for d in r.json()["error"]["details"]}
    assert paths == {"data.split.val", "optim.lr", "optim.betas", "train.batch_size"}


def test_a_model_that_cannot_fit_the_inputs_is_422(client: TestClient):
    conv = [{"channels": 4, "kernel": 3, "pool": 8}] * 3  # pools an 8x8 image below one pixel
    r = client.post("/v1/specs/validate", json=make_spec(model={"arch": "cnn", "conv": conv}))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["path"].startswith("model")


def test_references_are_checked(client: TestClient):
    spec = make_spec(data={"dataset": "ds_missing123"}, transfer={"from_job": "job_missing"})
    r = client.post("/v1/specs/validate", json=spec)
    assert r.status_code == 422
    assert [d["path"] for d in r.json()["error"]["details"]] == ["data.dataset", "transfer.from_job"]
