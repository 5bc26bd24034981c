"""Factories shared by the tests: specs as a client sends them, API keys, jobs stored and driven as a worker drives
them, and a Backend (settings and their database) with the reads tests make."""

from __future__ import annotations

import errno
import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core import jobs, tenants
from core.artifacts import open_store
from core.config import Settings
from core.db import Database
from core.engine.events import METRIC_KINDS, is_metric_name, is_metric_value
from core.models import Job, JobEvent
from core.spec import JobSpec
from core.submit import Caps, submit

Sessions = sessionmaker[Session]
TENANT = "acme"


# ------------------------------------------------------------------------------------------------ specs


def make_spec(**overrides: Any) -> dict[str, Any]:
    """A synthetic job of a few tenths of a second, as a client sends it; each override replaces a top-level part,
    or merges into it when both are objects."""
    body: dict[str, Any] = {
        "name": "tiny",
        "data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 400, "n_features": 12, "n_classes": 3}},
        "model": {"arch": "mlp", "layers": [32]},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3, "batch_size": 32, "progress_interval_s": 0.001},
        "resources": {"device": "cpu"},
    }
    for key, value in overrides.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    return body


def make_job_spec(**overrides: Any) -> JobSpec:
    """make_spec, validated."""
    return JobSpec.model_validate(make_spec(**overrides))


def slow_spec(epochs: int = 8) -> dict[str, Any]:
    """A job of about a quarter second per epoch, so that a test can act while it runs."""
    data = {"synthetic": {"n_samples": 4000, "n_features": 12, "n_classes": 3}}
    return make_spec(data=data, train={"epochs": epochs, "batch_size": 4, "progress_interval_s": 0.05})


def npz_bytes(n: int = 60, features: int = 6, classes: int = 3, **extra: np.ndarray) -> bytes:
    """An uploadable .npz dataset of `n` examples."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.normal(size=(n, features)).astype(np.float32), y=np.arange(n) % classes, **extra)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- API keys


def new_key(sessions: Sessions, tenant: str) -> str:
    """A new API key of `tenant`, created if new."""
    with sessions() as s:
        tenants.create_tenant(session=s, tenant_id=tenant)
        return tenants.create_api_key(session=s, tenant_id=tenant)


def auth_headers(app: FastAPI, tenant: str) -> dict[str, str]:
    """The Authorization header of a new key of `tenant` on `app`'s database."""
    return {"Authorization": f"Bearer {new_key(app.state.sessions, tenant)}"}


def as_tenant(client: TestClient, tenant: str) -> TestClient:
    """Another client of the same app, authenticated as `tenant`."""
    return TestClient(client.app, headers=auth_headers(client.app, tenant))


# ------------------------------------------------------------------------------------ a stand-in worker


def claim(sessions: Sessions, job_id: str, worker: str = "test-worker", lease_s: float = 60) -> int:
    """Start the job as a worker would; returns the attempt (the fencing token)."""
    with sessions() as s:
        claimed = jobs.claim_job(session=s, job_id=job_id, worker_id=worker, lease_s=lease_s)
    assert claimed is not None
    return claimed.attempt


def epoch_event(epoch: int, steps_per_epoch: int = 10, **data: Any) -> dict[str, Any]:
    values = {"train/loss": 1.0 / epoch, "val/loss": 1.5 / epoch, "val/acc": 0.5 + epoch / 100, "lr": 0.001}
    return {"kind": "epoch_end", "step": epoch * steps_per_epoch, "epoch": epoch, "data": {**values, **data}}


def record(sessions: Sessions, job_id: str, attempt: int, events: list[dict[str, Any]]) -> None:
    with sessions() as s:
        assert jobs.record_events(session=s, job_id=job_id, attempt=attempt, events=events)


def expected_points(sessions: Sessions, job_id: str) -> list[tuple[int, int, int, str, float | None]]:
    """What the metric store must hold of a job, worked out from its stored events: (cursor, step, epoch, name,
    value) of every number of its epoch_end and test events, NaN as None, in cursor order, then the event's."""
    with sessions() as s:
        events = jobs.list_events(s, job_id, kinds=METRIC_KINDS, limit=100_000)
    return [
        (event.job_event_id, event.step, event.epoch, name, None if value == "NaN" else float(value))
        for event in events
        for name, value in event.data.items()
        if is_metric_name(name) and is_metric_value(value)
    ]


def finish(sessions: Sessions, job_id: str, attempt: int, status: str = "succeeded", **kwargs: Any) -> None:
    with sessions() as s:
        assert jobs.finish_job(session=s, job_id=job_id, attempt=attempt, status=status, **kwargs)


# ---------------------------------------------------------------------------------------------- backend


@dataclass
class Backend:
    """Settings and their database, as a worker process has them, with the reads and writes tests make."""

    settings: Settings
    db: Database

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        with self.db.session(read_only=read_only) as session:
            yield session

    def submit(self, spec: dict[str, Any], tenant: str = TENANT, **kwargs: Any) -> Job:
        """Store a job exactly as POST /v1/jobs does (not sent to any broker)."""
        with self.session() as session:
            tenants.create_tenant(session=session, tenant_id=tenant)
            caps = Caps.from_settings(self.settings)
            return submit(session=session, tenant_id=tenant, spec_dict=spec, caps=caps, **kwargs).job

    def load(self, job_id: str) -> Job:
        with self.session(read_only=True) as session:
            return session.get_one(Job, job_id)

    def events(self, job_id: str, *kinds: str) -> list[JobEvent]:
        with self.session(read_only=True) as session:
            return jobs.list_events(session, job_id, kinds=list(kinds) or None, limit=100_000)

    def stored_file(self, key: str) -> Path:
        """The file of a stored key (the default store: the folders of this backend's settings)."""
        path = open_store(self.settings).local_path(key)
        assert path is not None and path.is_file(), key
        return path

    def statuses(self, job_id: str) -> list[str]:
        with self.session(read_only=True) as session:
            return [str(t.to_status) for t in jobs.list_transitions(session, job_id)]


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """The first truthy value of `condition`, polled until `timeout`; AssertionError naming `what` after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fill_disk(folder: Path, leave_bytes: int = 0) -> Path:
    """A file that takes all the free space of `folder`'s filesystem but `leave_bytes` (as near as a concurrent writer
    lets it); delete it to free the space."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        for _ in range(20):  # another writer may take some of the space between the measure and the allocation
            size = shutil.disk_usage(folder).free - leave_bytes
            if size <= 0:
                break
            try:
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, size)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler
