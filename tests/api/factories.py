"""Small factories for API tests: API keys, specs, and a stand-in worker that drives a job through core.jobs."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core import jobs, tenants

Sessions = sessionmaker[Session]


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


def make_spec(**overrides: Any) -> dict[str, Any]:
    """A small valid spec (as a client sends it); top-level keys are replaced by `overrides`."""
    return {"name": "digits-mlp", "model": {"arch": "mlp", "layers": [16]}, "train": {"epochs": 3}, **overrides}


def claim(sessions: Sessions, job_id: str) -> int:
    """Start the job as a worker would; returns the attempt (the fencing token)."""
    with sessions() as s:
        claimed = jobs.claim_job(session=s, job_id=job_id, worker_id="test-worker", lease_s=60)
    assert claimed is not None
    return claimed.attempt


def epoch_event(epoch: int, steps_per_epoch: int = 10, **data: Any) -> dict[str, Any]:
    values = {"train/loss": 1.0 / epoch, "val/loss": 1.5 / epoch, "val/acc": 0.5 + epoch / 100, "lr": 0.001}
    return {"kind": "epoch_end", "step": epoch * steps_per_epoch, "epoch": epoch, "data": {**values, **data}}


def record(sessions: Sessions, job_id: str, attempt: int, events: list[dict[str, Any]]) -> None:
    with sessions() as s:
        assert jobs.record_events(session=s, job_id=job_id, attempt=attempt, events=events)


def finish(sessions: Sessions, job_id: str, attempt: int, status: str = "succeeded", **kwargs: Any) -> None:
    with sessions() as s:
        assert jobs.finish_job(session=s, job_id=job_id, attempt=attempt, status=status, **kwargs)


def npz_bytes(n: int = 60, features: int = 6, classes: int = 3, **extra: np.ndarray) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.normal(size=(n, features)).astype(np.float32), y=np.arange(n) % classes, **extra)
    return buf.getvalue()
