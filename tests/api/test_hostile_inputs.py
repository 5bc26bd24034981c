"""Inputs PostgreSQL or the engine cannot take (non-finite numbers, NUL characters, seeds past 64 bits) and dataset
files that lie or explode: each gets a 4xx naming the field, the same on SQLite and PostgreSQL, and nothing stored."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from core.jobs import encode_cursor
from tests.bombs import npz_declaring, png_bomb_zip, zeros_npz
from tests.factories import make_spec

CSV = b"f1,label\n1.0,a\n2.0,b\n3.0,a\n"


def assert_refused(r, status: int, code: str, path: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and path in [d["path"] for d in error["details"]], error


def post_raw(client: TestClient, body: str):
    return client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})


@pytest.fixture
def client(make_client: Callable[..., TestClient], db_url: str) -> TestClient:
    return make_client(database_url=db_url)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ('{"optim": {"grad_clip": Infinity}}', "optim.grad_clip"),
        ('{"optim": {"schedule": {"name": "plateau", "min_lr": Infinity}}}', "optim.schedule.min_lr"),
        ('{"train": {"early_stopping": {"baseline": NaN}}}', "train.early_stopping.baseline"),
        ('{"train": {"early_stopping": {"min_delta": -Infinity}}}', "train.early_stopping.min_delta"),
        ('{"optim": {"betas": [0.9, NaN]}}', "optim.betas.1"),
        ('{"train": {"early_stopping": {"baseline": 1e999}}}', "train.early_stopping.baseline"),
    ],
)
def test_non_finite_numbers_are_refused_with_their_path(client: TestClient, body: str, path: str):
    assert_refused(post_raw(client, body), 422, "invalid_spec", path)
    assert_refused(client.post("/v1/specs/validate", content=body, headers={"Content-Type": "application/json"}),
                   422, "invalid_spec", path)  # fmt: skip
    assert client.get("/v1/jobs").json()["items"] == []


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"name": "a\x00b"}, "name"),
        ({"data": {"dataset": "builtin:digits", "label_column": "\x00"}}, "data.label_column"),
        ({"transfer": {"from_job": "job_\x00"}}, "transfer.from_job"),
    ],
)
def test_nul_characters_in_a_spec_are_refused_with_their_path(client: TestClient, spec: dict, path: str):
    assert_refused(client.post("/v1/jobs", json=make_spec(**spec)), 422, "invalid_spec", path)
    assert client.get("/v1/jobs").json()["items"] == []


def test_nul_characters_in_the_url_are_refused_with_their_place(client: TestClient):
    assert_refused(client.get("/v1/jobs", params={"name": "a\x00"}), 422, "invalid_request", "query.name")
    assert_refused(client.get("/v1/jobs/job_%00"), 422, "invalid_request", "path.job_id")
    assert_refused(client.get("/v1/datasets/ds_%00"), 422, "invalid_request", "path.dataset_id")
    assert_refused(client.post("/v1/jobs/job_%00/cancel"), 422, "invalid_request", "path.job_id")
    cursor = encode_cursor(datetime.now(UTC), "job_\x00")  # well-formed, but its id cannot be compared in SQL
    for resource in ("jobs", "datasets"):
        r = client.get(f"/v1/{resource}", params={"cursor": cursor})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_cursor")


@pytest.mark.parametrize("field", ["name", "label_column"])
def test_nul_characters_in_upload_fields_are_refused(client: TestClient, field: str):
    r = client.post("/v1/datasets", files={"file": ("a.csv", CSV)}, data={field: "a\x00b"})
    assert_refused(r, 422, "invalid_request", field)
    assert client.get("/v1/datasets").json()["items"] == []


def test_a_nul_character_in_the_upload_file_name_is_refused(client: TestClient):
    # httpx would percent-encode the name; a client that does not sends the byte itself.
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a\x00b.csv"\r\n\r\n'
    r = client.post("/v1/datasets", content=head + CSV + b"\r\n--B--\r\n",
                    headers={"Content-Type": "multipart/form-data; boundary=B"})  # fmt: skip
    assert_refused(r, 422, "invalid_request", "file")


def nested(path: str, value: object) -> dict:
    """{"data": {"split": {"seed": value}}} for "data.split.seed"."""
    for key in reversed(path.split(".")):
        value = {key: value}
    return value  # type: ignore[return-value]


@pytest.mark.parametrize(("path", "too_large"), [("train.seed", 2**63), ("data.split.seed", 2**70),
                                                 ("data.synthetic.seed", 2**64)])  # fmt: skip
def test_seeds_must_fit_a_signed_64_bit_integer(client: TestClient, path: str, too_large: int):
    assert_refused(client.post("/v1/jobs", json=make_spec(**nested(path, too_large))), 422, "invalid_spec", path)
    r = client.post("/v1/jobs", json=make_spec(**nested(path, 2**63 - 1)))
    assert r.status_code == 201, r.text
    assert client.get(f"/v1/jobs/{r.json()['id']}/spec").json() == r.json()["spec"]  # stored exactly


@pytest.mark.parametrize(
    ("filename", "content", "status", "code", "says"),
    [
        ("big.csv", f"f1,label\n{'1' * 200 * 1024},1\n1.0,0\n".encode(), 422, "invalid_dataset", "line 2"),
        ("lies.npz", npz_declaring((10**12,)), 422, "invalid_dataset", "declares shape (1000000000000,)"),
        ("bomb.npz", zeros_npz((64, 2**20)), 413, "dataset_too_large", "256.0 MiB once decoded"),
        ("bomb.zip", png_bomb_zip(side=8000, count=4), 413, "dataset_too_large", "4 images of 3x8000x8000"),
    ],
)
def test_dataset_files_that_lie_or_explode_are_refused_naming_the_file(
    make_client: Callable[..., TestClient], db_url: str, filename: str, content: bytes, status, code, says
):
    client = make_client(database_url=db_url, max_dataset_memory_mb=16)
    r = client.post("/v1/datasets", files={"file": (filename, content)})
    assert_refused(r, status, code, "file")
    message = r.json()["error"]["message"]
    assert says in message and (status == 422 or "at most 16.0 MiB" in message), message
    assert client.get("/v1/datasets").json()["items"] == []
    assert client.get("/v1/quotas").json()["limits"]["max_dataset_memory_bytes"] == 16 * 2**20
