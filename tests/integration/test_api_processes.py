"""`trickserve api --workers N`: several API processes behind one port, on PostgreSQL and Redis. They share the
per-tenant stream cap through Redis, and the supervisor replaces a process that dies."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.factories import make_spec, wait_for
from tests.integration.conftest import ApiServer, Service

pytestmark = pytest.mark.integration


def serving_processes(api: ApiServer) -> list[int]:
    """The API processes the supervisor started (multiprocessing spawns them)."""
    assert api.proc is not None
    children = Path(f"/proc/{api.proc.pid}/task/{api.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def stream_status(http: httpx.Client, job_id: str) -> int:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        return response.status_code


def test_the_stream_cap_of_a_tenant_holds_across_api_processes(production: Service, start_api, monkeypatch):
    monkeypatch.setenv("TRICKSERVE_SSE_MAX_CONNECTIONS_PER_TENANT", "1")
    api = start_api(production, processes=2)
    wait_for(lambda: len(serving_processes(api)) == 2, what="two API processes")
    with api.client() as http, api.client() as other:
        job_id = http.post("/v1/jobs", json=make_spec()).json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as open_stream:
            assert open_stream.status_code == 200
            # New connections land on either process: each of them counts the stream the other one serves.
            assert {stream_status(other, job_id) for _ in range(8)} == {429}
        wait_for(lambda: stream_status(other, job_id) == 200, timeout=10, what="the slot to come back")


def test_a_dead_api_process_is_replaced_and_the_port_keeps_answering(production: Service, start_api):
    api = start_api(production, processes=2)
    wait_for(lambda: len(serving_processes(api)) == 2, what="two API processes")
    victim = serving_processes(api)[0]
    os.kill(victim, signal.SIGKILL)
    with api.client() as http:
        assert all(http.get("/v1/jobs").status_code == 200 for _ in range(10))  # the survivor answers meanwhile
    wait_for(lambda: len(serving_processes(api)) == 2 and victim not in serving_processes(api), timeout=30,
             what="a replacement process")  # fmt: skip
