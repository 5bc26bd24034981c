"""The client commands (`submit`, `jobs`, `show`, `cancel`) and the event-stream reader against a real uvicorn
server. No worker runs: the test writes a job's events through core.jobs, as a worker would."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from cli import main as cli
from cli.client import parse_sse, stream_events
from core import jobs
from tests.api.conftest import Served
from tests.factories import claim, epoch_event, finish, make_spec, new_key, record


@pytest.fixture
def served(make_server: Callable[..., Served], monkeypatch: pytest.MonkeyPatch) -> Served:
    """A real server; the client finds it and its key through TRICKSERVE_URL and TRICKSERVE_API_KEY."""
    server = make_server(max_epochs=50)
    monkeypatch.setenv("TRICKSERVE_URL", server.url)
    monkeypatch.setenv("TRICKSERVE_API_KEY", new_key(server.app.state.sessions, "default"))
    return server


@pytest.fixture
def trickserve(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[str, str]]:
    """Run `trickserve ARGV...` in this process; returns (stdout, stderr); a failing command raises SystemExit."""

    def run(*argv: str) -> tuple[str, str]:
        capsys.readouterr()
        try:
            assert cli.main(list(argv)) == 0
        finally:
            captured = capsys.readouterr()
            print(captured.out, captured.err)  # shown by pytest when the test fails
        return captured.out, captured.err

    return run


def write_spec(tmp_path: Path, **overrides: Any) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(make_spec(**overrides)))
    return str(path)


# ------------------------------------------------------------------------------------------- parse_sse


def test_parse_sse_reads_ids_event_names_and_multi_line_data_and_skips_comments_and_empty_messages():
    text = (
        ": ping\n"
        "\n"
        "id: 7\n"
        "event: epoch_end\n"
        'data: {"epoch": 1,\n'
        'data:  "val/loss": 0.5}\n'
        "\n"
        "id: 8\n"
        "event: status\n"
        "\n"  # no data: not a message
        "event: end\n"
        'data:{"status": "succeeded"}\n'
        "\n"
    )
    messages = list(parse_sse(iter(text.split("\n"))))
    assert messages == [
        ("7", "epoch_end", {"epoch": 1, "val/loss": 0.5}),
        (None, "end", {"status": "succeeded"}),  # a message's id does not leak into the next one
    ]


# ------------------------------------------------------------------------------------------- commands


def test_submit_jobs_show_cancel_print_what_the_server_has(
    served: Served, sessions: sessionmaker[Session], tmp_path: Path, trickserve: Callable[..., tuple[str, str]]
):
    out, err = trickserve("submit", write_spec(tmp_path, name="first", train={"early_stopping": {"patience": 1}}))
    assert out.startswith("submitted ") and out.strip().endswith("(queued)")
    first = out.split()[1]
    assert "[info] NO_RESTORE_BEST: " in err  # the advice the server gave, on stderr
    second = trickserve("submit", write_spec(tmp_path, name="second"))[0].split()[1]
    with served.client() as http:
        assert {j["id"] for j in http.get("/v1/jobs").json()["items"]} == {first, second}

    attempt = claim(sessions, first)
    record(sessions, first, attempt, [epoch_event(1)])
    finish(sessions, first, attempt, final_metrics={"test/acc": 0.875, "test/loss": 0.25, "epochs": 3})

    listed = trickserve("jobs")[0].splitlines()
    assert [line.split()[:3] for line in listed] == [[second, "queued", "second"], [first, "succeeded", "first"]]
    assert "test/acc=0.8750" in listed[1]
    assert trickserve("jobs", "--status", "queued")[0].split()[0] == second

    shown = trickserve("show", first)[0]
    assert shown.splitlines()[0].split() == [first, "first", "succeeded", "attempt", str(attempt)]
    assert "final: test/acc=0.8750  test/loss=0.2500" in shown

    assert trickserve("cancel", second)[0].split() == [second, "cancelled"]
    with served.client() as http:
        assert http.get(f"/v1/jobs/{second}").json()["status"] == "cancelled"


def test_a_spec_the_service_refuses_exits_naming_the_field(
    served: Served, tmp_path: Path, trickserve: Callable[..., tuple[str, str]]
):
    with pytest.raises(SystemExit) as refused:
        trickserve("submit", write_spec(tmp_path, train={"epochs": 500}))  # valid, but over this service's cap
    assert "422 invalid_spec" in str(refused.value) and "train.epochs: at most 50 epochs" in str(refused.value)


def test_an_invalid_spec_exits_naming_the_field_before_anything_is_sent(
    served: Served, tmp_path: Path, trickserve: Callable[..., tuple[str, str]]
):
    with pytest.raises(SystemExit) as refused:
        trickserve("submit", write_spec(tmp_path, model={"arch": "mlp", "dropout": 1.5}))
    assert "model.dropout" in str(refused.value)
    with served.client() as http:
        assert http.get("/v1/jobs").json()["items"] == []


def test_an_unknown_job_exits_with_the_servers_answer(served: Served, trickserve: Callable[..., tuple[str, str]]):
    with pytest.raises(SystemExit) as refused:
        trickserve("show", "job_doesnotexist")
    assert str(refused.value).startswith("error 404")


def test_an_unreachable_service_exits_with_advice(
    monkeypatch: pytest.MonkeyPatch, trickserve: Callable[..., tuple[str, str]]
):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("TRICKSERVE_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(SystemExit) as refused:
            trickserve("jobs")
    assert "cannot reach" in str(refused.value) and "trickserve up" in str(refused.value)


# ----------------------------------------------------------------------------------------- event stream


def submit(served: Served) -> str:
    with served.client() as http:
        return http.post("/v1/jobs", json=make_spec()).json()["id"]


def test_stream_events_yields_events_as_they_are_written_and_stops_at_end(
    served: Served, sessions: sessionmaker[Session]
):
    job_id = submit(served)
    attempt = claim(sessions, job_id)
    events = stream_events(job_id)
    received = [next(events), next(events)]
    assert [(kind, e["data"]["to"]) for kind, e in received] == [("status", "queued"), ("status", "running")]
    record(sessions, job_id, attempt, [epoch_event(1)])
    kind, live = next(events)
    assert kind == "epoch_end" and live["epoch"] == 1 and live["data"]["val/loss"] == 1.5
    record(sessions, job_id, attempt, [epoch_event(2)])
    finish(sessions, job_id, attempt, status="early_stopped", stop_reason="early_stop")
    rest = list(events)  # ends by itself after `end`
    assert [kind for kind, _ in rest] == ["epoch_end", "status", "end"]
    assert rest[-1][1] == {"status": "early_stopped"}


class Link:
    """A TCP relay in front of the server whose open connections the test can cut, as a network drop would."""

    def __init__(self, target: str):
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            self.connections += 1
            self._open += [downstream, upstream]
            threading.Thread(target=_pump, args=(downstream, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, downstream), daemon=True).start()

    def cut(self) -> None:
        """Drop every open connection at once."""
        for s in self._open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._open.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def link(served: Served, monkeypatch: pytest.MonkeyPatch) -> Iterator[Link]:
    """The client reaches the server through a Link."""
    relay = Link(served.url)
    monkeypatch.setenv("TRICKSERVE_URL", relay.url)
    yield relay
    relay.close()


def test_after_a_dropped_connection_every_event_arrives_exactly_once_in_order(
    served: Served, link: Link, sessions: sessionmaker[Session]
):
    job_id = submit(served)
    attempt = claim(sessions, job_id)
    record(sessions, job_id, attempt, [epoch_event(1)])
    events = stream_events(job_id)
    before = [next(events) for _ in range(3)]  # queued, running, epoch 1
    assert before[-1][1]["epoch"] == 1
    link.cut()
    record(sessions, job_id, attempt, [epoch_event(2)])  # while the client is away
    kind, after = next(events)
    assert link.connections == 2  # it did reconnect
    assert (kind, after["epoch"]) == ("epoch_end", 2)
    record(sessions, job_id, attempt, [epoch_event(3)])
    finish(sessions, job_id, attempt)
    rest = list(events)
    received = before + [(kind, after)] + rest
    assert [e["epoch"] for k, e in received if k == "epoch_end"] == [1, 2, 3]
    assert [k for k, _ in received if k != "epoch_end"] == ["status", "status", "status", "end"]
    with sessions() as s:
        stored = [(e.kind, e.epoch, e.data) for e in jobs.list_events(s, job_id)]
    assert [(k, e["epoch"], e["data"]) for k, e in received if k != "end"] == stored  # no gap, no repeat
