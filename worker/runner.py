"""One attempt of a job: claim it, fetch its inputs from the artifact store, train it with the engine under a
heartbeat, store its model and record the outcome, all fenced. The attempt writes to a folder of this machine's
(`attempt_dir`); what outlives it goes to the store under keys, so that any worker can resume the job."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from core import jobs, studies
from core.artifacts import DatasetCache, ObjectMissing, StorageError, Store, artifact_key, open_store, retrying
from core.config import Settings
from core.db import Database
from core.dispatch import Send, dispatch
from core.engine.callbacks import Event, StopFlag
from core.engine.events import EventKind
from core.models import Dataset, FailureClass, Job, JobStatus
from core.notify import publish
from core.spec import JobSpec, SpecError, spec_errors
from core.storage import free_bytes, is_disk_full
from worker.faults import crash_hooks
from worker.logs import Throttled
from worker.reporting import DatabaseFull, DBReporter, Fenced

log = logging.getLogger(__name__)
MAX_MESSAGE = 500


@dataclass
class Outcome:
    """How an attempt ended, as core.jobs.finish_job takes it."""

    status: JobStatus
    stop_reason: str | None = None
    failure_class: FailureClass | None = None
    failure_message: str | None = None
    final_metrics: dict[str, Any] | None = None
    best_metrics: dict[str, Any] | None = None
    model_path: str | None = None  # the local file the engine wrote
    model_key: str | None = None  # where it is stored


def run_job(
    job_id: str,
    *,
    worker_id: str,
    settings: Settings,
    db: Database,
    store: Store | None = None,
    send: Send | None = None,
) -> str:
    """Run the next attempt of a queued job. Returns the terminal status it ended with, "dropped" when there was
    nothing to claim (a duplicate or stale message), "fenced" when the attempt lost its lease and stopped
    without writing anything more, or "stopped" when the database had no space left to record how it ended."""
    with db.session() as session:
        claim = jobs.claim_job(session=session, job_id=job_id, worker_id=worker_id, lease_s=settings.lease_s)
    if claim is None:
        log.info("job %s: not claimable (taken, finished or cancelled); message dropped", job_id)
        return "dropped"
    log.info("job %s: attempt %d claimed by %s", job_id, claim.attempt, worker_id)
    publish(settings.redis_url, job_id)
    store = store or open_store(settings)
    reporter = DBReporter(
        job_id=job_id,
        attempt=claim.attempt,
        redis_url=settings.redis_url,
        db=db,
        store=store,
        storage_retry_s=settings.storage_retry_s,
    )
    folder = attempt_dir(settings, job_id, claim.attempt)
    cancel = StopFlag("cancelled")
    beat = Heartbeat(
        claim, settings, db, on_cancel=cancel.set, on_lost=reporter.fenced.set, on_full=reporter.database_full
    )
    try:
        with beat:
            outcome = _attempt(claim, settings, db, store, reporter, cancel)
            if outcome.status == JobStatus.failed:  # before the last writes, which may need the space it frees
                clean_attempt(folder, [_own_file(store, reporter.checkpoint_key), _own_file(store, outcome.model_key)])
            reporter.flush()  # the last events (the test metrics come after on_train_end)
            _finish(claim, outcome, db, settings, send)
    except Fenced:
        log.warning("job %s: attempt %d was fenced out; it stopped and wrote nothing more", job_id, claim.attempt)
        return "fenced"
    except (DatabaseFull, OperationalError) as exc:
        if not is_disk_full(exc):
            raise
        # Nothing can be recorded: the lease runs out, and the reaper retries the job from its last checkpoint
        # (counting the attempt) once the database takes writes again.
        log.error("job %s: attempt %d stopped, the database is full: %s", job_id, claim.attempt, _first_line(exc))
        return "stopped"
    finally:
        if not _is_store_folder(store, folder, job_id, claim.attempt):
            shutil.rmtree(folder, ignore_errors=True)  # scratch: what matters is in the store
    publish(settings.redis_url, job_id)
    log.info("job %s: attempt %d ended %s", job_id, claim.attempt, outcome.status)
    return str(outcome.status)


def _attempt(
    claim: jobs.Claim, settings: Settings, db: Database, store: Store, reporter: DBReporter, cancel: StopFlag
) -> Outcome:
    """Train; every error but Fenced and an unreachable database becomes a failed Outcome with a class and a
    one-line message."""
    from core.engine import train  # the trainer pulls in the data loaders: imported when a job runs

    folder = attempt_dir(settings, claim.job_id, claim.attempt)
    try:
        spec = JobSpec.model_validate(claim.spec)
        data_path, transfer_from = _resolve_inputs(claim.job_id, spec, settings, db, store, folder)
        _check_device(spec)
        result = train(
            spec,
            [*crash_hooks(claim.job_id, claim.attempt), reporter, cancel],  # crash_hooks: tests only
            resume_from=_resume_from(claim, reporter, store, settings, folder),
            out_dir=folder,
            data_path=data_path,
            transfer_from=transfer_from,
            cache_dir=settings.cache_dir,
        )
        return _store_model(outcome_of(result, spec), claim, settings, store)
    except Fenced:
        raise
    except OperationalError as exc:
        if not is_disk_full(exc):  # the database being away is no fault of the job: the reaper retries the attempt
            raise
        return failure(exc, claim.job_id, folder)
    except Exception as exc:  # noqa: BLE001 - the job records why it failed; the worker carries on
        return failure(exc, claim.job_id, folder)


def _store_model(outcome: Outcome, claim: jobs.Claim, settings: Settings, store: Store) -> Outcome:
    """Put the trained weights in the store; the job names them once they are there."""
    if outcome.model_path is None:
        return outcome
    path = Path(outcome.model_path)
    key = artifact_key(claim.job_id, claim.attempt, path.name)
    retrying(lambda: store.put_file(key, path), within_s=settings.storage_retry_s, what=f"job {claim.job_id}: model")
    outcome.model_key = key
    return outcome


def attempt_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    """Where an attempt writes its checkpoint and model. One folder per attempt: an attempt that lost its lease
    but has not noticed yet can only overwrite its own files, never those the current attempt resumes from."""
    return settings.artifact_dir / job_id / f"attempt-{attempt}"


def clean_attempt(folder: Path, keep: list[str | None]) -> None:
    """Delete the files a failed attempt wrote, but those the job points at (its last checkpoint, its model): the
    next jobs need the space more than anyone needs a failed attempt's half-written files."""
    kept = {Path(path) for path in keep if path}
    for path in folder.iterdir() if folder.is_dir() else ():
        if path not in kept and path.is_file():
            path.unlink(missing_ok=True)
    for empty in (folder, folder.parent):  # the attempt's folder, then the job's
        try:
            empty.rmdir()
        except OSError:  # not empty, or gone
            break


