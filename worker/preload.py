"""What a job's process imports, imported once by the worker's main process before it forks pool processes.

Every job runs in a fresh process forked from the main one (worker/prefork.py), and starts with whatever the main
process has imported, shared copy-on-write, instead of importing it again: about 1.5 s a job, most of it torch's
compiler stack, which torch.optim loads when a job builds its first optimizer. Imports only: the main process runs
no torch code, so it never initialises CUDA and forking stays safe. Then it freezes what it has (`gc.freeze`): the
full collection Celery runs before every fork skips it (a quarter of a second each time otherwise), and the
collector of a job's process never writes to those objects, so their pages stay shared.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time
from typing import Any

from celery import signals

log = logging.getLogger(__name__)
MODULES = (
    "numpy",
    "torch",
    "torch._dynamo",  # torch.optim imports it when a process builds its first optimizer
    "core.engine.trainer",  # the engine: models, data loaders, augmentation, checkpoints (safetensors)
)


def preload() -> list[str]:
    """Import MODULES; returns those that failed (a job that needs one fails with the error itself)."""
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a worker that cannot preload still runs jobs, only slower to start
            log.warning("could not preload %s", name, exc_info=True)
            failed.append(name)
    return failed


def warm_store(settings: Any) -> list[str]:
    """On an S3 store: import boto3 and load its S3 service model (a client made and dropped; it connects nowhere),
    which each job's process then finds in memory: 0.2 s a job otherwise. Returns ["boto3"] when that failed."""
    if not (settings.storage_url or "").startswith("s3://"):
        return []
    try:
        from core.artifacts import open_store

        open_store(settings)
    except Exception:  # noqa: BLE001 - the job's own attempt reports the problem
        log.warning("could not load the S3 client", exc_info=True)
        return ["boto3"]
    return []


def before_forking() -> None:
    """Preload in a worker's main process when it starts, before its pool forks (worker/main.py)."""

    # Sent once the worker's logging is set up, and before its pool starts; `celery` commands other than `worker`
    # (inspect, purge...) never send it, and do not load torch.
    @signals.celeryd_after_setup.connect(weak=False)
    def _preload(instance: Any = None, **_: Any) -> None:
        started = time.perf_counter()
        failed = preload()
        settings = getattr(getattr(instance, "app", None), "settings", None)
        if settings is not None:
            failed += warm_store(settings)
        gc.freeze()
        loaded = [name for name in MODULES if name not in failed]
        log.info("preloaded %s in %.1f s", ", ".join(loaded), time.perf_counter() - started)
