"""The study commands (`study submit [--watch]`, `show`, `list`, `cancel`) against a real uvicorn server. Trials
run in this process, in a thread that runs each queued job as a worker would."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from cli import main as cli
from core.config import Settings
from core.db import Database
from core.models import Job, JobStatus
from tests.api.conftest import Served
from tests.factories import make_spec, new_key, wait_for
from worker import runner

STOPS_AT_ONCE = {"monitor": "val/loss", "patience": 0, "min_delta": 100.0}  # no epoch improves on the first


@pytest.fixture
def served(make_server: Callable[..., Served], monkeypatch: pytest.MonkeyPatch) -> Served:
    """A real server; the client finds it and its key through TRICKSERVE_URL and TRICKSERVE_API_KEY."""
    server = make_server(max_epochs=50)
    monkeypatch.setenv("TRICKSERVE_URL", server.url)
    monkeypatch.setenv("TRICKSERVE_API_KEY", new_key(server.app.state.sessions, "default"))
    return server


@pytest.fixture
def trickserve(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `trickserve ARGV...` in this process; returns (exit code, stdout, stderr); an error exit raises
    SystemExit."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli.main(list(argv))
        finally:
            captured = capsys.readouterr()
            print(captured.out, captured.err)  # shown by pytest when the test fails
        return code, captured.out, captured.err

    return run


def write_study(tmp_path: Path, **overrides: Any) -> str:
    """A study file in YAML whose base is a JSON spec file beside it."""
    (tmp_path / "base.json").write_text(json.dumps(make_spec()))
    study = {"name": "lr", "base": "base.json", "space": {"optim.lr": {"grid": [0.01, 0.1]}}, **overrides}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


@contextmanager
def worker(settings: Settings) -> Iterator[None]:
    """Runs every queued job, one at a time, in a thread, as a worker would, until the block ends."""
    db = Database.from_settings(settings)
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.02):
            with db.session(read_only=True) as session:
                queued = list(session.scalars(select(Job.job_id).where(Job.status == JobStatus.queued)))
            for job_id in queued:
                runner.run_job(job_id, worker_id="test-worker", settings=settings, db=db)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=30)
        db.dispose()


def study_of(served: Served, study_id: str) -> dict[str, Any]:
    with served.client() as http:
        return http.get(f"/v1/studies/{study_id}").json()


def row(text: str, first: str) -> list[str]:
    """The cells of the table line of `text` that starts with `first` (cells are two or more spaces apart)."""
    line = next(line for line in text.splitlines() if line.startswith(f"{first}  "))
    return [cell.strip() for cell in line.split("  ") if cell.strip()]


def g(x: float) -> str:
    return f"{x:.4g}"


# ---------------------------------------------------------------------------------------------- tests


def test_submit_list_cancel_print_what_the_server_has(
    served: Served, tmp_path: Path, trickserve: Callable[..., tuple[int, str, str]]
):
    code, out, err = trickserve("study", "submit", write_study(tmp_path, seeds=[0, 1]), "--idempotency-key", "k")
    assert code == 0 and out.startswith("submitted stu_")
    assert out.split(" ", 2)[2].strip() == "(queued): 4 trials, 2 at a time"
    study_id = out.split()[1]
    stored = study_of(served, study_id)
    assert stored["spec"]["base"]["model"]["layers"] == [32]  # the base file beside the study file was sent
    assert [t["status"] for t in stored["trials"]] == ["queued", "queued"]

    assert (
        trickserve("study", "submit", write_study(tmp_path, seeds=[0, 1]), "--idempotency-key", "k")[1].split()[1]
        == study_id
    )
    _, advice_out, advice = trickserve("study", "submit", write_study(tmp_path, name="one-seed"))
    assert "[info] one_seed (seeds): with one seed per point there are no intervals" in advice
    other_id = advice_out.split()[1]

    listed = trickserve("study", "list")[1].splitlines()
    assert [line.split()[:4] for line in listed] == [
        [other_id, "queued", "one-seed", "2/2"],
        [study_id, "queued", "lr", "2/4"],
    ]
    assert trickserve("study", "list", "--limit", "1")[1].split()[0] == other_id

    assert trickserve("study", "cancel", study_id)[1].split() == [study_id, "cancelled"]
    cancelled = study_of(served, study_id)
    assert cancelled["status"] == "cancelled" and {t["status"] for t in cancelled["trials"]} == {"cancelled"}
    assert trickserve("study", "show", study_id)[1].splitlines()[0].split() == [
        study_id,
        "lr",
        "cancelled",
        "2/4",
        "trials",
    ]


def test_a_study_the_service_refuses_exits_naming_each_path(
    served: Served, tmp_path: Path, trickserve: Callable[..., tuple[int, str, str]]
):
    space = {"optim.lr": {"grid": [0.01, 0.1]}, "model.dropout": {"grid": [0.1, 1.5]}}
    with pytest.raises(SystemExit) as refused:
        trickserve("study", "submit", write_study(tmp_path, space=space, seeds=[0, 0]))
    assert "422 invalid_spec" in str(refused.value) and "\n  seeds: Value error, seeds must be distinct" in str(
        refused.value
    )

    with pytest.raises(SystemExit) as refused:
        trickserve("study", "submit", write_study(tmp_path, space=space))
    assert "\n  space.model.dropout: 1.5: " in str(refused.value)

    with served.client() as http:
        assert http.get("/v1/studies").json()["items"] == []


def test_watch_follows_the_trials_to_the_end_and_show_prints_the_verdict_with_the_servers_numbers(
    served: Served, tmp_path: Path, trickserve: Callable[..., tuple[int, str, str]]
):
    space = {"train.early_stopping": {"grid": [None, STOPS_AT_ONCE]}}
    with worker(served.app.state.settings):
        code, out, _ = trickserve("study", "submit", write_study(tmp_path, space=space, seeds=[0, 1]), "--watch")
    assert code == 0
    study_id = out.split()[1]
    study = study_of(served, study_id)
    assert study["status"] == "succeeded"

    lines = out.splitlines()
    for trial in study["trials"]:
        n, value = trial["number"], json.dumps(trial["params"]["train.early_stopping"])
        assert f"trial #{n} created: train.early_stopping={value} seed {trial['seed']}" in lines
        assert f"trial #{n} started (attempt 1)" in lines
        assert f"trial #{n} {trial['status']} after {trial['epochs']} epochs, objective {g(trial['value'])}" in lines
    assert lines.index("study succeeded: 4 trials ended") < lines.index(study["id"] + "  lr  succeeded  4/4 trials")

    _, shown, _ = trickserve("study", "show", study_id)
    assert shown in out  # --watch ends with what `show` prints
    best = study["verdict"]["best_trial"]
    assert f"best: trial #{best['number']} ({best['job_id']}), objective {g(best['value'])}" in shown
    for trial in study["trials"]:
        early = trial["params"]["train.early_stopping"] is not None
        stars = " *" if trial["job_id"] == best["job_id"] else ""
        assert row(shown, str(trial["number"]))[2:] == [
            str(trial["seed"]),
            "early_stopped" if early else "succeeded",
            "2/3" if early else "3/3",
            g(trial["value"]) + stars,
        ]

    (parameter,) = study["verdict"]["parameters"]
    assert f"train.early_stopping: {parameter['conclusion']}" in shown
    for value in parameter["values"]:
        cells = row(shown, json.dumps(value["value"]))
        assert cells[1:5] == ["2", g(value["mean"]), g(value["sd"]), f"[{g(value['ci95'][0])}, {g(value['ci95'][1])}]"]
        if value["verdict"] == "best":
            assert cells[5:] == ["best"]
        else:
            effect = value["effect"]
            low, high = effect["ci95"]
            paired = f" (paired, {effect['n']})" if effect["method"] == "paired" else ""
            assert cells[5:] == [f"{effect['diff']:+.4g}{paired}", f"[{g(low)}, {g(high)}]", value["verdict"]]


def test_on_a_terminal_watch_redraws_a_table_of_the_trials_in_place(
    served: Served, tmp_path: Path, trickserve: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # rich asks the same file

    def cancel_once_submitted() -> None:
        with served.client() as http:
            study_id = wait_for(lambda: http.get("/v1/studies").json()["items"], what="the study")[0]["id"]
            time.sleep(0.5)  # a frame or two
            http.post(f"/v1/studies/{study_id}/cancel").raise_for_status()

    canceller = threading.Thread(target=cancel_once_submitted, daemon=True)
    canceller.start()
    code, out, _ = trickserve("study", "submit", write_study(tmp_path), "--watch")
    canceller.join()
    assert code == 1  # not succeeded
    live, final = out.split("\x1b[?25h")  # the cursor is shown again when the live table is done
    assert "─────" in live and "\x1b[1A\x1b[2K" in live  # a ruled table, erased line by line to be redrawn
    assert [line.split()[-2:] for line in live.splitlines() if line.lstrip().startswith(("0 ", "1 "))][:2] == [
        ["queued", "0/3"],
        ["queued", "0/3"],
    ]
    events = [  # printed above the table, which is redrawn under them
        "study cancel requested: no trial is made any more, the active ones are cancelled",
        "trial #0 cancelled after 0 epochs",
        "trial #1 cancelled after 0 epochs",
        "study cancelled: cancelled",
    ]
    at = [live.find(f"\x1b[2K{line}\n") for line in events]
    assert -1 not in at and at == sorted(at), at
    assert [row(final, n)[3] for n in ("0", "1")] == ["cancelled", "cancelled"]
