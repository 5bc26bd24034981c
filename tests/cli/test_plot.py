"""`trickserve plot JOB|STUDY --out FILE` against a real uvicorn server: the picture the API draws, in the format
the file's suffix names, and the API's error answers as the command's."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from cli import main as cli
from tests.api.conftest import Served
from tests.factories import claim, epoch_event, make_spec, new_key, record


@pytest.fixture
def served(make_server: Callable[..., Served], monkeypatch: pytest.MonkeyPatch) -> Served:
    """A real server; the client finds it and its key through TRICKSERVE_URL and TRICKSERVE_API_KEY."""
    server = make_server()
    monkeypatch.setenv("TRICKSERVE_URL", server.url)
    monkeypatch.setenv("TRICKSERVE_API_KEY", new_key(server.app.state.sessions, "default"))
    return server


def test_a_job_and_a_study_are_saved_in_the_format_of_the_suffix(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    sessions = served.app.state.sessions
    with served.client() as c:
        job_id = c.post("/v1/jobs", json=make_spec()).json()["id"]
        study_id = c.post("/v1/studies", json={"base": make_spec(), "space": {"optim.lr": {"grid": [0.1]}}}).json()
    record(sessions, job_id, claim(sessions, job_id), [epoch_event(1), epoch_event(2)])
    assert cli.main(["plot", job_id, "--out", str(tmp_path / "job.png")]) == 0
    assert (tmp_path / "job.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"saved {tmp_path / 'job.png'}" in capsys.readouterr().out
    assert cli.main(["plot", job_id, "--out", str(tmp_path / "lr.svg"), "--metrics", "lr"]) == 0
    assert "lr" in [e.text for e in ET.parse(tmp_path / "lr.svg").getroot().iter()]
    assert cli.main(["plot", study_id["id"], "--out", str(tmp_path / "study.svg")]) == 0
    assert ET.parse(tmp_path / "study.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"


def test_a_bad_file_name_option_or_id_is_an_error(served: Served, tmp_path: Path):
    with served.client() as c:
        job_id = c.post("/v1/jobs", json=make_spec()).json()["id"]
    cases = [
        (["plot", job_id, "--out", str(tmp_path / "job.jpg")], "name a .png or .svg file"),
        (["plot", "run_1", "--out", str(tmp_path / "x.png")], "neither a job id"),
        (["plot", job_id, "--out", str(tmp_path / "x.png"), "--path", "optim.lr"], "--path is for a study"),
        (["plot", job_id, "--out", str(tmp_path / "x.png"), "--metrics", "val/nope"], "error 422 unknown_metric"),
        (["plot", "job_missing", "--out", str(tmp_path / "x.png")], "error 404 not_found"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert message in str(exc.value.code), argv
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jpg"))
