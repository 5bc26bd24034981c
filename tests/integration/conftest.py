"""Real processes for integration tests: Celery workers (embedded: SQLite file + filesystem broker; production:
PostgreSQL + Redis), a private redis-server that a test may stop and restart, and a uvicorn API server."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from core import tenants
from core.config import Settings
from core.db import Database, init_db
from core.dispatch import dispatch
from core.models import Job
from tests.conftest import _new_postgres_database
from tests.factories import TENANT, Backend, wait_for
from worker.celery_app import WorkerApp, create_app

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("TRICKSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_LOCK = "trickserve-test:lock"
TERMINAL = ("succeeded", "early_stopped", "failed", "cancelled")
# Short enough that a lost worker is noticed within seconds: a lease of 3 s renewed every 0.2 s, swept every 0.5 s.
FAST = {"HEARTBEAT_S": "0.2", "LEASE_S": "3", "REAPER_INTERVAL_S": "0.5"}


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _private_redis_db() -> Iterator[str]:
    """The URL of a Redis database number no one else uses (claimed with a lock key), emptied afterwards."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis unreachable at {REDIS_URL}: {exc}")
    for db in random.sample(range(1, 16), 15):
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_connect_timeout=2)
        if not client.set(REDIS_LOCK, secrets.token_hex(8), nx=True, ex=600):
            continue
        if client.dbsize() != 1:  # someone's data: leave it alone
            client.delete(REDIS_LOCK)
            continue
        try:
            yield f"{REDIS_URL}/{db}"
        finally:
            client.flushdb()
        return
    pytest.fail("no free Redis database number")


class OwnRedis:
    """A redis-server of the test's own on a free port (no persistence): `stop` and `start` it at will. A restart
    loses every key, as a Redis without persistence does."""

    def __init__(self, log_path: Path):
        if shutil.which("redis-server") is None:
            _unavailable("redis-server is not installed")
        self.port, self.log_path = free_port(), log_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no"]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), timeout=10, what="redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass
class Service(Backend):
    """A Backend whose jobs go to real worker processes through the broker, as the API sends them."""

    publisher: WorkerApp

    def enqueue_new(self, spec: dict, **kwargs: object) -> Job:
        """Submit through core and dispatch after the commit, as the API does."""
        job = self.submit(spec, **kwargs)
        with self.session() as session:
            assert dispatch(session, job, self.publisher.send_run_job) == [job.job_id]
        return job

    def wait_terminal(self, job_id: str, *workers: Worker, timeout: float = 25.0) -> Job:
        try:
            wait_for(lambda: self.load(job_id).status in TERMINAL, timeout=timeout, what=f"{job_id} to finish")
        except AssertionError:
            for worker in workers:
                print(f"--- {worker.log_path.name}\n{worker.log()}")
            raise
        return self.load(job_id)

    def running_pid(self, job_id: str) -> int:
        """The process that runs the job now: worker ids are `<node>/<pid>` of the pool child holding the lease."""
        owner = self.load(job_id).lease_owner
        assert owner, f"{job_id} is not running"
        return int(owner.rsplit("/", 1)[1])

    def api_key(self, tenant_id: str = TENANT) -> str:
        """A new bearer key of `tenant_id`."""
        with self.session() as session:
            tenants.create_tenant(session=session, tenant_id=tenant_id)
            return tenants.create_api_key(session=session, tenant_id=tenant_id, name="tests")


def configure(
    monkeypatch: pytest.MonkeyPatch,
    home: Path,
    database_url: str,
    broker_url: str,
    redis_url: str | None = None,
    **extra: str,
) -> Service:
    """Point the workers and API servers this test starts (through TRICKSERVE_* variables) at these backends, with
    the FAST lease timings (`extra` overrides them: NAME=value without the prefix); this process gets the same
    settings, its own database connections and a publisher for them. Close it with `close`."""
    monkeypatch.setenv("TRICKSERVE_HOME", str(home))
    # Tiny models gain nothing from threads, and spinning OpenMP threads slow a job on a busy CI machine tenfold.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name, value in {**FAST, **extra}.items():
        monkeypatch.setenv(f"TRICKSERVE_{name}", value)
    monkeypatch.setenv("TRICKSERVE_DATABASE_URL", database_url)
    monkeypatch.setenv("TRICKSERVE_BROKER_URL", broker_url)
    if redis_url:
        monkeypatch.setenv("TRICKSERVE_REDIS_URL", redis_url)
    else:
        monkeypatch.delenv("TRICKSERVE_REDIS_URL", raising=False)
    settings = Settings()  # what the processes started with this environment read
    db = Database.from_settings(settings)
    publisher = create_app(settings)
    publisher.db = db
    return Service(settings, db, publisher)


def close(service: Service) -> None:
    service.db.dispose()


