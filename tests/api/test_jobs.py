"""POST/GET /v1/jobs, cancel, transitions, model and spec downloads: success paths and every error path."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.engine.checkpoint import save_model
from core.models import Job
from tests.api.conftest import RecordingEnqueue
from tests.factories import claim, finish, make_spec


def submit(client: TestClient, spec: dict | None = None, **kwargs) -> dict:
    r = client.post("/v1/jobs", json=spec or make_spec(), **kwargs)
    assert r.status_code == 201, r.text
    return r.json()


def load(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


# --------------------------------------------------------------------------------------------- submit


def test_submit_answers_201_with_resolved_spec_advice_and_location(client: TestClient, enqueue: RecordingEnqueue):
    r = client.post("/v1/jobs", json={"name": "tiny", "train": {"epochs": 2}})
    assert r.status_code == 201
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["queue"] == "cpu" and job["attempt"] == 0
    assert job["spec"]["optim"]["lr"] == 0.001 and job["spec"]["data"]["dataset"] == "builtin:digits"  # defaults
    assert {"code", "message", "path", "severity"} <= set(job["advice"][0])
    assert job["failure"] is None and job["links"]["events"] == f"/v1/jobs/{job['id']}/events"
    assert enqueue.calls == [(job["id"], "cpu")]


def test_enqueue_happens_after_commit_then_job_is_marked_dispatched(
    client: TestClient, enqueue: RecordingEnqueue, sessions: sessionmaker[Session]
):
    seen = []
    enqueue.on_call = lambda job_id: seen.append(load(sessions, job_id).status)  # another connection sees it
    job = submit(client)
    assert seen == ["queued"]
    assert load(sessions, job["id"]).dispatched_at is not None


def test_cuda_jobs_go_to_the_gpu_queue(client: TestClient, enqueue: RecordingEnqueue):
    job = submit(client, make_spec(resources={"device": "cuda:1"}))
    assert job["queue"] == "gpu" and enqueue.calls == [(job["id"], "gpu")]


def test_broker_down_keeps_the_job_stored_and_undispatched(
    client: TestClient, enqueue: RecordingEnqueue, sessions: sessionmaker[Session]
):
    enqueue.fail = True
    job = submit(client)
    stored = load(sessions, job["id"])
    assert stored.status == "queued" and stored.dispatched_at is None
    with sessions() as s:
        assert [j.job_id for j in jobs.undispatched_jobs(s)] == [job["id"]]  # the outbox will send it


def test_invalid_spec_lists_every_problem_with_its_path(client: TestClient, enqueue: RecordingEnqueue):
    spec = make_spec(optim={"lr": -1}, train={"epochs": 0}, model={"dropout": 1.5, "colour": 1})
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_spec"
    paths = {d["path"] for d in error["details"]}
    assert paths == {"optim.lr", "train.epochs", "model.dropout", "model.colour"}
    assert enqueue.calls == []


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"transfer": {"from_path": "/srv/runs/model.safetensors"}}, "transfer.from_path"),
        ({"data": {"dataset": "/etc/data.csv"}}, "data.dataset"),
        ({"data": {"dataset": "ds_doesnotexist1"}}, "data.dataset"),
        ({"transfer": {"from_job": "job_doesnotexist"}}, "transfer.from_job"),
    ],
)
def test_specs_naming_local_files_or_missing_things_are_refused(client: TestClient, overrides: dict, path: str):
    r = client.post("/v1/jobs", json=make_spec(**overrides))
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_spec"
    assert [d["path"] for d in r.json()["error"]["details"]] == [path]


def test_transfer_needs_a_source_job_with_a_trained_model(client: TestClient, sessions: sessionmaker[Session]):
    source = submit(client)
    r = client.post("/v1/jobs", json=make_spec(transfer={"from_job": source["id"]}))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["path"] == "transfer.from_job"
    attempt = claim(sessions, source["id"])
    finish(sessions, source["id"], attempt, model_key="artifacts/j/attempt-1/model.safetensors")
    assert client.post("/v1/jobs", json=make_spec(transfer={"from_job": source["id"]})).status_code == 201


def test_idempotency_key_replays_the_same_job_and_refuses_another_body(client: TestClient, enqueue: RecordingEnqueue):
    headers = {"Idempotency-Key": "nightly-42"}
    first = client.post("/v1/jobs", json=make_spec(), headers=headers)
    again = client.post("/v1/jobs", json=make_spec(), headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert len(enqueue.calls) == 1  # already dispatched: not sent twice
    other = client.post("/v1/jobs", json=make_spec(name="other"), headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    too_long = client.post("/v1/jobs", json=make_spec(), headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422 and too_long.json()["error"]["code"] == "invalid_request"


def test_a_replay_never_sends_the_job_again_the_outbox_does(
    client: TestClient, enqueue: RecordingEnqueue, sessions: sessionmaker[Session]
):
    enqueue.fail = True
    job = submit(client, headers={"Idempotency-Key": "k"})
    enqueue.fail = False
    # Only the request that created the job sends it: a replay racing that request could not tell whether its
    # send is under way, so it would risk a second message. The outbox sweep sends what the broker missed.
    assert client.post("/v1/jobs", json=make_spec(), headers={"Idempotency-Key": "k"}).status_code == 200
    assert enqueue.calls == []
    with sessions() as s:
        assert [j.job_id for j in jobs.undispatched_jobs(s)] == [job["id"]]


def test_active_job_limit_answers_429(make_client: Callable[..., TestClient]):
    client = make_client(max_active_jobs_per_tenant=1)
    submit(client)
    r = client.post("/v1/jobs", json=make_spec())
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_active_jobs"


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 422, "invalid_request"),
        (b"[1, 2]", "application/json", 422, "invalid_request"),
        (b"", "application/json", 422, "invalid_request"),
        (b'{"name": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"name": "x"}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
def test_malformed_bodies_are_client_errors(
    client: TestClient, content: bytes, content_type: str, status: int, code: str
):
    r = client.post("/v1/jobs", content=content, headers={"content-type": content_type})
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_oversized_bodies_are_refused_with_413(client: TestClient):
    body = json.dumps(make_spec(name="x" * 100_000)).encode()  # over max_body_kb = 64
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))  # no Content-Length: counted as it streams
    r = client.post("/v1/jobs", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


# ----------------------------------------------------------------------------------------------- read


def test_read_job_and_404_for_unknown_ids(client: TestClient):
    job = submit(client)
    r = client.get(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["id"] == job["id"] and r.json()["spec"] == job["spec"]
    for path in ("", "/transitions", "/metrics", "/model", "/spec", "/events"):
        r = client.get(f"/v1/jobs/job_unknown{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    r = client.post("/v1/jobs/job_unknown/cancel")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_finished_job_shows_outcome_and_failure(client: TestClient, sessions: sessionmaker[Session]):
    job = submit(client)
    attempt = claim(sessions, job["id"])
    finish(sessions, job["id"], attempt, status="failed", failure_class="diverged", failure_message="loss is NaN",
           final_metrics={"train/loss": float("nan")})  # fmt: skip
    body = client.get(f"/v1/jobs/{job['id']}").json()
    assert body["status"] == "failed" and body["attempt"] == 1 and body["finished_at"] is not None
    assert body["failure"] == {"class": "diverged", "message": "loss is NaN"}
    assert body["final_metrics"] == {"train/loss": "NaN"}


def test_list_filters_before_the_limit_and_pages_through_three_pages(client: TestClient):
    names = ["a", "b", "a", "a", "b", "a", "a", "b", "a"]  # six "a" among nine
    ids = [submit(client, make_spec(name=n))["id"] for n in names]
    wanted = [i for i, n in zip(ids, names, strict=True) if n == "a"][::-1]  # newest first
    seen, cursor, pages = [], None, 0
    while True:
        params = {"name": "a", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        pages += 1
        assert len(page["items"]) == 2 and all(j["name"] == "a" for j in page["items"])
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == wanted


def test_list_by_status(client: TestClient):
    ids = [submit(client)["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    both = client.get("/v1/jobs", params={"status": "cancelled,queued"}).json()["items"]
    assert len(both) == 3
    assert len(client.get("/v1/jobs", params=[("status", "queued"), ("status", "running")]).json()["items"]) == 2


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"cursor": "not-a-cursor"}, 400, "invalid_cursor"),
        ({"cursor": "WzEsMiwzXQ"}, 400, "invalid_cursor"),  # valid base64 of [1,2,3]
        ({"limit": 101}, 422, "invalid_request"),  # over max_page_size
        ({"limit": 10**30}, 422, "invalid_request"),
        ({"limit": 0}, 422, "invalid_request"),
        ({"limit": -3}, 422, "invalid_request"),
        ({"limit": "many"}, 422, "invalid_request"),
        ({"status": "sleeping"}, 422, "invalid_request"),
    ],
)
def test_list_rejects_bad_parameters(client: TestClient, params: dict, status: int, code: str):
    r = client.get("/v1/jobs", params=params)
    assert r.status_code == status and r.json()["error"]["code"] == code


# ----------------------------------------------------------------------------------------- cancel


def test_cancel_is_idempotent(client: TestClient, sessions: sessionmaker[Session]):
    queued, running = submit(client), submit(client)
    claim(sessions, running["id"])
    for _ in range(2):
        assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
        r = client.post(f"/v1/jobs/{running['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelling" and r.json()["cancel_requested"]
    transitions = client.get(f"/v1/jobs/{running['id']}/transitions").json()
    assert [(t["from"], t["to"]) for t in transitions] == [(None, "queued"), ("queued", "running"),
                                                           ("running", "cancelling")]  # fmt: skip
    assert transitions[1]["attempt"] == 1 and transitions[0]["reason"] == "submitted"


def test_cancelling_a_finished_job_leaves_it_alone(client: TestClient, sessions: sessionmaker[Session]):
    job = submit(client)
    finish(sessions, job["id"], claim(sessions, job["id"]))
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "succeeded"


# --------------------------------------------------------------------------------------- model, spec


def test_model_download_is_the_safetensors_file_with_its_spec(
    client: TestClient, sessions: sessionmaker[Session], tmp_path
):
    job = submit(client)
    r = client.get(f"/v1/jobs/{job['id']}/model")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_ready"
    key = f"artifacts/{job['id']}/attempt-1/model.safetensors"
    path = save_model(torch.nn.Linear(3, 2), client.app.state.store.local_path(key), json.dumps(job["spec"]))
    finish(sessions, job["id"], claim(sessions, job["id"]), model_key=key)
    r = client.get(f"/v1/jobs/{job['id']}/model")
    assert r.status_code == 200 and r.content == open(path, "rb").read()
    assert f"{job['id']}.safetensors" in r.headers["content-disposition"]
    header_len = struct.unpack("<Q", r.content[:8])[0]
    metadata = json.loads(r.content[8 : 8 + header_len])["__metadata__"]
    assert json.loads(metadata["spec"]) == job["spec"]


def test_spec_download_is_the_resolved_spec(client: TestClient):
    job = submit(client)
    r = client.get(f"/v1/jobs/{job['id']}/spec")
    assert r.status_code == 200 and r.json() == job["spec"] and r.json()["optim"]["weight_decay"] == 0.0
