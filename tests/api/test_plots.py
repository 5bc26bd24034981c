"""GET /v1/jobs/{id}/plot.{png,svg} and /v1/studies/{id}/plot.{png,svg}: what each picture says (read back from
the SVG's text), a drawing kept until a new event, tenancy, 422 for names the plot cannot show, and a slow drawing
that holds up no other request on a real server."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core import drawing, jobs
from core.models import utcnow
from core.sampling import next_point
from tests.api.conftest import Served
from tests.factories import as_tenant, claim, epoch_event, finish, make_spec, record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Sessions = sessionmaker[Session]


@pytest.fixture
def sessions(client: TestClient) -> Sessions:
    return client.app.state.sessions


def running_job(client: TestClient, sessions: Sessions, epochs: int = 3, planned: int = 8) -> str:
    job_id = client.post("/v1/jobs", json=make_spec(train={"epochs": planned})).json()["id"]
    attempt = claim(sessions, job_id)
    record(sessions, job_id, attempt, [epoch_event(epoch) for epoch in range(1, epochs + 1)])
    return job_id


def svg_texts(r: httpx.Response) -> list[str]:
    """The text of an SVG answer, one entry per line of text drawn; asserts that it is SVG and parses as XML."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/svg+xml"
    root = ET.fromstring(r.content)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return [element.text.strip() for element in root.iter() if element.text and element.text.strip()]