def _resolve_inputs(
    job_id: str, spec: JobSpec, settings: Settings, db: Database, store: Store, folder: Path
) -> tuple[str | None, str | None]:
    """Local files of the uploaded dataset and of the transfer source's model the spec names, checked to be the
    tenant's: fetched from the store (a dataset once per machine, into a cache keyed by its content hash)."""
    if not spec.data.dataset.startswith(("builtin:", "ds_")):
        raise SpecError("data.dataset", "local files are for the command line; upload them as a dataset")
    if spec.transfer is not None and spec.transfer.from_path is not None:
        raise SpecError("transfer.from_path", "local files are for the command line; use transfer.from_job")
    dataset = source_key = None
    with db.session(read_only=True) as session:
        tenant_id = session.get_one(Job, job_id).tenant_id
        if spec.data.dataset.startswith("ds_"):
            dataset = session.get(Dataset, spec.data.dataset)
            if dataset is None or dataset.tenant_id != tenant_id:
                raise SpecError("data.dataset", f"no dataset {spec.data.dataset}")
        if spec.transfer is not None and spec.transfer.from_job is not None:
            source = jobs.get_job(session, tenant_id, spec.transfer.from_job)
            if source is None or source.model_key is None:
                raise SpecError("transfer.from_job", f"no trained model of job {spec.transfer.from_job}")
            source_key = source.model_key
    data_path = transfer_from = None
    within_s = settings.storage_retry_s
    if dataset is not None:
        cache = DatasetCache(settings.cache_dir / "datasets", settings.dataset_cache_mb * 2**20)
        key, sha256 = dataset.key, dataset.sha256
        what = f"job {job_id}: dataset {dataset.dataset_id}"
        try:
            data_path = str(retrying(lambda: cache.path(store, key, sha256), within_s=within_s, what=what))
        except ObjectMissing as exc:  # the service lost it: not the spec's fault
            message = f"dataset {dataset.dataset_id}: its file {exc.key!r} is not in storage"
            raise StorageError(exc.key, message) from exc
    if source_key is not None:
        what = f"job {job_id}: transfer source"
        fetch = lambda: store.materialize(source_key, folder, "transfer-source.safetensors")  # noqa: E731
        transfer_from = str(retrying(fetch, within_s=within_s, what=what))
    return data_path, transfer_from


def _check_device(spec: JobSpec) -> None:
    if spec.resources.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("the spec asks for CUDA but this worker has no GPU; run a worker on the gpu queue")


def _resume_from(claim: jobs.Claim, reporter: DBReporter, store: Store, settings: Settings, folder: Path) -> str | None:
    """A local copy of the checkpoint a re-queued job continues from, fetched from the store wherever an earlier
    attempt ran; None (start over, with a warning) when it is not there."""
    if claim.checkpoint_key is None:
        return None
    key = claim.checkpoint_key
    fetch = lambda: store.materialize(key, folder, "resume.pt")  # noqa: E731
    try:
        return str(retrying(fetch, within_s=settings.storage_retry_s, what=f"job {claim.job_id}: checkpoint"))
    except ObjectMissing:
        message = f"checkpoint {key} is missing; training starts over"
        reporter.add(Event(EventKind.warning, 0, 0, {"message": message}))
        return None


def _own_file(store: Store, key: str | None) -> str | None:
    """The local file of a stored key when the store is this machine's folder (keep it), else None."""
    path = None if key is None else store.local_path(key)
    return None if path is None else str(path)


