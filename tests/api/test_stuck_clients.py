"""Clients that stall or vanish, against a real server over raw sockets: event streams that are never read, bodies
that stop arriving, uploads cut off by the client, and the temporary files of uploads an API never finished."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from tests.factories import auth_headers, claim, epoch_event, make_spec, npz_bytes, record, wait_for

BOUNDARY = "b0undary"
UPLOAD_HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n'
    "Content-Type: application/octet-stream\r\n\r\n"
).encode()


def send_head(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"", **sockopts: int):
    """Open a connection and send a request's head and `body` (perhaps only the start of what Content-Length
    promises); returns the socket, for the caller to read from, leave unread or close."""
    parts = urlsplit(url)
    sock = socket.socket()
    for option, value in sockopts.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), value)
    sock.settimeout(10)
    sock.connect((parts.hostname, parts.port))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def status_of(sock: socket.socket) -> int:
    """The status of the answer on `sock` (socket.timeout when none comes)."""
    return int(sock.makefile("rb").readline().split()[1])


def upload_head(served: Any, size: int) -> tuple[dict[str, str], bytes]:
    """The headers of a dataset upload whose body will be `size` bytes, and the start of that body."""
    headers = {**auth_headers(served.app, "default"), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return {**headers, "Content-Length": str(size)}, UPLOAD_HEAD + npz_bytes()[:1000]


def upload_temps(settings: Settings) -> list[Path]:
    return list(settings.dataset_dir.glob("*/.upload-*"))


def open_streams(served: Any) -> int:
    return served.app.state.stream_slots.open["default"]


# ------------------------------------------------------------------------------------------- event streams


def test_streams_never_read_are_dropped_and_give_their_slots_back(
    make_server: Callable[..., Any], sessions: sessionmaker[Session]
):
    served = make_server(sse_max_connections_per_tenant=3, write_timeout_s=1)
    with served.client(timeout=10) as http:
        job_id = http.post("/v1/jobs", json=make_spec()).json()["id"]
        attempt = claim(sessions, job_id)
        record(sessions, job_id, attempt, [epoch_event(i, note="x" * 400) for i in range(1, 60)])  # ~30 KB to send
        auth = {"Authorization": http.headers["authorization"]}
        path = f"/v1/jobs/{job_id}/events"
        # A receive buffer of a few KiB, never read: the client's window shuts while the replay is being sent.
        stuck = [send_head(served.url, "GET", path, auth, SO_RCVBUF=1024) for _ in range(3)]
        try:
            wait_for(lambda: open_streams(served) == 3, timeout=10, what="the three streams to start")
            assert http.get(path).status_code == 429
            wait_for(lambda: open_streams(served) == 0, timeout=30, what="the unread streams to be dropped")
            with http.stream("GET", path) as response:
                assert response.status_code == 200
        finally:
            for sock in stuck:
                sock.close()


# ------------------------------------------------------------------------------------------ stalled bodies


@pytest.fixture
def stalling(make_server: Callable[..., Any]) -> Any:
    return make_server(request_body_timeout_s=0.5)


def test_a_json_body_that_stops_arriving_is_408(stalling: Any):
    headers = {**auth_headers(stalling.app, "default"), "Content-Type": "application/json", "Content-Length": "500"}
    with send_head(stalling.url, "POST", "/v1/jobs", headers, b'{"name": "sta') as sock:
        assert status_of(sock) == 408


def test_an_upload_that_stops_arriving_is_408_and_leaves_no_file(stalling: Any, settings: Settings):
    headers, head = upload_head(stalling, size=100_000)
    with send_head(stalling.url, "POST", "/v1/datasets", headers, head) as sock:
        assert status_of(sock) == 408
    assert upload_temps(settings) == []


def test_many_stalled_requests_are_all_answered(stalling: Any):
    headers, head = upload_head(stalling, size=100_000)
    socks = [send_head(stalling.url, "POST", "/v1/datasets", headers, head) for _ in range(20)]
    try:
        assert [status_of(sock) for sock in socks] == [408] * 20
    finally:
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------------------------------- aborted uploads


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of the app and of uvicorn (whose loggers do not propagate to the root)."""
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    yield caplog
    uvicorn_log.removeHandler(caplog.handler)


def test_uploads_cut_off_by_the_client_log_one_info_line_each(
    make_server: Callable[..., Any], settings: Settings, server_log: pytest.LogCaptureFixture
):
    served = make_server()
    headers, head = upload_head(served, size=500_000)
    for _ in range(3):
        with send_head(served.url, "POST", "/v1/datasets", headers, head):
            wait_for(lambda: upload_temps(settings), timeout=10, what="the upload to start")
        wait_for(lambda: not upload_temps(settings), timeout=10, what="the cut-off upload's file to go")

    def aborted() -> list[logging.LogRecord]:
        return [r for r in server_log.records if "disconnected" in r.getMessage()]

    wait_for(lambda: len(aborted()) == 3, timeout=10, what="a log line for each aborted upload")
    assert [r.levelno for r in aborted()] == [logging.INFO] * 3
    assert [r for r in server_log.records if r.levelno >= logging.WARNING or r.exc_info] == []
    assert upload_temps(settings) == []


# --------------------------------------------------------------------------------------- stale temp files


def test_temporary_files_of_unfinished_uploads_are_swept_at_start_and_later(
    make_server: Callable[..., Any], settings: Settings
):
    folder = settings.dataset_dir / "default"
    folder.mkdir(parents=True)
    before, dataset = folder / ".upload-before.npz", folder / "ds_kept.npz"
    for path in (before, dataset):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 60, time.time() - 60))  # left by an API killed a minute ago
    make_server(upload_temp_max_age_s=2, request_body_timeout_s=1)
    assert not before.exists()  # swept before the server answered its first request
    later = folder / ".upload-later.npz"
    later.write_bytes(b"x")
    wait_for(lambda: not later.exists(), timeout=10, what="the periodic sweep")
    assert dataset.exists()