def assert_png(r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content.startswith(PNG_SIGNATURE)


def test_a_running_job_is_drawn_as_far_as_it_has_come_in_both_formats(client: TestClient, sessions: Sessions):
    job_id = running_job(client, sessions)
    assert_png(client.get(f"/v1/jobs/{job_id}/plot.png"))
    texts = svg_texts(client.get(f"/v1/jobs/{job_id}/plot.svg"))
    assert f"tiny  ·  {job_id}  ·  running  ·  epoch 3 of 8" in texts
    assert {"Loss", "Accuracy", "epoch", "train/loss", "val/loss", "val/acc"} <= set(texts)
    assert "train/acc" not in texts and "lr" not in texts  # a default metric it has no points of; not a default
    assert "best epoch 3 so far: val/loss 0.5" in texts  # val/loss goes down every epoch
    asked = svg_texts(client.get(f"/v1/jobs/{job_id}/plot.svg", params={"metrics": "lr, val/acc"}))
    assert {"Learning rate", "lr", "val/acc"} <= set(asked) and "val/loss" not in asked


def test_a_job_before_its_first_epoch_is_drawn_too(client: TestClient, sessions: Sessions):
    job_id = running_job(client, sessions, epochs=0)
    assert "no epoch has ended yet" in svg_texts(client.get(f"/v1/jobs/{job_id}/plot.svg"))
    assert "no points yet" in svg_texts(client.get(f"/v1/jobs/{job_id}/plot.svg", params={"metrics": "val/acc"}))


def test_a_drawing_is_kept_until_the_job_has_a_new_event(
    client: TestClient, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
):
    drawn = []
    draw_job = drawing.draw_job
    monkeypatch.setattr(drawing, "draw_job", lambda plot, fmt: drawn.append(fmt) or draw_job(plot, fmt))
    job_id = running_job(client, sessions)
    url = f"/v1/jobs/{job_id}/plot.png"
    first, again = client.get(url), client.get(url)
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"] and drawn == ["png"]
    assert client.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    client.get(f"/v1/jobs/{job_id}/plot.svg")
    client.get(url, params={"metrics": "val/loss"})
    assert drawn == ["png", "svg", "png"]  # another format, another query: drawings of their own
    record(sessions, job_id, 1, [epoch_event(4)])
    after = client.get(url)
    assert after.content != first.content and after.headers["etag"] != first.headers["etag"]
    assert client.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 200
    assert drawn == ["png", "svg", "png", "png"]


def test_a_resumed_job_that_stopped_early_shows_its_best_epoch_the_stop_and_where_attempt_2_took_over(
    client: TestClient, sessions: Sessions
):
    spec = make_spec(train={"epochs": 20, "early_stopping": {"monitor": "val/loss", "patience": 2}})
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    losses = {1: 1.0, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.65, 6: 0.66}
    record(sessions, job_id, claim(sessions, job_id), [epoch_event(e, **{"val/loss": losses[e]}) for e in (1, 2, 3)])
    with sessions() as s:  # a checkpoint after epoch 3, then the worker is lost
        assert jobs.set_checkpoint(session=s, job_id=job_id, attempt=1, key="artifacts/j/attempt-1/ck.pt", step=30)
        assert jobs.requeue_expired(session=s, now=utcnow() + timedelta(hours=1)) == [job_id]
    attempt = claim(sessions, job_id)
    resumed = {"kind": "resumed", "step": 30, "epoch": 3, "data": {"from_step": 30, "from_epoch": 3}}
    stop = {"monitor": "val/loss", "mode": "min", "current": 0.66, "best": 0.6, "best_epoch": 4, "stopped_epoch": 6,
            "wait": 2, "patience": 2, "min_delta": 0.0, "baseline": None, "restore_best_weights": False}  # fmt: skip
    events = [resumed, *(epoch_event(e, **{"val/loss": losses[e]}) for e in (4, 5, 6))]
    record(sessions, job_id, attempt, [*events, {"kind": "early_stop", "step": 60, "epoch": 6, "data": stop}])
    finish(sessions, job_id, attempt, "early_stopped", stop_reason="early_stop")
    texts = svg_texts(client.get(f"/v1/jobs/{job_id}/plot.svg"))
    assert f"tiny  ·  {job_id}  ·  early_stopped" in texts
    assert "best epoch 4: val/loss 0.6" in texts
    assert "early stop at epoch 6: no better val/loss for 2 epochs (patience 2)" in texts
    assert "attempt 2 resumed after epoch 3" in texts
    assert_png(client.get(f"/v1/jobs/{job_id}/plot.png"))


def test_an_attempt_that_started_over_is_marked_from_its_start(client: TestClient, sessions: Sessions):
    job_id = running_job(client, sessions, epochs=2)
    with sessions() as s:  # lost without a checkpoint: attempt 2 runs from the first epoch again
        assert jobs.requeue_expired(session=s, now=utcnow() + timedelta(hours=1)) == [job_id]
    record(sessions, job_id, claim(sessions, job_id), [epoch_event(1)])
    assert "attempt 2 restarted" in svg_texts(client.get(f"/v1/jobs/{job_id}/plot.svg"))


def first_grid_point(space: dict[str, Any], value: Any) -> int:
    """A sampler seed whose grid order starts with `value` (the grid sampler shuffles the points by its seed)."""
    return next(seed for seed in range(100) if next_point("grid", space, "minimize", [], seed=seed) == value)


def pruning_study(client: TestClient) -> str:
    """Two seeds of a learning rate that learns, then two of one that cannot, which the median rule stops."""
    space = {"optim.lr": {"grid": [0.01, 1e-7]}}
    body = {
        "name": "rates",
        "base": make_spec(train={"epochs": 4}),
        "space": space,
        "seeds": [1, 2],
        "sampler_seed": first_grid_point(space, {"optim.lr": 0.01}),
        "max_concurrent": 1,
        "objective": {"metric": "val/loss"},
        "pruner": {"kind": "median", "warmup_epochs": 1, "min_trials": 2},
    }
    r = client.post("/v1/studies", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_trials(client: TestClient, sessions: Sessions, study_id: str) -> None:
    """Run the study's queued trials one at a time as a worker reports them, until none is left: 0.01 learns and
    1e-7 does not (made-up curves, a little apart per seed); the study's pruner decides as it does for a worker."""
    while queued := client.get("/v1/jobs", params={"study": study_id, "status": "queued"}).json()["items"]:
        for trial in queued:
            attempt, decisions = claim(sessions, trial["id"]), []
            for epoch in range(1, 5):
                loss = 1.0 / epoch + 0.05 * trial["trial_number"] if trial["params"]["optim.lr"] == 0.01 else 1.6
                with sessions() as s:
                    events = [epoch_event(epoch, **{"val/loss": loss})]
                    jobs.record_events(session=s, job_id=trial["id"], attempt=attempt, events=events, prune=decisions)
                if decisions:
                    break
            status = "pruned" if decisions else "succeeded"
            finish(sessions, trial["id"], attempt, status, stop_reason="pruned" if decisions else None)


def test_a_study_shows_each_value_over_its_seeds_its_pruned_trials_and_its_objective(
    client: TestClient, sessions: Sessions
):
    study_id = pruning_study(client)
    before = client.get(f"/v1/studies/{study_id}/plot.svg")
    assert "no epoch has ended yet" in svg_texts(before)
    run_trials(client, sessions, study_id)
    assert_png(client.get(f"/v1/studies/{study_id}/plot.png"))
    after = client.get(f"/v1/studies/{study_id}/plot.svg")
    texts = svg_texts(after)
    assert after.headers["etag"] != before.headers["etag"]
    assert f"rates  ·  {study_id}  ·  succeeded  ·  4 trials (2 succeeded, 2 pruned)" in texts
    assert {"val/loss per epoch, by optim.lr", "objective per value: mean and 95% interval"} <= set(texts)
    assert "optim.lr = 0.01 (mean of 2 trials)" in texts and "optim.lr = 1e-07 (pruned only)" in texts
    assert "band: min–max over seeds" in texts and "pruned trial, cut short at ×" in texts
    assert {"0.01", "n=2", "1e-07", "n=0, 2 pruned", "no finished trial"} <= set(texts)
    assert "val/loss (best epoch; lower is better)" in texts


def test_plots_are_the_tenants_own(client: TestClient, sessions: Sessions):
    job_id = running_job(client, sessions, epochs=1)
    study_id = client.post("/v1/studies", json={"base": make_spec(), "space": {"optim.lr": {"grid": [0.1]}}}).json()
    other = as_tenant(client, "other")
    for url in (f"/v1/jobs/{job_id}/plot.png", f"/v1/studies/{study_id['id']}/plot.svg"):
        assert client.get(url).status_code == 200
        r = other.get(url)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text


def test_a_name_the_plot_cannot_show_is_422_with_its_code(client: TestClient, sessions: Sessions):
    job_id = running_job(client, sessions, epochs=1)
    study_id = client.post("/v1/studies", json={"base": make_spec(), "space": {"optim.lr": {"grid": [0.1]}}}).json()
    cases: list[tuple[str, dict[str, str], str, str]] = [
        (f"/v1/jobs/{job_id}/plot.png", {"metrics": "val/loss,val/nope"}, "unknown_metric", "query.metrics"),
        (f"/v1/jobs/{job_id}/plot.svg", {"metrics": "val loss"}, "invalid_request", "query.metrics"),
        (f"/v1/studies/{study_id['id']}/plot.png", {"path": "optim.nope"}, "unknown_path", "query.path"),
        (f"/v1/studies/{study_id['id']}/plot.png", {"metric": "val/nope"}, "unknown_metric", "query.metric"),
    ]
    for url, params, code, where in cases:
        r = client.get(url, params=params)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
        assert [d["path"] for d in r.json()["error"]["details"]] == [where]
    unknown = client.get(f"/v1/jobs/{job_id}/plot.png", params={"metrics": "val/nope"}).json()["error"]["message"]
    assert "known: lr, train/loss, val/acc, val/loss" in unknown  # what the job has points of
    assert client.get(f"/v1/jobs/{job_id}/plot.gif").json()["error"]["code"] == "not_found"


def test_a_slow_drawing_holds_up_no_other_request(make_server: Callable[..., Served], monkeypatch: pytest.MonkeyPatch):
    server = make_server()
    drawing_started, release = threading.Event(), threading.Event()

    def slow(plot: Any, fmt: str) -> bytes:
        drawing_started.set()
        assert release.wait(10)
        return b"drawn"

    monkeypatch.setattr(drawing, "draw_job", slow)
    with server.client() as c, server.client() as other:
        job_id = c.post("/v1/jobs", json=make_spec()).json()["id"]
        answers: list[httpx.Response] = []
        plotting = threading.Thread(target=lambda: answers.append(c.get(f"/v1/jobs/{job_id}/plot.png")))
        plotting.start()
        try:
            assert drawing_started.wait(10)
            assert other.get(f"/v1/jobs/{job_id}", timeout=5).status_code == 200  # while the drawing waits
            assert other.get("/v1/jobs", timeout=5).status_code == 200  # a sync route: the threadpool is free
        finally:
            release.set()
            plotting.join(10)
    assert answers[0].status_code == 200 and answers[0].content == b"drawn"
