"""Worker test fixtures: a Backend on a fresh migrated SQLite file with a fast heartbeat, and the Celery app built
for it (on the filesystem broker under the test's folder)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings
from core.db import Database
from tests.factories import Backend
from worker.celery_app import WorkerApp, create_app


@pytest.fixture
def backend(tmp_path: Path, _migrated_sqlite: Path) -> Iterator[Backend]:
    """Settings on a fresh migrated SQLite file under tmp_path, with a fast heartbeat, and their database."""
    db_path = tmp_path / "trickserve.db"
    shutil.copy(_migrated_sqlite, db_path)
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{db_path}", heartbeat_s=0.1, lease_s=2)
    db = Database.from_settings(settings)
    yield Backend(settings, db)
    db.dispose()


@pytest.fixture
def app(backend: Backend) -> WorkerApp:
    """The Celery app for the backend's settings, sharing its database."""
    import worker.tasks  # noqa: F401 - registers the shared tasks with every app

    app = create_app(backend.settings)
    app.db = backend.db
    return app
