"""The API on an S3 artifact store (a real S3-protocol server, moto's, over HTTP): uploads go to the bucket whole,
model downloads stream from it or redirect to a presigned URL, and a store that is away is a 503, not a 500."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import httpx
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.engine.checkpoint import save_model
from tests.factories import claim, finish, make_spec, npz_bytes
from tests.s3 import Proxy


def _s3_client(make_client: Callable[..., TestClient], s3_url: str, **overrides) -> TestClient:
    return make_client(storage_url=s3_url, s3_endpoint_url=os.environ["TRICKSERVE_S3_ENDPOINT_URL"], **overrides)


def test_an_upload_is_stored_in_the_bucket_whole_with_its_hash(make_client, s3_url: str, tmp_path):
    client = _s3_client(make_client, s3_url)
    content = npz_bytes(n=60)
    r = client.post("/v1/datasets", files={"file": ("f.npz", content)})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["sha256"] == hashlib.sha256(content).hexdigest()
    store = client.app.state.store
    assert b"".join(store.read(f"datasets/default/{ds['id']}.npz").chunks) == content
    assert not [p for p in tmp_path.rglob("*.npz")]  # nothing of it on the API's disk: no spool file, no copy
    assert client.post("/v1/jobs", json=make_spec(data={"dataset": ds["id"]})).status_code == 201


def test_a_store_that_is_away_answers_503_with_retry_after_and_keeps_nothing(make_client, s3_url: str, tmp_path):
    proxy = Proxy(int(os.environ["TRICKSERVE_S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    client = make_client(storage_url=s3_url, s3_endpoint_url=proxy.url, storage_retry_s=0.5)
    proxy.cut()
    r = client.post("/v1/datasets", files={"file": ("f.npz", npz_bytes())})
    assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1
    assert client.get("/v1/datasets").json()["items"] == []
    assert not [p for p in tmp_path.rglob("*.npz")]  # the spool file is gone too
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["error"]["details"]["storage"].startswith("unreachable")
    proxy.restore()
    assert client.post("/v1/datasets", files={"file": ("f.npz", npz_bytes())}).status_code == 201
    assert client.get("/readyz").json()["checks"]["storage"] == "ok"
    proxy.close()


def _finished_with_model(client: TestClient, sessions: sessionmaker[Session], tmp_path) -> tuple[str, bytes]:
    job = client.post("/v1/jobs", json=make_spec()).json()
    key = f"artifacts/{job['id']}/attempt-1/model.safetensors"
    path = save_model(torch.nn.Linear(3, 2), tmp_path / "worker" / "model.safetensors", json.dumps(job["spec"]))
    client.app.state.store.put_file(key, path)  # as a worker on another machine stores it
    finish(sessions, job["id"], claim(sessions, job["id"]), model_key=key)
    return job["id"], open(path, "rb").read()


def test_the_model_streams_from_the_bucket(make_client, s3_url: str, sessions, tmp_path):
    client = _s3_client(make_client, s3_url)
    job_id, weights = _finished_with_model(client, sessions, tmp_path)
    r = client.get(f"/v1/jobs/{job_id}/model")
    assert r.status_code == 200 and r.content == weights
    assert (
        r.headers["content-length"] == str(len(weights)) and f"{job_id}.safetensors" in r.headers["content-disposition"]
    )
    client.app.state.store.delete(f"artifacts/{job_id}/attempt-1/model.safetensors")
    r = client.get(f"/v1/jobs/{job_id}/model")
    assert r.status_code == 410 and r.json()["error"]["code"] == "model_missing"


def test_the_model_redirects_to_a_presigned_url_when_set(make_client, s3_url: str, sessions, tmp_path):
    client = _s3_client(make_client, s3_url, storage_presign_s=60)
    job_id, weights = _finished_with_model(client, sessions, tmp_path)
    r = client.get(f"/v1/jobs/{job_id}/model", follow_redirects=False)
    assert r.status_code == 307
    direct = httpx.get(r.headers["location"])  # no bearer key: the URL itself grants the download, for 60 s
    assert direct.status_code == 200 and direct.content == weights
    assert "X-Amz-Expires=60" in r.headers["location"]
