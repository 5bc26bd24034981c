"""Every error answer is JSON `{"error": {"code", "message", "details"}}`; the handlers here map exceptions to it."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from core.artifacts import StorageError
from core.datasets import StorageQuotaExceeded
from core.jobs import IdempotencyConflict, IllegalTransition, InvalidCursor, JobNotFound
from core.spec import SpecError, spec_errors
from core.storage import StorageFull, is_disk_full
from core.studies import StudyIdempotencyConflict, TooManyTrials
from core.submit import InvalidSpec, TooManyActiveJobs

log = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499  # no client ever sees it; the latency metrics count such requests under it

# The code of an error raised without one (Starlette's 404 for unknown paths, 405, the body limit's 413...).
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    507: "storage_full",
}


class ApiError(Exception):
    """An error answer raised by route code: HTTP status, machine-readable code, a message for people, details."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error answer."""
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def problem(path: str, message: str, type_: str = "value_error") -> dict[str, str]:
    """One entry of `details`: what is wrong where."""
    return {"path": path, "message": message, "type": type_}


def _invalid_spec(details: list[dict[str, Any]]) -> JSONResponse:
    n = len(details)
    message = f"the job spec has {n} problem{'s' * (n != 1)}: " + "; ".join(
        f"{d['path']}: {d['message']}" for d in details[:3]
    )
    return error_response(422, "invalid_spec", message + (" ..." if n > 3 else ""), details)


def too_many(code: str, message: str, retry_after_s: int) -> ApiError:
    """A 429 that says when to try again."""
    return ApiError(429, code, message, headers={"Retry-After": str(retry_after_s)})


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _too_many_jobs(request: Request, exc: TooManyActiveJobs) -> JSONResponse:
    return await _api_error(request, too_many(exc.code, str(exc), request.app.state.settings.retry_after_s))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else STATUS_CODES.get(exc.status_code, "error")
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names the methods of the first route of the path; a path has several
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return error_response(exc.status_code, STATUS_CODES.get(exc.status_code, "error"), message, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [
        problem(".".join(str(p) for p in err.get("loc", ())), err.get("msg", ""), err.get("type", ""))
        for err in exc.errors()
    ]
    first = f"{details[0]['path']}: {details[0]['message']}" if details else "invalid request"
    return error_response(422, "invalid_request", f"the request is not valid: {first}", details)


async def _validation_error(request: Request, exc: ValidationError) -> JSONResponse:
    if not exc.title.endswith("Spec"):  # not a part of core.spec: a bug of ours, not the caller's
        return await _internal(request, exc)
    return _invalid_spec(spec_errors(exc))


async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
    return _invalid_spec([problem(exc.path, exc.message, "spec_error")])


async def _submit_invalid(request: Request, exc: InvalidSpec) -> JSONResponse:
    return _invalid_spec(exc.errors)


def storage_full(message: str, retry_after_s: int) -> ApiError:
    """A 507: the disk or the database has no space for what was asked; try again once space is freed."""
    return ApiError(507, "storage_full", message, headers={"Retry-After": str(retry_after_s)})


async def _storage_full(request: Request, exc: StorageFull) -> JSONResponse:
    message = f"{exc}; new jobs and uploads are refused until space is freed"
    return await _api_error(request, storage_full(message, request.app.state.settings.retry_after_s))


# What the databases say when they are out of connections or locks for now, rather than broken.
BUSY_DATABASE = ("database is locked", "database table is locked", "too many clients", "connection slots are reserved")


async def _disk_or_internal(request: Request, exc: Exception) -> JSONResponse:
    """A write that failed for lack of space (a file, SQLite, PostgreSQL) is a 507; a database out of connections
    or locks a 503; any other such error a 500."""
    if isinstance(exc, OperationalError) and any(busy in str(exc) for busy in BUSY_DATABASE):
        return await _database_busy(request, exc)
    if not is_disk_full(exc):
        return await _internal(request, exc)
    what = "the database is full" if isinstance(exc, OperationalError) else "the disk is full"
    log.warning("%s on %s %s: %s", what, request.method, request.url.path, str(exc).splitlines()[0])
    retry_after_s = request.app.state.settings.retry_after_s
    return await _api_error(request, storage_full(f"{what}; try again once space is freed", retry_after_s))


async def _too_many_trials(request: Request, exc: TooManyTrials) -> JSONResponse:
    message = str(exc)
    return error_response(422, "too_many_trials", message, [problem("seeds", message, "too_many_trials")])


async def _storage_error(request: Request, exc: StorageError) -> JSONResponse:
    """The artifact store refused or did not answer (after its retries): 507 when its disk is full, else 503."""
    if is_disk_full(exc):
        return await _disk_or_internal(request, exc)
    log.warning("artifact store on %s %s: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": str(request.app.state.settings.retry_after_s)}
    message = "the artifact store is unavailable; try again later"
    return await _api_error(request, ApiError(503, "storage_unavailable", message, headers=headers))


class _OncePerMinute:
    """Logs a recurring condition once, then at most once a minute with how often it happened meanwhile."""

    def __init__(self, message: str):
        self.message, self.count, self.last = message, 0, float("-inf")

    def __call__(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= 60:
            log.warning("%s (%d time%s since the last report)", self.message, self.count, "s" * (self.count != 1))
            self.count, self.last = 0, now


_pool_exhausted = _OncePerMinute("database busy (pool exhausted, or locked): requests answered 503 with Retry-After")


async def _database_busy(request: Request, exc: Exception) -> JSONResponse:
    # Every connection of the pool stayed busy for db_pool_timeout_s, or the database had no connection or lock to
    # spare in time: load beyond what it serves, not a bug.
    _pool_exhausted()
    message = "the server has no free database connection; try again shortly"
    return await _api_error(request, ApiError(503, "database_busy", message, headers={"Retry-After": "1"}))


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    # The client hung up before its body was whole: nothing is wrong with the service, and no one reads an answer.
    log.info("%s %s: the client disconnected before sending the whole body", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    error_id = secrets.token_hex(8)
    log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal server error", {"error_id": error_id})


def _simple(status: int, code: str, message: Callable[[Exception], str] = str) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_response(status, code, message(exc))

    return handler


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, expected or not, in the JSON error format; never with a traceback."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(SpecError, _spec_error)
    app.add_exception_handler(InvalidSpec, _submit_invalid)
    app.add_exception_handler(TooManyActiveJobs, _too_many_jobs)
    app.add_exception_handler(IllegalTransition, _simple(409, "illegal_transition"))
    app.add_exception_handler(IdempotencyConflict, _simple(422, "idempotency_key_reused"))
    app.add_exception_handler(StudyIdempotencyConflict, _simple(422, "idempotency_key_reused"))
    app.add_exception_handler(TooManyTrials, _too_many_trials)
    app.add_exception_handler(JobNotFound, _simple(404, "not_found", lambda exc: f"no job {exc}"))
    app.add_exception_handler(InvalidCursor, _simple(400, "invalid_cursor"))
    app.add_exception_handler(StorageFull, _storage_full)
    app.add_exception_handler(StorageError, _storage_error)
    app.add_exception_handler(OSError, _disk_or_internal)
    app.add_exception_handler(OperationalError, _disk_or_internal)
    app.add_exception_handler(PoolTimeout, _database_busy)
    app.add_exception_handler(StorageQuotaExceeded, _simple(413, "storage_quota_exceeded"))
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal)
