"""Database engines and sessions; SQLite is set up so that the API and workers write side by side."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, Insert, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


IDLE_IN_TRANSACTION_MS = 60_000  # PostgreSQL ends a transaction idle this long; ours last milliseconds


def create_db_engine(url: str | URL, *, sqlite_busy_timeout_s: float = 30.0, **kwargs: Any) -> Engine:
    """An engine for `url`; extra keyword arguments go to create_engine."""
    url = make_url(url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_s=sqlite_busy_timeout_s, **kwargs)
    # A process frozen (or killed without its socket closing) inside a transaction would hold its row locks forever.
    # Timestamps come back in UTC whatever the server's zone, so a read that skips UTCDateTime (core.metrics) gets it.
    connect_args = {"options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS} -c TimeZone=UTC"}
    connect_args.update(kwargs.pop("connect_args", {}))
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def _sqlite_engine(url: URL, *, busy_timeout_s: float, **kwargs: Any) -> Engine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from sqlite3 (whose legacy mode BEGINs only before a write): _on_begin
        # below emits BEGIN itself, as the SQLAlchemy pysqlite documentation describes.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")  # readers and the one writer no longer block each other
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front and waits up to busy_timeout for it. A DEFERRED transaction
        # that reads and then writes fails at once with "database is locked" if another writer got in between.
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'IMMEDIATE')}")

    return engine


def make_sessionmaker(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on `engine`. On SQLite every transaction holds the write lock unless `read_only` (BEGIN DEFERRED,
    for sessions that only read): keep sessions short. On PostgreSQL a `read_only` session runs each statement on
    its own (autocommit): no BEGIN and ROLLBACK round trips around a read, which were a third of a cheap request's
    database time; under READ COMMITTED each statement sees a snapshot of its own either way."""
    bind = engine
    if read_only:
        sqlite = engine.dialect.name == "sqlite"
        bind = engine.execution_options(
            **({"sqlite_begin": "DEFERRED"} if sqlite else {"isolation_level": "AUTOCOMMIT"})
        )
    # Objects stay readable after the commit that ends each core.jobs function, without a new (locking) SELECT.
    return sessionmaker(bind=bind, expire_on_commit=False)


class Database:
    """One database as a process uses it: its engine, and sessions that write or only read."""

    def __init__(self, url: str | URL, *, sqlite_busy_timeout_s: float = 30.0, **engine_kwargs: Any):
        self.engine = create_db_engine(url, sqlite_busy_timeout_s=sqlite_busy_timeout_s, **engine_kwargs)
        self.sessions = make_sessionmaker(self.engine)
        self.read_sessions = make_sessionmaker(self.engine, read_only=True)

    @classmethod
    def from_settings(cls, settings: Settings, **engine_kwargs: Any) -> Database:
        """The database of `settings`, its pool sized by them; `engine_kwargs` (e.g. pool_size) win."""
        pool = {
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_pool_overflow,
            "pool_timeout": settings.db_pool_timeout_s,
        }
        return cls(
            settings.database_url, sqlite_busy_timeout_s=settings.sqlite_busy_timeout_s, **{**pool, **engine_kwargs}
        )

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A session closed on exit, which rolls back anything uncommitted; core.jobs functions commit themselves."""
        with (self.read_sessions if read_only else self.sessions)() as session:
            yield session

    def dispose(self, *, close: bool = True) -> None:
        """Drop the pooled connections; close=False in a forked child leaves the parent's sockets alone."""
        self.engine.dispose(close=close)


@contextmanager
def committing(session: Session) -> Iterator[None]:
    """Commit on the way out, roll back on any error: no call leaves a transaction (on SQLite: the lock) open."""
    try:
        yield
    except BaseException:
        session.rollback()
        raise
    session.commit()


def insert_ignoring_duplicates(session: Session, model: type[Any]) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING; the two backends we support spell it alike but need their own construct."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    return insert(model).on_conflict_do_nothing()


def alembic_config(url: str) -> Config:
    """Alembic configuration for `url`, independent of the working folder."""
    config = Config()  # no ini file, so migrations/env.py leaves the application's logging alone
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    return config


def init_db(url: str) -> None:
    """Migrate the database to the latest schema (alembic upgrade head)."""
    command.upgrade(alembic_config(url), "head")
