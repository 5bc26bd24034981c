"""worker.runner.run_job in-process against a real SQLite file: outcomes, cancel, fencing and resume."""

from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
import sqlalchemy as sa
import torch

from core import jobs, tenants
from core.models import Artifact, Dataset, Job, JobEvent, utcnow
from tests.factories import TENANT, Backend, make_spec, slow_spec, wait_for
from tests.s3 import Proxy
from worker import runner


def run(job_id: str, backend: Backend) -> str:
    return runner.run_job(job_id, worker_id="test-worker", settings=backend.settings, db=backend.db)


class Background:
    """runner.run_job in a thread, so that the test can act on the job while it trains."""

    def __init__(self, job_id: str, backend: Backend):
        self.result: str | None = None
        self.thread = threading.Thread(target=self._run, args=(job_id, backend), daemon=True)
        self.thread.start()

    def _run(self, job_id: str, backend: Backend) -> None:
        self.result = run(job_id, backend)

    def join(self, timeout: float = 30.0) -> str | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the runner did not stop"
        return self.result


def checkpointed(backend: Backend, job_id: str) -> int | None:
    return backend.load(job_id).checkpoint_step


def test_succeeded_job_stores_events_metrics_model_and_artifacts(backend):
    job = backend.submit(make_spec())
    assert run(job.job_id, backend) == "succeeded"
    done = backend.load(job.job_id)
    assert backend.statuses(job.job_id) == ["queued", "running", "succeeded"]
    assert done.attempt == 1 and done.failure_class is None and done.stop_reason is None
    assert done.final_metrics["test/acc"] > 0.5 and "val/loss" in done.final_metrics
    assert [e.epoch for e in backend.events(job.job_id, "epoch_end")] == [1, 2, 3]
    assert backend.events(job.job_id, "progress") and len(backend.events(job.job_id, "test")) == 1
    assert backend.stored_file(done.model_key).is_file() and backend.stored_file(done.checkpoint_key).is_file()
    with backend.session(read_only=True) as session:
        kinds = set(session.scalars(sa.select(Artifact.kind).where(Artifact.job_id == job.job_id)))
    assert kinds == {"checkpoint", "model"}


def test_early_stopped_job_records_the_early_stop(backend):
    stopping = {"monitor": "val/loss", "patience": 0, "min_delta": 100.0}  # no epoch can improve on the first
    job = backend.submit(make_spec(train={"epochs": 10, "early_stopping": stopping}))
    assert run(job.job_id, backend) == "early_stopped"
    done = backend.load(job.job_id)
    assert done.status == "early_stopped" and done.stop_reason == "early_stop"
    assert len(backend.events(job.job_id, "early_stop")) == 1 and len(backend.events(job.job_id, "epoch_end")) == 2
    assert done.best_metrics["epoch"] == 1 and done.model_key is not None
    epochs = [e.data for e in backend.events(job.job_id, "epoch_end")]
    waits = [(d["early_stopping/wait"], d["early_stopping/patience"]) for d in epochs]
    assert waits == [(0, 0), (1, 0)]  # what any reader of the events sees, after each epoch's decision
    assert not any(key.startswith("early_stopping/") for key in done.best_metrics | done.final_metrics)


def test_diverging_job_fails_as_diverged(backend):
    model = {"batch_norm": False, "init": "normal", "init_scale": 10.0}
    job = backend.submit(make_spec(optim={"name": "sgd", "lr": 10.0}, model=model, train={"epochs": 20}))
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert (done.failure_class, done.stop_reason) == ("diverged", "diverged")
    assert done.model_key is None and backend.events(job.job_id, "diverged")


def test_unreadable_dataset_fails_as_invalid_spec_with_a_one_line_message(backend):
    path = backend.settings.dataset_dir / "broken.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a zip archive")
    with backend.session() as session:
        tenants.create_tenant(session=session, tenant_id=TENANT)
        session.add(Dataset(dataset_id="ds_broken01", tenant_id=TENANT, name="b", filename="b.npz",
                            key="datasets/broken.npz", size_bytes=25))  # fmt: skip
        session.commit()
    job = backend.submit(make_spec(data={"dataset": "ds_broken01"}))
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert done.failure_class == "invalid_spec" and done.failure_message.startswith("data.dataset")
    assert "\n" not in done.failure_message and "Traceback" not in done.failure_message


