"""Turning a submitted spec into a stored job: the rules POST /v1/jobs and the `trickserve.submit_job` task share."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from core import jobs, tenants
from core.config import Settings
from core.models import Dataset, Job, JobStatus
from core.spec import JobSpec, SpecError, builtin_info, spec_errors

if TYPE_CHECKING:
    from core.engine.memory import MemoryEstimate

CPU_QUEUE, GPU_QUEUE = "cpu", "gpu"


class SubmitError(Exception):
    """A submission the service refuses; `code` is machine-readable, the message is for people."""

    code = "submit_error"


class InvalidSpec(SubmitError):
    """The spec is not valid, or names something that does not exist; `errors` lists every problem with its path."""

    code = "invalid_spec"

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(f"{e['path']}: {e['message']}" for e in errors))
        self.errors = errors


class TooManyActiveJobs(SubmitError):
    code = "too_many_active_jobs"

    def __init__(self, limit: int):
        super().__init__(f"a tenant may have at most {limit} queued or running jobs")
        self.limit = limit


@dataclass(frozen=True)
class Caps:
    """The most a spec may ask for (settings max_epochs, max_runtime_s, max_dataset_examples, max_job_memory_mb;
    None: no memory limit)."""

    max_epochs: int
    max_runtime_s: float
    max_dataset_examples: int
    max_job_memory_mb: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Caps:
        return cls(
            settings.max_epochs, settings.max_runtime_s, settings.max_dataset_examples, settings.max_job_memory_mb
        )


@dataclass(frozen=True)
class Submission:
    """A stored job, and whether this call created it (False: replayed for an earlier request's key)."""

    job: Job
    created: bool


def submit(
    *,
    session: Session,
    tenant_id: str,
    spec_dict: dict[str, Any],
    idempotency_key: str | None = None,
    caps: Caps,
    max_active_jobs: int | None = None,
) -> Submission:
    """Validate a spec against `caps`, resolve what it refers to, and store it as
    a queued job with its advice (committed). The caller dispatches the job after this returns, only if it was
    created: a replay is never sent twice. Raises InvalidSpec, TooManyActiveJobs, or core.jobs.IdempotencyConflict
    (same key, different request); the same key and request returns the first job."""
    spec = parse_spec(spec_dict)
    check_caps(spec, caps)
    from core.engine.advice import advise  # the engine imports torch: only when a job is really submitted

    advice = [asdict(a) for a in advise(spec)]  # before the transaction: nothing is locked meanwhile
    try:
        check_references(session, tenant_id, spec)
        check_memory(session, tenant_id, spec, caps.max_job_memory_mb)
        if max_active_jobs is not None:
            _check_active_limit(session, tenant_id, idempotency_key, max_active_jobs)
    except SubmitError:
        session.rollback()  # end the read transaction now: on SQLite it holds the write lock
        raise
    with _inserted_jobs(session) as inserted:
        job = jobs.create_job(
            session=session,
            tenant_id=tenant_id,
            spec=spec,
            advice=advice,
            idempotency_key=idempotency_key,
            queue=queue_for(spec),
        )
    return Submission(job, created=job.job_id in inserted)


def parse_spec(spec_dict: dict[str, Any]) -> JobSpec:
    """The validated spec, with the service's own rules: types exactly as the JSON Schema says (strict: no `0` for
    false, no `"3"` for 3), no local paths (they name files on the server)."""
    try:
        spec = JobSpec.model_validate_json(json.dumps(spec_dict), strict=True)
    except ValidationError as exc:
        raise InvalidSpec(spec_errors(exc)) from None
    errors = []
    if not spec.data.dataset.startswith(("builtin:", "ds_")):
        errors.append(_error("data.dataset", "local files are for the command line; upload them as a dataset"))
    if spec.transfer is not None and spec.transfer.from_path is not None:
        errors.append(_error("transfer.from_path", "local files are for the command line; use transfer.from_job"))
    if errors:
        raise InvalidSpec(errors)
    return spec


def check_references(session: Session, tenant_id: str, spec: JobSpec) -> None:
    """Raise InvalidSpec unless the tenant's uploaded dataset and transfer source job exist and can be used."""
    errors = []
    if spec.data.dataset.startswith("ds_"):
        query = select(Dataset.dataset_id).where(
            Dataset.dataset_id == spec.data.dataset, Dataset.tenant_id == tenant_id
        )
        if session.scalar(query) is None:
            errors.append(_error("data.dataset", f"no dataset {spec.data.dataset}"))
    if spec.transfer is not None and spec.transfer.from_job is not None:
        source = jobs.get_job(session, tenant_id, spec.transfer.from_job)
        if source is None:
            errors.append(_error("transfer.from_job", f"no job {spec.transfer.from_job}"))
        elif source.model_key is None:
            message = f"job {source.job_id} has no trained model (it is {source.status})"
            errors.append(_error("transfer.from_job", message))
    if errors:
        raise InvalidSpec(errors)


def check_caps(spec: JobSpec, caps: Caps) -> None:
    """Raise InvalidSpec naming every field that asks for more than the service allows."""
    errors = []
    if spec.train.epochs > caps.max_epochs:
        errors.append(_error("train.epochs", f"at most {caps.max_epochs} epochs on this service", "less_than_equal"))
    if spec.resources.max_runtime_s > caps.max_runtime_s:
        message = f"at most {caps.max_runtime_s:g} s on this service"
        errors.append(_error("resources.max_runtime_s", message, "less_than_equal"))
    if spec.data.dataset == "builtin:synthetic" and spec.data.synthetic.n_samples > caps.max_dataset_examples:
        message = f"at most {caps.max_dataset_examples} examples on this service"
        errors.append(_error("data.synthetic.n_samples", message, "less_than_equal"))
    if errors:
        raise InvalidSpec(errors)


def job_memory_estimate(session: Session, tenant_id: str, spec: JobSpec) -> MemoryEstimate | None:
    """The memory the job is estimated to need (core.engine.memory); None when its dataset or model cannot be sized
    before it runs (the worker then reports why)."""
    from core.engine import memory  # the engine imports torch: only when a job is really checked

    size = _data_size(session, tenant_id, spec)
    if size is None:
        return None
    try:
        return memory.estimate_memory(spec, memory.DataSize(*size))
    except (SpecError, RuntimeError, ValueError):  # e.g. more pooling than the input has pixels
        return None


def check_memory(session: Session, tenant_id: str, spec: JobSpec, limit_mb: int | None) -> MemoryEstimate | None:
    """Raise InvalidSpec, naming the field that weighs most, when the job is estimated to need more than `limit_mb`
    MiB of memory; returns the estimate."""
    estimate = job_memory_estimate(session, tenant_id, spec)
    if estimate is None or limit_mb is None or estimate.total_bytes <= limit_mb * 2**20:
        return estimate
    from core.engine.memory import driving_path

    mib = {name: round(value / 2**20) for name, value in estimate.parts().items()}
    message = (
        f"the job would need about {mib['total_bytes']} MiB of memory (data {mib['data_bytes']} MiB, "
        f"{mib['loading_bytes']} MiB while loading; model, gradients and optimizer state "
        f"{round(estimate.model_bytes / 2**20)} MiB; activations {mib['activation_bytes']} MiB); "
        f"this service allows {limit_mb} MiB per job"
    )
    raise InvalidSpec([_error(driving_path(spec, estimate), message, "memory_limit")])


def _data_size(session: Session, tenant_id: str, spec: JobSpec) -> tuple[int, tuple[int, ...], int] | None:
    """Examples (all splits), shape of one example and classes of the spec's dataset, from the built-in table or
    the uploaded dataset's description."""
    builtin = builtin_info(spec.data)
    if builtin is not None:
        return builtin.n_examples + builtin.n_test, builtin.input_shape, builtin.n_classes
    query = select(Dataset.description).where(Dataset.dataset_id == spec.data.dataset, Dataset.tenant_id == tenant_id)
    description = session.scalar(query)
    if not description or not {"n_examples", "shape", "n_classes"} <= description.keys():
        return None
    return int(description["n_examples"]), tuple(description["shape"]), int(description["n_classes"])


def queue_for(spec: JobSpec) -> str:
    """The broker queue of a job: `gpu` when the spec asks for CUDA; `auto` runs on whatever the worker has."""
    return GPU_QUEUE if spec.resources.device.startswith("cuda") else CPU_QUEUE


def _check_active_limit(session: Session, tenant_id: str, idempotency_key: str | None, limit: int) -> None:
    """Raise TooManyActiveJobs when the tenant has `limit` active jobs. The tenant stays locked until the job is
    inserted and committed (core.jobs.create_job continues this transaction), so concurrent submissions cannot all
    count the same jobs."""
    tenants.lock(session, tenant_id)
    if idempotency_key is not None:
        replay = select(Job.job_id).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
        if session.scalar(replay) is not None:
            return  # a replay creates nothing, so it is never over the limit
    query = select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(JobStatus.active()))
    if (session.scalar(query) or 0) >= limit:
        raise TooManyActiveJobs(limit)


@contextmanager
def _inserted_jobs(session: Session) -> Iterator[set[str]]:
    """The ids of the jobs this session inserts meanwhile. Under concurrent requests with one idempotency key,
    only the one whose INSERT committed sees its job here; the others replay it."""
    inserted: set[str] = set()

    def record(_session: Session, instance: object) -> None:
        if isinstance(instance, Job):
            inserted.add(instance.job_id)

    event.listen(session, "pending_to_persistent", record)
    try:
        yield inserted
    finally:
        event.remove(session, "pending_to_persistent", record)


def _error(path: str, message: str, type_: str = "value_error") -> dict[str, Any]:
    return {"path": path, "message": message, "type": type_}
