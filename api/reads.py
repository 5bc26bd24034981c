"""Reads of a row or two by an index from async code (a request's key, its job): in place on SQLite, in the
threadpool on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import SingletonThreadPool
from starlette.concurrency import run_in_threadpool

from core.config import Settings
from core.db import Database, create_db_engine, make_sessionmaker

T = TypeVar("T")
Read = Callable[..., T]


class QuickReads:
    """SQLite answers from within this process, so a trip to the threadpool costs more CPU in thread switches than
    such a read, and the cheapest requests (GET /v1/jobs/{id}) make two: there they run in place, each event loop
    on a connection of its own (never one of the pool, which the loop could wait for while holding the sessions
    that would give one back). PostgreSQL answers over the network, which the event loop must not wait on: there
    they go to the threadpool, on the pool's connections."""

    def __init__(self, db: Database, settings: Settings):
        self.in_place = db.engine.dialect.name == "sqlite"
        self.sessions: sessionmaker[Session] = db.read_sessions
        self.engine: Engine | None = None
        if self.in_place:
            self.engine = create_db_engine(
                settings.database_url,
                sqlite_busy_timeout_s=settings.sqlite_busy_timeout_s,
                poolclass=SingletonThreadPool,  # one connection per thread: per event loop
            )
            self.sessions = make_sessionmaker(self.engine, read_only=True)

    async def __call__(self, read: Read[T], *args: Any) -> T:
        """`read(sessions, *args)`."""
        if self.in_place:
            return read(self.sessions, *args)
        return await run_in_threadpool(read, self.sessions, *args)

    def dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
