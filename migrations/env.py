"""Alembic environment: migrates the database named by `-x url=...`, the caller's config or the settings."""

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection, pool

from core.config import Settings
from core.db import create_db_engine
from core.models import Base

config = context.config
if config.config_file_name is not None:  # the alembic command line; init_db() passes no file
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.attributes.get("url")
        or config.get_main_option("sqlalchemy.url")
        or Settings().database_url
    )


def configure(**kwargs: Any) -> None:
    # Batch mode turns ALTERs that SQLite lacks into "create new table, copy, drop, rename".
    context.configure(target_metadata=Base.metadata, render_as_batch=True, compare_type=True, **kwargs)


def run_offline() -> None:
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def migrate(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        # A batch copy of a table would fail or cascade with foreign keys enforced. The pragma is ignored inside
        # a transaction, so it goes straight to the driver before ours begins (this connection is ours alone).
        connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
    configure(connection=connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # API and worker may both migrate at start-up: one at a time, the second then finds nothing to do.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('trickserve.migrations'))")
        context.run_migrations()


def run_online() -> None:
    engine = create_db_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            migrate(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