@contextmanager
def _databases(mode: str, tmp_path: Path, migrated_sqlite: Path) -> Iterator[tuple[str, str]]:
    if mode == "embedded":
        shutil.copy(migrated_sqlite, tmp_path / "trickserve.db")
        yield f"sqlite:///{tmp_path / 'trickserve.db'}", "filesystem://"
        return
    with _new_postgres_database() as database_url, _private_redis_db() as broker_url:
        init_db(database_url)
        yield database_url, broker_url


@contextmanager
def service_in(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_sqlite: Path) -> Iterator[Service]:
    with _databases(mode, tmp_path, migrated_sqlite) as (database_url, broker_url):
        redis_url = broker_url if broker_url.startswith("redis") else None
        service = configure(monkeypatch, tmp_path / "home", database_url, broker_url, redis_url)
        yield service
        close(service)


@pytest.fixture(params=["embedded", "production"])
def service(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_sqlite: Path) -> Iterator[Service]:
    """The service's backends in one mode (short heartbeat, lease and reaper interval), shared with the workers
    through TRICKSERVE_* variables."""
    with service_in(request.param, tmp_path, monkeypatch, _migrated_sqlite) as settings:
        yield settings


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_sqlite: Path) -> Iterator[Service]:
    with service_in("embedded", tmp_path, monkeypatch, _migrated_sqlite) as settings:
        yield settings


@pytest.fixture
def production(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_sqlite: Path) -> Iterator[Service]:
    with service_in("production", tmp_path, monkeypatch, _migrated_sqlite) as settings:
        yield settings


class Worker:
    """One `celery worker` process in a session of its own; `kill` ends its whole process group."""

    def __init__(
        self, log_path: Path, queues: str = "cpu,gpu", env: dict[str, str] | None = None, cgroup: Path | None = None
    ):
        self.log_path = log_path
        argv = [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "-Q", queues,
                "-n", f"test-{secrets.token_hex(4)}@%h", "--loglevel", "INFO",
                "--without-mingle", "--without-gossip", "--without-heartbeat"]  # fmt: skip
        # In a cgroup from its first instruction, so that its pool processes are too.
        join = None if cgroup is None else lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(env or {})}, preexec_fn=join)  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once, as a crash or the OOM killer would."""
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group (main process and pool children)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log(self, tail: int | None = 6000) -> str:
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(cgroup: Path | None = None, **env: str) -> Worker:
        workers.append(Worker(tmp_path / f"worker-{len(workers)}.log", env=env, cgroup=cgroup))
        return workers[-1]

    yield start
    for worker in workers:
        worker.signal(signal.SIGCONT)  # a test that paused one must not leave it stopped
        worker.kill()


# --------------------------------------------------------------------------------------------- the API


class ApiServer:
    """`trickserve api` in a process of its own on a fixed port: `stop` it (SIGTERM, then SIGKILL)
    and `start` it again on the same port and database, as a deploy or a crash would."""

    def __init__(self, log_path: Path, key: str | None, processes: int = 1):
        self.port, self.log_path, self.processes = free_port(), log_path, processes
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        argv = [sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(self.port),
                "--graceful-shutdown-s", "2", "--workers", str(self.processes)]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._answers, timeout=30, what="the API to answer")

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=httpx.Timeout(10, read=30))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[[Service], ApiServer]]:
    servers: list[ApiServer] = []

    def start(service: Service, processes: int = 1) -> ApiServer:
        servers.append(ApiServer(tmp_path / f"api-{len(servers)}.log", service.api_key(), processes))
        return servers[-1]

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


def sse_events(client: httpx.Client, job_id: str, last_event_id: str | None = None) -> Iterator[dict[str, str]]:
    """Parse the job's event stream into dicts {id, event, data}; ends when the server closes it."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        message: dict[str, str] = {}
        for line in response.iter_lines():
            if line == "":
                if "data" in message or "id" in message:
                    yield message
                message = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                message[field] = value[1:] if value.startswith(" ") else value


class Follower(threading.Thread):
    """A client of a job's event stream that reconnects with Last-Event-ID whenever the stream breaks or the API is
    away, until the `end` event; keeps every event id it received, in order."""

    def __init__(self, api: ApiServer, job_id: str, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.api, self.job_id, self.timeout = api, job_id, timeout
        self.ids: list[int] = []
        self.end: str | None = None
        self.connects = 0
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        last: str | None = None
        with self.api.client() as client:
            while self.end is None and time.monotonic() < deadline:
                try:
                    self.connects += 1
                    for message in sse_events(client, self.job_id, last):
                        if message.get("event") == "end":
                            self.end = json.loads(message["data"])["status"]
                            return
                        self.ids.append(int(message["id"]))
                        last = message["id"]
                except (httpx.HTTPError, AssertionError) as exc:  # the API is away, or answered while stopping
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.1)

    def result(self) -> tuple[str | None, list[int]]:
        self.join(self.timeout)
        assert not self.is_alive(), "the event stream never ended"
        return self.end, self.ids
