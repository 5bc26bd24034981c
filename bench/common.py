"""What the service benchmarks share: a free port, waiting for an API to answer, a fresh PostgreSQL database, a
Redis database number of their own.

Benchmarks run as scripts (`python bench/NAME.py`), so this folder is on their path: `from common import ...`."""

from __future__ import annotations

import os
import random
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import sqlalchemy as sa

PG_ADMIN = os.environ.get("TRICKSERVE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TRICKSERVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379")  # a server: a run claims a database
REDIS_LOCK = "trickserve-test:lock"  # the key by which the tests and benchmarks claim a Redis database number


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, timeout_s: float = 30.0) -> None:
    """Return once the API at `base` answers /healthz."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API at {base} did not start")


@contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database on the machine's server, dropped afterwards."""
    name = f"trickserve_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@contextmanager
def private_redis() -> Iterator[str]:
    """A Redis database number no one else uses (the tests' lock key claims it), emptied afterwards: another run
    on the same Redis must not take this run's messages, nor flush them."""
    import redis

    for db in random.sample(range(1, 16), 15):
        client = redis.Redis.from_url(f"{REDIS}/{db}")
        if not client.set(REDIS_LOCK, secrets.token_hex(8), nx=True, ex=3600):
            continue
        if client.dbsize() != 1:  # someone's data: leave it alone
            client.delete(REDIS_LOCK)
            continue
        try:
            yield f"{REDIS}/{db}"
        finally:
            client.flushdb()
        return
    raise RuntimeError(f"no free database number on {REDIS}")
