"""Per-tenant caps under concurrent clients, against a real server on SQLite and PostgreSQL: a check that counts
and then inserts must not let clients that arrive together all pass it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.factories import make_spec, npz_bytes

CLIENTS = 12


def together(n: int, request: Callable[[httpx.Client], httpx.Response], make_client: Callable[[], httpx.Client]):
    """The statuses of `n` requests sent at the same moment, each on a connection of its own."""
    clients = [make_client() for _ in range(n)]
    start = threading.Barrier(n)

    def send(client: httpx.Client) -> int:
        start.wait()
        return request(client).status_code

    try:
        with ThreadPoolExecutor(n) as pool:
            return sorted(pool.map(send, clients))
    finally:
        for client in clients:
            client.close()


def test_concurrent_submissions_never_pass_the_active_job_cap(make_server: Callable[..., Any], db_url: str):
    served = make_server(database_url=db_url, max_active_jobs_per_tenant=5)
    with served.client(timeout=60) as http:
        first = http.post("/v1/jobs", json=make_spec()).json()["id"]  # the first submission loads the engine
        http.post(f"/v1/jobs/{first}/cancel").raise_for_status()
        for _ in range(3):
            statuses = together(CLIENTS, lambda c: c.post("/v1/jobs", json=make_spec()), lambda: http_like(http))
            active = http.get("/v1/jobs", params={"status": "queued,running"}).json()["items"]
            assert (statuses.count(201), len(active)) == (5, 5)
            assert statuses.count(429) == CLIENTS - 5
            for job in active:  # a cancelled job frees its place for the next round
                http.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()


def test_concurrent_uploads_never_pass_the_storage_quota(make_server: Callable[..., Any], db_url: str):
    served = make_server(database_url=db_url, max_dataset_storage_mb=1)
    data = npz_bytes(n=6000, features=10)  # about 290 KiB: three fit in 1 MiB
    with served.client(timeout=60) as http:
        statuses = together(
            8, lambda c: c.post("/v1/datasets", files={"file": ("d.npz", data)}), lambda: http_like(http)
        )
        stored = http.get("/v1/datasets").json()["items"]
    assert statuses.count(201) == len(stored) == 3
    assert statuses.count(413) == 5
    assert sum(d["size_bytes"] for d in stored) <= 2**20


def http_like(http: httpx.Client) -> httpx.Client:
    """Another client of the same server with the same key."""
    return httpx.Client(base_url=http.base_url, headers=http.headers, timeout=60)
