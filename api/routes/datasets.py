"""Datasets: upload a .npz, .csv or image-folder .zip (streamed to a local spool file, size-limited, hashed,
validated, then stored in the artifact store whole), read, list."""

from __future__ import annotations

import logging
from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import (
    AUTHENTICATED,
    FREE_DISK,
    PageLimitDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    WriteSessionDep,
)
from api.errors import ApiError, problem
from api.schemas import BAD_CURSOR, ERRORS, STORAGE_FULL, DatasetPublic, DatasetsPage, ErrorBody
from api.uploads import Upload, receive_upload
from core.artifacts import StorageError, Store, dataset_key, retrying
from core.config import Settings
from core.datasets import check_storage, create_dataset, get_dataset, list_datasets
from core.models import Dataset, new_id
from core.spec import SpecError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], dependencies=AUTHENTICATED, responses=ERRORS)

SUFFIXES = (".npz", ".csv", ".zip")
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the text fields around the file
UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": ".npz, .csv or .zip"},
                        "name": {"type": "string", "description": "a label; default: the file name"},
                        "label_column": {"type": "string", "description": ".csv: the label column (default label)"},
                    },
                }
            }
        },
    }
}


def upload_limit(max_upload_mb: int) -> int:
    """Bytes an upload request may hold: the file limit plus room for the multipart framing."""
    return max_upload_mb * 2**20 + MULTIPART_OVERHEAD


@router.post(
    "",
    status_code=201,
    dependencies=FREE_DISK,
    openapi_extra=UPLOAD_OPENAPI,
    responses={
        413: {
            "model": ErrorBody,
            "description": "over max_upload_mb, the tenant's max_dataset_storage_mb, or max_dataset_memory_mb once "
            "decoded (dataset_too_large)",
        },
        415: {"model": ErrorBody, "description": "not multipart/form-data"},
        503: {"model": ErrorBody, "description": "the artifact store is unavailable (storage_unavailable)"},
        507: STORAGE_FULL,
    },
)
async def upload_dataset(
    request: Request,
    response: Response,
    session: WriteSessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
) -> DatasetPublic:
    """Upload a dataset: .npz (arrays x, y, optional x_test, y_test), .csv (numeric columns and a label column) or
    .zip (images in class-named folders). It is validated now; use its id as `data.dataset` in a spec."""
    folder = settings.dataset_dir / tenant
    upload = await receive_upload(request, folder=folder, max_bytes=settings.max_upload_mb * 2**20, suffixes=SUFFIXES)
    try:
        row = await run_in_threadpool(_store, upload, session, tenant, settings, store)
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    response.headers["Location"] = f"/v1/datasets/{row.dataset_id}"
    return DatasetPublic.from_row(row)


@router.get("", responses=BAD_CURSOR)
def list_uploaded(
    session: SessionDep,
    tenant: TenantDep,
    limit: PageLimitDep,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> DatasetsPage:
    """The tenant's datasets, newest first."""
    rows, next_cursor = list_datasets(session, tenant, cursor=cursor, limit=limit)
    return DatasetsPage(items=[DatasetPublic.from_row(row) for row in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}")
def read_dataset(
    dataset_id: Annotated[str, PathParam(description="ds_...")], session: SessionDep, tenant: TenantDep
) -> DatasetPublic:
    """One dataset and its description: example shape, kind, classes, counts."""
    row = get_dataset(session, tenant, dataset_id)
    if row is None:
        raise ApiError(404, "not_found", f"no dataset {dataset_id}")
    return DatasetPublic.from_row(row)


def _store(upload: Upload, session: Session, tenant_id: str, settings: Settings, store: Store) -> Dataset:
    """Validate the received file against the tenant's quota and the caps, store it under its key, record it (the
    quota is checked again as the row is inserted: uploads received side by side were all within it here). The
    object is stored before its row exists, so no dataset is ever listed without its file; a row that cannot be
    inserted takes its object with it."""
    _check_text(upload)
    max_storage_bytes = settings.max_dataset_storage_mb * 2**20
    try:
        check_storage(session, tenant_id, upload.size_bytes, max_storage_bytes)  # before the file is read
    finally:
        session.rollback()  # end the read now: on SQLite the write session's transaction holds the write lock
    label_column = (upload.fields.get("label_column") or "label").strip()
    description = _describe(upload, label_column, settings.max_dataset_memory_mb * 2**20)
    _check_examples(description["n_examples"], settings.max_dataset_examples)
    dataset_id = new_id("ds_")
    key = dataset_key(tenant_id, dataset_id, upload.path.suffix)
    upload.path.chmod(0o644)  # mkstemp made it owner-only; a worker running as another user must read it
    retrying(lambda: store.put_file(key, upload.path, move=True), within_s=settings.storage_retry_s, what="upload")
    try:
        return create_dataset(
            session=session,
            tenant_id=tenant_id,
            dataset_id=dataset_id,
            name=_name(upload),
            filename=upload.filename,
            key=key,
            sha256=upload.sha256,
            size_bytes=upload.size_bytes,
            description={**description, "label_column": label_column if upload.path.suffix == ".csv" else None},
            max_storage_bytes=max_storage_bytes,
        )
    except BaseException:
        try:
            store.delete(key)
        except StorageError as exc:  # an object no row names: unreachable, and only its bytes are lost
            log.warning("dataset %s: cannot delete its object after the row failed: %s", dataset_id, exc)
        raise


def _check_examples(n_examples: int, limit: int) -> None:
    if n_examples > limit:
        message = f"{n_examples} examples; at most {limit} on this service"
        raise ApiError(422, "invalid_dataset", message, [problem("file", message, "less_than_equal")])


def _check_text(upload: Upload) -> None:
    # PostgreSQL text cannot hold NUL, and no name needs one.
    texts = {"file": upload.filename, **upload.fields}
    for field, text in texts.items():
        if "\x00" in text:
            message = f"{field}: must not contain NUL characters"
            raise ApiError(422, "invalid_request", message, [problem(field, message, "nul_character")])


def _describe(upload: Upload, label_column: str, max_bytes: int) -> dict:
    # numpy only: the engine's torch stays out of the API until a job is submitted
    from core.engine.budget import DatasetTooLarge
    from core.engine.files import describe_dataset

    try:
        return describe_dataset(upload.path, label_column, max_bytes)
    except SpecError as exc:
        field = "label_column" if exc.path == "data.label_column" else "file"
        message = exc.message.replace(upload.path.name, upload.filename)  # the user's name, not our temporary one
        status, code = (413, "dataset_too_large") if isinstance(exc, DatasetTooLarge) else (422, "invalid_dataset")
        raise ApiError(status, code, message, [problem(field, message, code)]) from None


def _name(upload: Upload) -> str:
    return (upload.fields.get("name") or "").strip()[:200] or PurePath(upload.filename).stem[:200] or "dataset"
