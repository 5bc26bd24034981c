"""/v1/studies: a study is checked whole before anything is stored (422 naming the path, the value and the reason),
its first trials are queued and sent, it is read with its trials and verdict, listed, cancelled, streamed over SSE,
replayed by idempotency key, and invisible to other tenants."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import RecordingEnqueue
from tests.factories import as_tenant, make_spec

BASE = make_spec(train={"epochs": 2})


def study(**overrides: Any) -> dict[str, Any]:
    body = {"name": "optimizers", "base": BASE, "space": {"optim.name": {"grid": ["sgd", "adam"]}}, "seeds": [1, 2]}
    return {**body, **overrides}


def create(client: TestClient, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
    return client.post("/v1/studies", json=body or study(), **kwargs)


def details(r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {d["path"]: d["message"] for d in r.json()["error"]["details"]}


def test_a_study_is_stored_with_its_first_trials_queued_and_sent(client: TestClient, enqueue: RecordingEnqueue):
    r = create(client, study(max_concurrent=3))
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/studies/{body['id']}" and body["id"].startswith("stu_")
    assert (body["status"], body["trials_planned"], body["trials_created"]) == ("queued", 4, 3)
    assert body["spec"]["base"]["train"]["epochs"] == 2 and body["spec"]["base"]["optim"]["lr"] > 0  # resolved
    trials = client.get("/v1/jobs", params={"study": body["id"]}).json()["items"]
    assert sorted(t["trial_number"] for t in trials) == [0, 1, 2]
    assert [job_id for job_id, _ in enqueue.calls] == [t["id"] for t in sorted(trials, key=lambda t: t["trial_number"])]
    for trial in trials:
        assert trial["study_id"] == body["id"] and trial["spec"]["optim"]["name"] == trial["params"]["optim.name"]
        assert trial["spec"]["train"]["seed"] in (1, 2)
    assert client.get("/v1/jobs", params={"study": "stu_other"}).json()["items"] == []


def test_every_value_is_checked_before_anything_is_stored(client: TestClient):
    bad_value = details(create(client, study(space={"optim.name": {"grid": ["adam", "sgdd"]}})))
    assert list(bad_value) == ["space.optim.name"] and '"sgdd"' in bad_value["space.optim.name"]
    no_such_path = details(create(client, study(space={"optim.nme": {"grid": [1, 2]}})))
    assert list(no_such_path) == ["space.optim.nme"] and "1" in no_such_path["space.optim.nme"]
    out_of_range = details(create(client, study(space={"optim.lr": {"loguniform": [1e-4, 50.0]}}, sampler="random",
                                                    n_trials=4)))  # fmt: skip
    assert "50.0" in out_of_range["space.optim.lr"]
    base = details(create(client, study(base={**BASE, "train": {"epochs": 0}})))
    assert list(base) == ["base.train.epochs"]
    shape = details(create(client, study(space={"optim.name": {"uniform": [0, 1]}})))  # the grid sampler needs grids
    assert any("grid" in message for message in shape.values())
    assert client.get("/v1/studies").json()["items"] == [] and client.get("/v1/jobs").json()["items"] == []


def test_a_study_over_the_trials_limit_is_refused(make_client: Callable[..., TestClient]):
    client = make_client(max_study_trials=3)
    r = create(client)  # 2 values x 2 seeds
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_trials", r.text
    assert "4 trials; at most 3" in r.json()["error"]["message"]


def test_choosing_on_the_test_set_gets_advice(client: TestClient):
    body = create(client, study(objective={"metric": "test/acc"})).json()
    assert "objective_on_test_set" in [a["code"] for a in body["advice"]]
    assert "objective_on_test_set" not in [a["code"] for a in create(client).json()["advice"]]


def test_the_same_idempotency_key_replays_and_another_body_is_refused(client: TestClient, enqueue: RecordingEnqueue):
    first = create(client, headers={"Idempotency-Key": "k1"})
    again = create(client, headers={"Idempotency-Key": "k1"})
    assert (first.status_code, again.status_code) == (201, 200) and again.json()["id"] == first.json()["id"]
    assert len(enqueue.calls) == 2  # the replay made and sent nothing
    other = create(client, study(seeds=[7]), headers={"Idempotency-Key": "k1"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_study_reads_with_its_trials_table_and_verdict(client: TestClient):
    study_id = create(client).json()["id"]
    r = client.get(f"/v1/studies/{study_id}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(t["number"], t["status"], t["value"]) for t in body["trials"]] == [
        (0, "queued", None),
        (1, "queued", None),
    ]
    [parameter] = body["verdict"]["parameters"]
    assert parameter["path"] == "optim.name" and parameter["best_value"] is None
    assert {v["verdict"] for v in parameter["values"]} == {"inconclusive"}  # nothing has finished: nothing is claimed
    transitions = client.get(f"/v1/studies/{study_id}/transitions").json()
    assert [t["to"] for t in transitions] == ["queued"]


def test_studies_list_newest_first_in_pages(client: TestClient):
    made = [create(client, study(name=f"s{i}")).json()["id"] for i in range(3)]
    first = client.get("/v1/studies", params={"limit": 2}).json()
    second = client.get("/v1/studies", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [s["id"] for s in first["items"] + second["items"]] == made[::-1] and second["next_cursor"] is None


def test_cancel_drops_queued_trials_and_is_idempotent(client: TestClient):
    study_id = create(client).json()["id"]
    for _ in range(2):
        r = client.post(f"/v1/studies/{study_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    trials = client.get("/v1/jobs", params={"study": study_id}).json()["items"]
    assert {t["status"] for t in trials} == {"cancelled"} and len(trials) == 2


def test_another_tenants_study_is_not_found(client: TestClient):
    study_id = create(client).json()["id"]
    other = as_tenant(client, "globex")
    for method, path in [("GET", ""), ("POST", "/cancel"), ("GET", "/transitions"), ("GET", "/events")]:
        r = other.request(method, f"/v1/studies/{study_id}{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path)
    assert other.get("/v1/studies").json()["items"] == []
    assert other.get("/v1/jobs", params={"study": study_id}).json()["items"] == []


def sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    message: dict[str, Any] = {}
    for line in response.iter_lines():
        if line == "":
            if "event" in message:
                yield message
            message = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            message[field] = json.loads(value) if field == "data" else value.strip()


@pytest.mark.timeout(30)
def test_the_event_stream_follows_the_study_and_resumes_after_an_id(make_server: Callable[..., Any]):
    server = make_server()
    with server.client(timeout=15) as http:
        study_id = http.post("/v1/studies", json=study()).json()["id"]
        with http.stream("GET", f"/v1/studies/{study_id}/events") as response:
            assert response.status_code == 200
            events = sse(response)
            first = [next(events) for _ in range(3)]
            assert [e["event"] for e in first] == ["status", "trial_created", "trial_created"]
            assert first[1]["data"]["trial_number"] == 0 and first[1]["data"]["data"]["params"]["optim.name"]
            assert http.post(f"/v1/studies/{study_id}/cancel").status_code == 200  # live: the rest arrives
            rest = list(events)
        kinds = [e["event"] for e in rest]
        assert kinds[-2:] == ["study_ended", "end"] and rest[-2]["data"]["data"]["status"] == "cancelled"
        ids = [int(e["id"]) for e in first + rest if "id" in e]
        assert ids == sorted(set(ids))
        resumed = http.get(f"/v1/studies/{study_id}/events", headers={"Last-Event-ID": str(ids[2])})
        assert [e["event"] for e in sse(resumed)] == kinds  # the same events after that id, no repeat
        done = http.get(f"/v1/studies/{study_id}/events", headers={"Last-Event-ID": str(ids[-1])})
        assert done.status_code == 204  # after the end: stop reconnecting


def test_a_value_of_the_space_that_departs_from_good_practice_gets_advice_naming_it(client: TestClient):
    body = create(client, study(space={"model.init": {"grid": ["he_normal", "zeros"]}})).json()
    [zero] = [a for a in body["advice"] if a["code"] == "ZERO_INIT"]
    assert zero["path"] == "space.model.init" and zero["message"].startswith('with model.init = "zeros": ')
