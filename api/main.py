"""The app factory: `create_app(settings, send=...)` builds the FastAPI application; `trickserve api` serves it."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from api.deps import refuse_nul
from api.errors import install_error_handlers
from api.hub import EventHub
from api.limits import BodyLimitMiddleware
from api.monitoring import LatencyMiddleware, Monitoring
from api.reads import QuickReads
from api.routes import include_routers, upload_limits
from api.slots import StreamSlots
from api.uploads import keep_sweeping_stale_uploads, sweep_stale_uploads
from core.artifacts import open_store
from core.config import Settings
from core.db import Database
from core.dispatch import Send
from core.spec import JobSpec
from core.studyspec import StudySpec

DESCRIPTION = """Submit deep-learning training jobs as specs, follow their metrics live, download the trained model.

Every request but /healthz, /readyz and /metrics carries an API key, `Authorization: Bearer tsk_...`, which names
the caller's tenant; another tenant's jobs and datasets answer 404.

Every error is JSON `{"error": {"code", "message", "details"}}`; a bad spec gets 422 `invalid_spec` listing
every problem with its dotted path (`optim.lr`)."""


def create_app(settings: Settings, *, send: Send) -> FastAPI:
    """The API for `settings`. `send` publishes a stored job to the workers (the entry point passes the worker's
    publisher, worker.celery_app.publisher; the API itself never imports the worker)."""
    app = FastAPI(
        title="trickserve",
        version="1",
        description=DESCRIPTION,
        lifespan=_lifespan,
        dependencies=[Depends(refuse_nul)],
    )
    db = Database.from_settings(settings)
    app.state.settings = settings
    app.state.send = send
    app.state.db = db
    app.state.store = open_store(settings)
    app.state.sessions = db.sessions
    app.state.read_sessions = db.read_sessions
    app.state.quick_reads = QuickReads(db, settings)
    # The event streams read through a small pool of their own: polling and streaming cannot starve each other.
    stream_db = Database.from_settings(settings, pool_size=settings.sse_db_pool_size, max_overflow=0)
    app.state.stream_db = stream_db
    app.state.stream_sessions = stream_db.read_sessions
    app.state.hub = EventHub(
        stream_db.read_sessions, redis_url=settings.redis_url, viewer_queue=settings.sse_viewer_queue
    )
    app.state.stream_slots = StreamSlots(
        settings.sse_max_connections_per_tenant,
        settings.sse_max_connections,
        settings.retry_after_s,
        settings.redis_url,
    )
    app.state.monitoring = Monitoring(app.state.read_sessions)
    app.add_middleware(
        BodyLimitMiddleware,
        default=settings.max_body_kb * 1024,
        per_path=upload_limits(settings),
        timeout_s=settings.request_body_timeout_s,
    )
    app.add_middleware(LatencyMiddleware, monitoring=app.state.monitoring)
    install_error_handlers(app)
    include_routers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    await run_in_threadpool(settings.ensure_dirs)
    await sweep_stale_uploads(settings)
    sweeper = asyncio.create_task(keep_sweeping_stale_uploads(settings))
    renewer = asyncio.create_task(app.state.stream_slots.keep_renewing())
    # What start-up made (modules, the app, the schemas) lives as long as the process: moved out of the collector's
    # reach, the full collections that would walk it again and again no longer pause a request for ~100 ms.
    gc.freeze()
    try:
        yield
    finally:
        sweeper.cancel()
        renewer.cancel()
        await app.state.hub.close()
        await app.state.stream_slots.close()
        app.state.quick_reads.dispose()
        app.state.stream_db.dispose()
        app.state.db.dispose()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus JobSpec (the body of POST /v1/jobs and /v1/specs/validate) and its parts, and
    the limits that are settings."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec.pop("$defs", {}))
        components["JobSpec"] = spec
        study = StudySpec.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        components.update(study.pop("$defs", {}))
        components["StudySpec"] = study
        _document_page_limit(schema, app.state.settings.max_page_size)
        app.openapi_schema = schema
    return app.openapi_schema


def _document_page_limit(schema: dict[str, Any], max_page_size: int) -> None:
    """Every `limit` query parameter gets the configured maximum (a setting, so unknown to the route code)."""
    for operation in (op for path in schema["paths"].values() for op in path.values()):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "query" and parameter["name"] == "limit":
                for option in parameter["schema"].get("anyOf", [parameter["schema"]]):
                    if option.get("type") == "integer":
                        option["maximum"] = max_page_size