def test_a_dataset_missing_from_storage_fails_as_the_services_fault_naming_its_key(backend):
    """The database names a dataset whose file the store does not hold (an API and a worker that share no storage
    did this before storage keys): that is not the user's spec, and the failure says which key is missing."""
    with backend.session() as session:
        tenants.create_tenant(session=session, tenant_id=TENANT)
        session.add(Dataset(dataset_id="ds_gone0001", tenant_id=TENANT, name="g", filename="g.npz",
                            key=f"datasets/{TENANT}/ds_gone0001.npz", size_bytes=25))  # fmt: skip
        session.commit()
    job = backend.submit(make_spec(data={"dataset": "ds_gone0001"}))
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert done.failure_class == "storage", done.failure_message
    assert f"datasets/{TENANT}/ds_gone0001.npz" in done.failure_message and "ds_gone0001" in done.failure_message


def test_stored_spec_that_no_longer_validates_fails_as_invalid_spec(backend):
    job = backend.submit(make_spec())
    with backend.session() as session:  # e.g. stored by an older version with other rules
        session.execute(sa.update(Job).where(Job.job_id == job.job_id).values(spec={"name": 3}))
        session.commit()
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert done.failure_class == "invalid_spec" and done.failure_message.startswith("name:")


def test_unexpected_error_fails_as_internal_with_a_one_line_message(backend):
    source = backend.submit(make_spec())
    assert run(source.job_id, backend) == "succeeded"
    job = backend.submit(make_spec(transfer={"from_job": source.job_id, "freeze": "small"}))
    backend.stored_file(backend.load(source.job_id).model_key).write_bytes(b"\xff" * 64)  # damaged in storage
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert done.failure_class == "internal" and "\n" not in done.failure_message
    assert done.failure_message.split(":")[0].endswith("Error")


def test_a_transfer_source_missing_from_storage_fails_as_storage(backend):
    source = backend.submit(make_spec())
    assert run(source.job_id, backend) == "succeeded"
    job = backend.submit(make_spec(transfer={"from_job": source.job_id, "freeze": "small"}))
    key = backend.load(source.job_id).model_key
    backend.stored_file(key).unlink()  # the source's weights vanished from the artifact store
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert done.failure_class == "storage" and key in done.failure_message


def test_cancel_during_run_ends_cancelled_with_a_checkpoint(backend):
    job = backend.submit(slow_spec(epochs=40))
    worker = Background(job.job_id, backend)
    step = wait_for(lambda: checkpointed(backend, job.job_id), what="the first checkpoint")
    with backend.session() as session:
        jobs.request_cancel(session=session, job_id=job.job_id, tenant_id=TENANT)
    assert worker.join(timeout=10) == "cancelled"
    done = backend.load(job.job_id)
    assert backend.statuses(job.job_id) == ["queued", "running", "cancelling", "cancelled"]
    assert done.stop_reason == "cancelled" and done.checkpoint_step > step
    assert backend.stored_file(done.checkpoint_key).is_file()
    assert len(backend.events(job.job_id, "epoch_end")) < 40


def test_fenced_attempt_stops_and_writes_nothing_more(backend):
    job = backend.submit(slow_spec(epochs=40))
    worker = Background(job.job_id, backend)
    wait_for(lambda: backend.events(job.job_id, "epoch_end"), what="the first epoch")
    with backend.session() as session:  # as if the reaper re-queued it and another worker claimed attempt 2
        session.execute(sa.update(Job).where(Job.job_id == job.job_id).values(attempt=Job.attempt + 1))
        before = _attempt_rows(session, job.job_id)
        session.commit()
        snapshot = session.get_one(Job, job.job_id)
    assert worker.join(timeout=10) == "fenced"
    after = backend.load(job.job_id)
    with backend.session(read_only=True) as session:
        assert _attempt_rows(session, job.job_id) == before
    assert (after.status, after.attempt, after.finished_at, after.model_key) == ("running", 2, None, None)
    assert after.checkpoint_step == snapshot.checkpoint_step
    assert not (runner.attempt_dir(backend.settings, job.job_id, 1) / "model.safetensors").exists()