def _is_store_folder(store: Store, folder: Path, job_id: str, attempt: int) -> bool:
    """Whether the attempt's folder is where the store itself keeps the attempt's files (the default folder
    store), rather than scratch space whose files were copied to the store."""
    own = store.local_path(artifact_key(job_id, attempt, "x"))
    return own is not None and own.parent == folder


def outcome_of(result: Any, spec: JobSpec) -> Outcome:
    """The Outcome of a finished engine run (core.engine.RunResult)."""
    best = result.history[result.best_epoch - 1] if result.best_epoch and result.history else None
    outcome = Outcome(
        status=JobStatus(result.status),
        stop_reason=result.stop_reason,
        final_metrics=result.metrics,
        best_metrics=best,
        model_path=result.model_path,
    )
    if result.stop_reason == "diverged":
        outcome.failure_class, outcome.failure_message = FailureClass.diverged, "training loss is not finite"
        outcome.model_path = None  # its weights are not finite either
    elif result.stop_reason == "timeout":
        outcome.failure_class = FailureClass.timeout
        outcome.failure_message = f"stopped after its time budget of {spec.resources.max_runtime_s:g} s"
    return outcome


def failure(exc: BaseException, job_id: str, folder: Path | None = None) -> Outcome:
    """A failed Outcome for an exception: a class and a one-line message, never a traceback. `folder`: where the
    attempt writes, named when it runs out of space."""
    if is_disk_full(exc):
        return _failed(FailureClass.disk_full, _disk_full_message(exc, folder))
    if isinstance(exc, StorageError):  # after its retries: the service's fault, never the spec's
        return _failed(FailureClass.storage, str(exc))
    if isinstance(exc, SpecError):
        return _failed(FailureClass.invalid_spec, str(exc))
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{e['path']}: {e['message']}" for e in spec_errors(exc))
        return _failed(FailureClass.invalid_spec, problems)
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return _failed(FailureClass.out_of_memory, f"out of memory: {_first_line(exc)}")
    log.exception("job %s: internal error", job_id)  # the traceback goes to the worker's log only
    return _failed(FailureClass.internal, f"{type(exc).__name__}: {_first_line(exc)}")


def _disk_full_message(exc: BaseException, folder: Path | None) -> str:
    if isinstance(exc, DatabaseFull):
        return str(exc)
    if isinstance(exc, OperationalError):
        return f"the database is full: {_first_line(exc)}"
    written = getattr(exc, "filename", None)  # an OSError names its file; torch's and safetensors' writers do not
    where = Path(written).parent if written else folder
    if where is None:
        return f"the disk is full: {_first_line(exc)}"
    return f"the disk is full: no space left in {where} ({free_bytes(where) / 2**20:.1f} MiB free)"


def _failed(failure_class: FailureClass, message: str) -> Outcome:
    return Outcome(JobStatus.failed, failure_class=failure_class, failure_message=message[:MAX_MESSAGE])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _finish(claim: jobs.Claim, outcome: Outcome, db: Database, settings: Settings, send: Send | None) -> None:
    with db.session() as session:
        session.info[studies.MAX_ACTIVE_JOBS] = settings.max_active_jobs_per_tenant
        finished = jobs.finish_job(
            session=session,
            job_id=claim.job_id,
            attempt=claim.attempt,
            status=outcome.status,
            stop_reason=outcome.stop_reason,
            failure_class=outcome.failure_class,
            failure_message=outcome.failure_message,
            final_metrics=outcome.final_metrics,
            best_metrics=outcome.best_metrics,
            model_key=outcome.model_key,
        )
        if not finished:
            raise Fenced(f"job {claim.job_id}: attempt {claim.attempt} lost the job before it could finish")
        study_id = session.get_one(Job, claim.job_id).study_id
        if study_id is not None and send is not None:  # the study's next trials, made as this one ended: now
            dispatch(session, jobs.undispatched_trials(session, study_id), send)


class Heartbeat:
    """A thread that renews the attempt's lease every heartbeat_s and reports a cancel request, a lost lease, or a
    database with no space left."""

    def __init__(
        self,
        claim: jobs.Claim,
        settings: Settings,
        db: Database,
        *,
        on_cancel: Callable[[], None],
        on_lost: Callable[[], None],
        on_full: Callable[[BaseException], None],
    ):
        self.claim, self.settings, self.db = claim, settings, db
        self.on_cancel, self.on_lost, self.on_full = on_cancel, on_lost, on_full
        self._warnings = Throttled(log)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        job_id, attempt, lease_s = self.claim.job_id, self.claim.attempt, self.settings.lease_s
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                with self.db.session() as session:
                    beat = jobs.heartbeat(session=session, job_id=job_id, attempt=attempt, lease_s=lease_s)
            except Exception as exc:  # noqa: BLE001 - keep beating; if the lease runs out, the next beat says so
                if is_disk_full(exc):
                    self.on_full(exc)
                self._warnings.warning("job %s: heartbeat failed: %s", job_id, exc)
                continue
            self._warnings.reset()
            if not beat.alive:
                self.on_lost()
                return
            if beat.cancel_requested:
                self.on_cancel()
