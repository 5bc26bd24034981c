"""API test fixtures: a migrated SQLite file per test, the app with a recording send, a TestClient
authenticated as tenant `default`, and a real uvicorn server for streams."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from api.server import listening_socket
from core.config import Settings
from core.db import create_db_engine, init_db, make_sessionmaker
from tests.factories import auth_headers

TEST_SETTINGS: dict[str, Any] = {"max_upload_mb": 1, "max_body_kb": 64, "default_page_size": 20, "max_page_size": 100}


class RecordingEnqueue:
    """Stands in for the broker: records (job_id, queue), or fails like an unreachable broker."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = False
        self.on_call: Callable[[str], None] | None = None

    def __call__(self, job_id: str, queue: str) -> None:
        if self.on_call is not None:
            self.on_call(job_id)
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.calls.append((job_id, queue))


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api-template") / "trickserve.db"
    init_db(f"sqlite:///{path}")
    return path


@pytest.fixture
def make_settings(tmp_path: Path, migrated_template: Path) -> Callable[..., Settings]:
    """Settings on this test's own migrated SQLite file, with small limits; keyword arguments override."""
    db = tmp_path / "trickserve.db"
    shutil.copy(migrated_template, db)

    def make(**overrides: Any) -> Settings:
        return Settings(**{"home": tmp_path, "database_url": f"sqlite:///{db}", **TEST_SETTINGS, **overrides})

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def enqueue() -> RecordingEnqueue:
    return RecordingEnqueue()


@pytest.fixture
def make_app(enqueue: RecordingEnqueue) -> Callable[[Settings], FastAPI]:
    def make(settings: Settings) -> FastAPI:
        return create_app(settings, send=enqueue)

    return make


@pytest.fixture
def make_client(make_app: Callable[[Settings], FastAPI], make_settings: Callable[..., Settings]) -> Iterator[Any]:
    """A started TestClient for settings made with these overrides, authenticated as tenant `default`."""
    with ExitStack() as stack:

        def make(**overrides: Any) -> TestClient:
            client = stack.enter_context(TestClient(make_app(make_settings(**overrides))))
            client.headers.update(auth_headers(client.app, "default"))
            return client

        yield make


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the test's database, for writing what a worker would write."""
    engine = create_db_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@dataclass
class Served:
    """A running server: its base URL and app; `client()` opens an httpx client authenticated as a tenant."""

    url: str
    app: FastAPI

    def client(self, tenant: str = "default", **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=auth_headers(self.app, tenant), **kwargs)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` on a real uvicorn server on a free port in a background thread, on a socket made as
    `trickserve api` makes it; yields its base URL."""
    sock = listening_socket("127.0.0.1", 0, write_timeout_s=app.state.settings.write_timeout_s)
    # Accepted connections inherit it; without it each small answer waits ~40 ms (Nagle meets delayed ACKs).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def make_server(make_app: Callable[[Settings], FastAPI], make_settings: Callable[..., Settings]) -> Iterator[Any]:
    """Start a real server for settings made with these overrides."""
    with ExitStack() as stack:

        def make(**overrides: Any) -> Served:
            app = make_app(make_settings(**overrides))
            return Served(stack.enter_context(serve(app)), app)

        yield make
