"""A full disk under a running job (worker.runner in-process, the service's files on a real 30 MiB tmpfs): the job
stops and fails as disk_full, naming the folder, without leaving its attempt's files behind; when the database
itself has no space, the attempt stops and the job resumes from its last checkpoint once space is back."""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from core import jobs
from core.config import Settings
from core.db import Database
from core.models import utcnow
from tests.factories import Backend, fill_disk, make_spec, wait_for
from tests.worker.test_runner import Background, checkpointed, run
from worker import runner

MIB = 2**20
# A checkpoint of this model (weights and Adam's two moments) takes about 6.2 MiB.
HEAVY = {"model": {"arch": "mlp", "layers": [1024, 512]}}


@pytest.fixture
def on_disk(small_disk: Path, backend: Backend, _migrated_sqlite: Path) -> Backend:
    """The backend's settings with home, artifacts and the SQLite database on the small disk."""
    shutil.copy(_migrated_sqlite, small_disk / "trickserve.db")
    settings = Settings(home=small_disk, database_url=f"sqlite:///{small_disk / 'trickserve.db'}", heartbeat_s=0.1,
                        lease_s=1)  # fmt: skip
    db = Database.from_settings(settings)
    yield Backend(settings, db)
    db.dispose()


def test_a_job_out_of_disk_before_its_first_checkpoint_fails_as_disk_full_and_leaves_nothing(backend, small_disk):
    artifacts = small_disk / "artifacts"
    backend.settings = backend.settings.model_copy(update={"artifact_dir": artifacts})  # the database stays apart
    filler = fill_disk(small_disk, leave_bytes=3 * MIB)
    free = shutil.disk_usage(small_disk).free
    job = backend.submit(make_spec(**HEAVY))
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert done.failure_class == "disk_full"
    assert done.failure_message.startswith(f"the disk is full: no space left in {artifacts / job.job_id / 'attempt-1'}")
    assert not (artifacts / job.job_id).exists() and shutil.disk_usage(small_disk).free == free

    assert run(backend.submit(make_spec()).job_id, backend) == "succeeded"  # a job that fits still runs
    filler.unlink()
    assert run(backend.submit(make_spec(**HEAVY)).job_id, backend) == "succeeded"


def test_a_job_that_fills_the_disk_fails_as_disk_full_and_keeps_its_last_checkpoint(on_disk, caplog):
    fill_disk(on_disk.settings.home, leave_bytes=16 * MIB)  # room for two checkpoints, not three
    job = on_disk.submit(make_spec(**HEAVY, train={"epochs": 6}))
    with caplog.at_level(logging.WARNING):
        assert run(job.job_id, on_disk) == "failed"
    done = on_disk.load(job.job_id)
    assert done.failure_class == "disk_full" and done.failure_message.startswith("the disk is full")
    assert done.checkpoint_step is not None and on_disk.stored_file(done.checkpoint_key).is_file()
    attempt = runner.attempt_dir(on_disk.settings, job.job_id, 1)
    assert [p.name for p in attempt.iterdir()] == [on_disk.stored_file(done.checkpoint_key).name]
    assert len(caplog.records) <= 2, [r.getMessage() for r in caplog.records]


def test_a_full_database_stops_the_attempt_and_the_job_resumes_once_space_is_back(on_disk, caplog):
    train = {"epochs": 6, "batch_size": 8, "progress_interval_s": 0.05, "checkpoint_every": 2}
    job = on_disk.submit(make_spec(data={"synthetic": {"n_samples": 1500}}, train=train))
    worker = Background(job.job_id, on_disk)
    step = wait_for(lambda: checkpointed(on_disk, job.job_id), what="the first checkpoint")
    filler = fill_disk(on_disk.settings.home)
    with caplog.at_level(logging.WARNING):
        assert worker.join(timeout=10) == "stopped"  # it does not train on with nothing recorded
    assert on_disk.load(job.job_id).status == "running"  # nothing can be written until space is back
    assert len(caplog.records) <= 3, [r.getMessage() for r in caplog.records]

    filler.unlink()
    with on_disk.session() as session:  # its lease runs out: the reaper puts it back in the queue
        assert jobs.requeue_expired(session=session, now=utcnow() + timedelta(minutes=5)) == [job.job_id]
    assert run(job.job_id, on_disk) == "succeeded"
    [resumed] = on_disk.events(job.job_id, "resumed")
    assert resumed.data["from_step"] == step and on_disk.load(job.job_id).attempt == 2
