"""Shared fixtures. Databases: `db_url` (migrated, empty; a SQLite file and PostgreSQL), `session_factory`,
`empty_db_url` (no tables). PostgreSQL is skipped when unreachable, except under CI where that fails."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Tests never write into the working copy's .trickserve: anything that reads settings before a test sets its own
# home (e.g. importing the Celery app) gets a throw-away one.
os.environ.setdefault("TRICKSERVE_HOME", tempfile.mkdtemp(prefix="trickserve-tests-"))

import pytest  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from core.db import create_db_engine, init_db, make_sessionmaker  # noqa: E402
from core.models import Base  # noqa: E402
from tests.s3 import CREDENTIALS as S3_CREDENTIALS  # noqa: E402
from tests.s3 import MotoServer  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get("TRICKSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


def _require_postgres() -> None:
    try:
        with sa.create_engine(POSTGRES_ADMIN_URL).connect():
            pass
    except sa.exc.OperationalError as exc:
        message = f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {exc.orig}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def _new_postgres_database() -> Iterator[str]:
    """A uniquely named database, dropped afterwards."""
    _require_postgres()
    name = f"trickserve_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(scope="session")
def _migrated_postgres() -> Iterator[str]:
    with _new_postgres_database() as url:
        init_db(url)
        yield url


@pytest.fixture(scope="session")
def _migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "trickserve.db"
    init_db(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database with no rows: a fresh SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        path = tmp_path / "trickserve.db"
        shutil.copy(request.getfixturevalue("_migrated_sqlite"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("_migrated_postgres")
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(t.name for t in Base.metadata.sorted_tables)} RESTART IDENTITY")
    engine.dispose()
    return url


@pytest.fixture
def session_factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on `db_url`, configured as the service configures them."""
    engine = create_db_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with _new_postgres_database() as url:
        yield url


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a filesystem of its own of 30 MiB (tmpfs), unmounted afterwards. Mounting needs root: skipped
    without it, except under CI where that fails."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs (root needed): {mounted.stderr.decode(errors='replace').strip()}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real S3-protocol server (moto's, over HTTP) shared by the tests; each takes a bucket of its own."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3_url(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """TRICKSERVE_STORAGE_URL of a fresh bucket on the test server; TRICKSERVE_S3_ENDPOINT_URL and the AWS_*
    credentials are set for this process and the processes the test starts."""
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TRICKSERVE_S3_ENDPOINT_URL", moto_server.url)
    return f"s3://{moto_server.new_bucket()}/trickserve"
