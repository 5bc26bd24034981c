"""Dry run of a spec: validated and resolved as a submission would be, with advice and the model's size."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from api.deps import AUTHENTICATED, SessionDep, SettingsDep, SpecBody, TenantDep, require_json
from api.errors import problem
from api.schemas import BAD_JSON_BODY, ERRORS, MemoryEstimatePublic, SpecValidation
from core.datasets import get_dataset
from core.spec import JobSpec, SpecError, builtin_info
from core.submit import Caps, InvalidSpec, check_caps, check_memory, check_references, parse_spec, queue_for

router = APIRouter(prefix="/v1/specs", tags=["specs"], dependencies=AUTHENTICATED, responses=ERRORS)


@router.post("/validate", dependencies=[Depends(require_json)], responses=BAD_JSON_BODY)
def validate_spec(spec: SpecBody, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> SpecValidation:
    """Validate and resolve a spec without submitting it: the resolved spec, its advice, the parameter count of the
    model built for the dataset's inputs and the memory the job is estimated to need; or 422 listing every problem."""
    from core.engine.advice import advise  # the engine imports torch: only when a spec is really checked

    job_spec = parse_spec(spec)
    check_caps(job_spec, Caps.from_settings(settings))
    check_references(session, tenant, job_spec)
    shape, n_classes = _inputs(session, tenant, job_spec)
    parameter_count = _parameter_count(job_spec, shape, n_classes)
    estimate = check_memory(session, tenant, job_spec, settings.max_job_memory_mb)
    return SpecValidation(
        spec=job_spec.model_dump(mode="json"),
        advice=[asdict(a) for a in advise(job_spec)],
        parameter_count=parameter_count,
        memory=None if estimate is None else MemoryEstimatePublic(**estimate.parts()),
        input_shape=list(shape),
        n_classes=n_classes,
        queue=queue_for(job_spec),
    )


def _inputs(session: Session, tenant_id: str, spec: JobSpec) -> tuple[tuple[int, ...], int]:
    """Shape of one example and the number of classes the model will see."""
    data, builtin = spec.data, builtin_info(spec.data)
    if builtin is not None:
        shape, n_classes = builtin.input_shape, builtin.n_classes
    else:
        dataset = get_dataset(session, tenant_id, data.dataset)
        assert dataset is not None  # check_references found it
        description = dataset.description
        _check_augment(spec, description["kind"])
        shape, n_classes = tuple(description["shape"]), description["n_classes"]
    return shape, len(data.classes) if data.classes else n_classes


def _check_augment(spec: JobSpec, kind: str) -> None:
    from core.engine.data import check_augment

    try:
        check_augment(spec.data.augment, kind)
    except SpecError as exc:
        raise InvalidSpec([problem(exc.path, exc.message)]) from None


def _parameter_count(spec: JobSpec, shape: tuple[int, ...], n_classes: int) -> int:
    import torch

    from core.engine.models import build_model

    try:
        with torch.device("meta"):  # shapes only: no memory, however large the model
            model = build_model(spec.model, shape, n_classes)
    except SpecError:
        raise
    except (RuntimeError, ValueError) as exc:  # e.g. more pooling than the input has pixels
        raise InvalidSpec([problem("model", f"cannot be built for inputs of shape {list(shape)}: {exc}")]) from None
    return sum(p.numel() for p in model.parameters())
