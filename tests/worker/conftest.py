"""Worker test helpers: a migrated SQLite file that core.db (and so the runner) uses, tiny specs, job factories."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core import jobs
from core.config import Settings, get_settings
from core.db import reset_engine, session_scope
from core.models import Job, JobEvent
from core.submit import submit as submit_job

TENANT = "acme"


def make_spec(**overrides: Any) -> dict[str, Any]:
    """A synthetic job of a few tenths of a second; each override replaces or merges one top-level part."""
    body: dict[str, Any] = {
        "name": "tiny",
        "data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 400, "n_features": 12, "n_classes": 3}},
        "model": {"arch": "mlp", "layers": [32]},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3, "batch_size": 32, "progress_interval_s": 0.001},
        "resources": {"device": "cpu"},
    }
    for key, value in overrides.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return body


def slow_spec(epochs: int = 8) -> dict[str, Any]:
    """A job of about a quarter second per epoch, so that a test can act while it runs."""
    data = {"synthetic": {"n_samples": 4000, "n_features": 12, "n_classes": 3}}
    return make_spec(data=data, train={"epochs": epochs, "batch_size": 4, "progress_interval_s": 0.05})


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_sqlite: Path) -> Iterator[Settings]:
    """Process settings on a fresh migrated SQLite file under tmp_path, with a fast heartbeat."""
    db = tmp_path / "trickserve.db"
    shutil.copy(_migrated_sqlite, db)
    monkeypatch.setenv("TRICKSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("TRICKSERVE_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("TRICKSERVE_HEARTBEAT_S", "0.1")
    monkeypatch.setenv("TRICKSERVE_LEASE_S", "2")
    get_settings.cache_clear()
    reset_engine()
    yield get_settings()
    reset_engine()
    get_settings.cache_clear()


def submit(spec: dict[str, Any], **kwargs: Any) -> Job:
    with session_scope() as session:
        jobs.ensure_tenant(session=session, tenant_id=TENANT)
        return submit_job(session=session, tenant_id=TENANT, spec_dict=spec, **kwargs).job


def load(job_id: str) -> Job:
    with session_scope(read_only=True) as session:
        return session.get_one(Job, job_id)


def events(job_id: str, *kinds: str) -> list[JobEvent]:
    with session_scope(read_only=True) as session:
        return jobs.list_events(session, job_id, kinds=list(kinds) or None, limit=100_000)


def statuses(job_id: str) -> list[str]:
    with session_scope(read_only=True) as session:
        return [str(t.to_status) for t in jobs.list_transitions(session, job_id)]


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