def _attempt_rows(session, job_id: str) -> int:
    query = sa.select(sa.func.count()).where(JobEvent.job_id == job_id, JobEvent.attempt == 1)
    return session.scalar(query)


def test_requeued_job_resumes_from_its_checkpoint_without_duplicate_points(backend):
    job = backend.submit(slow_spec(epochs=6))
    worker = Background(job.job_id, backend)
    step = wait_for(lambda: checkpointed(backend, job.job_id), what="the first checkpoint")
    with backend.session() as session:  # the lease runs out: the reaper puts the job back in the queue
        assert jobs.requeue_expired(session=session, now=utcnow() + timedelta(minutes=5)) == [job.job_id]
    assert worker.join(timeout=10) == "fenced"
    resumed_from = backend.load(job.job_id).checkpoint_step
    assert resumed_from >= step

    assert run(job.job_id, backend) == "succeeded"
    done = backend.load(job.job_id)
    assert done.attempt == 2 and backend.statuses(job.job_id) == ["queued", "running", "queued", "running", "succeeded"]
    [resumed] = backend.events(job.job_id, "resumed")
    assert resumed.attempt == 2 and resumed.data["from_step"] == resumed_from
    assert [e.epoch for e in backend.events(job.job_id, "epoch_end")] == [1, 2, 3, 4, 5, 6]
    for kind in ("epoch_end", "progress"):
        steps = [e.step for e in backend.events(job.job_id, kind)]
        assert len(steps) == len(set(steps)), f"duplicate {kind} points"
        assert steps == sorted(steps)
    assert np.isfinite(done.final_metrics["test/loss"])


def test_a_message_for_a_job_that_is_not_queued_is_dropped(backend):
    job = backend.submit(make_spec())
    assert run(job.job_id, backend) == "succeeded"
    assert run(job.job_id, backend) == "dropped"
    assert run("job_doesnotexist", backend) == "dropped"
    assert backend.load(job.job_id).attempt == 1


def test_failures_get_a_class_and_a_one_line_message():
    oom = runner.failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), "job_x")
    assert (oom.failure_class, oom.failure_message) == (
        "out_of_memory",
        "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB",
    )
    assert runner.failure(MemoryError(), "job_x").failure_class == "out_of_memory"
    internal = runner.failure(KeyError("x" * 2000), "job_x")
    assert internal.failure_class == "internal" and internal.failure_message.startswith("KeyError: 'xxx")
    assert len(internal.failure_message) <= runner.MAX_MESSAGE


def test_a_job_on_a_built_in_dataset_leaves_it_in_the_cache_for_the_next(backend):
    spec = make_spec(data={"dataset": "builtin:digits"}, train={"epochs": 1})
    assert run(backend.submit(spec).job_id, backend) == "succeeded"
    [entry] = backend.settings.cache_dir.glob("digits-*.npz")
    made_at = entry.stat().st_mtime_ns
    assert run(backend.submit(spec).job_id, backend) == "succeeded"
    assert entry.stat().st_mtime_ns == made_at  # read back, not made again


def test_a_model_that_cannot_be_stored_fails_the_attempt_as_storage(backend, s3_url: str, moto_server):
    """The store is away for the whole attempt: each checkpoint is retried, then skipped with a warning (the job
    points at none), and the model, retried as long, fails the attempt clearly as the store's fault."""
    proxy = Proxy(moto_server.port)
    proxy.cut()
    backend.settings = backend.settings.model_copy(
        update={"storage_url": s3_url, "s3_endpoint_url": proxy.url, "storage_retry_s": 0.3}
    )
    job = backend.submit(make_spec(train={"epochs": 2}))
    assert run(job.job_id, backend) == "failed"
    done = backend.load(job.job_id)
    assert done.failure_class == "storage" and "model.safetensors" in done.failure_message
    assert (done.checkpoint_key, done.model_key) == (None, None)
    warnings = [e.data["message"] for e in backend.events(job.job_id, "warning")]
    assert len([w for w in warnings if w.startswith("checkpoint at step") and "not stored" in w]) == 2
    assert not (backend.settings.artifact_dir / job.job_id).exists()  # the attempt's scratch folder is gone
    proxy.close()
