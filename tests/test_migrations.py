"""Alembic migrations on a SQLite file and on PostgreSQL: up, down, up again, and the result matches the ORM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core import metrics
from core.artifacts import open_store
from core.config import Settings
from core.db import alembic_config, create_db_engine, init_db, make_sessionmaker
from core.models import Base, FailureClass, Job, JobEvent, Tenant, utcnow
from tests.factories import expected_points

ROOT = Path(__file__).resolve().parent.parent


def schema_diff(url: str) -> list[object]:
    engine = create_db_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    return diff


def table_names(url: str) -> set[str]:
    engine = create_db_engine(url)
    names = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_upgrade_downgrade_upgrade_matches_the_models(empty_db_url: str) -> None:
    init_db(empty_db_url)
    assert set(Base.metadata.tables) <= table_names(empty_db_url)
    assert schema_diff(empty_db_url) == []

    command.downgrade(alembic_config(empty_db_url), "base")
    assert table_names(empty_db_url) == {"alembic_version"}

    init_db(empty_db_url)
    init_db(empty_db_url)  # at head already: nothing to do, no error
    assert schema_diff(empty_db_url) == []


def test_schema_comparison_sees_drift(empty_db_url: str) -> None:
    # Proves that the empty diffs above are a real comparison: a missing index shows up.
    init_db(empty_db_url)
    engine = create_db_engine(empty_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_job_status_lease")
    engine.dispose()
    diff = schema_diff(empty_db_url)
    assert [d[0] for d in diff] == ["add_index"]  # type: ignore[index]


def test_alembic_command_line_uses_the_url_argument(empty_db_url: str) -> None:
    run = [sys.executable, "-m", "alembic", "-x", f"url={empty_db_url}"]
    subprocess.run([*run, "upgrade", "head"], cwd=ROOT, check=True, capture_output=True)
    current = subprocess.run([*run, "current"], cwd=ROOT, check=True, capture_output=True, text=True)
    assert "(head)" in current.stdout
    assert schema_diff(empty_db_url) == []


def test_migrated_schema_stores_every_value_of_the_models_enums(db_url: str) -> None:
    # Enums are VARCHAR + CHECK: a value added to the model needs a migration that changes the CHECK, which the
    # schema comparison above does not look at.
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(Tenant).values(tenant_id="t", name="t", created_at=utcnow()))
        for i, failure_class in enumerate(FailureClass):
            conn.execute(sa.insert(Job).values(job_id=f"job_{i}", tenant_id="t", name="n", spec={}, status="failed",
                                               failure_class=failure_class))  # fmt: skip
    with engine.connect() as conn:
        stored = set(conn.scalars(sa.select(Job.failure_class)))
    engine.dispose()
    assert stored == set(FailureClass)


def test_0003_fills_metric_point_from_the_stored_events(empty_db_url: str) -> None:
    command.upgrade(alembic_config(empty_db_url), "0002")
    engine = create_db_engine(empty_db_url)
    epoch = {"train/loss": 0.5, "val/loss": "NaN", "val/acc": "Infinity", "lr": 1, "early_stopping/wait": 2,
             "flag": False, "note": "text"}  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.insert(Tenant).values(tenant_id="t", name="t", created_at=utcnow()))
        for job_id in ("job_a", "job_b"):
            conn.execute(sa.insert(Job).values(job_id=job_id, tenant_id="t", name="n", spec={}, status="running"))
            events = [("progress", 5, {"train/loss": 0.9}), ("epoch_end", 10, epoch), ("warning", 10, {"x": 1.0}),
                      *(("epoch_end", 10 * e, {"val/loss": 1 / e}) for e in range(2, 1500)),
                      ("test", 15000, {"test/acc": 0.75})]  # fmt: skip
            conn.execute(sa.insert(JobEvent), [
                {"job_id": job_id, "attempt": 1, "kind": kind, "step": step, "epoch": step // 10, "data": data,
                 "created_at": utcnow()} for kind, step, data in events
            ])  # fmt: skip

    init_db(empty_db_url)
    sessions = make_sessionmaker(engine)
    for job_id in ("job_a", "job_b"):
        with sessions() as s:
            points = [tuple(row[:5]) for row in metrics.read_page(s, job_id, limit=10_000).points]
        assert points == expected_points(sessions, job_id)
        assert len(points) == 4 + 1498 + 1  # the first epoch's four numbers, one per later epoch, the test's
        first = [("train/loss", 0.5), ("val/loss", None), ("val/acc", float("inf")), ("lr", 1.0)]
        assert points[:4] == [(points[0][0], 10, 1, name, value) for name, value in first]

    command.downgrade(alembic_config(empty_db_url), "0002")
    assert "metric_point" not in table_names(empty_db_url)
    engine.dispose()


def test_0004_turns_stored_paths_into_keys_of_the_default_folder_store(empty_db_url: str, tmp_path: Path) -> None:
    command.upgrade(alembic_config(empty_db_url), "0003")
    engine = create_db_engine(empty_db_url)
    ckpt = "/srv/.trickserve/artifacts/job_a/attempt-2/checkpoint.1.pt"
    model = "/srv/.trickserve/artifacts/job_a/attempt-2/model.safetensors"
    with engine.begin() as conn:
        conn.execute(sa.insert(Tenant).values(tenant_id="t", name="t", created_at=utcnow()))
        conn.execute(sa.insert(Job).values(job_id="job_a", tenant_id="t", name="n", spec={}, status="succeeded"))
        conn.execute(sa.text("UPDATE job SET checkpoint_path = :c, model_path = :m"), {"c": ckpt, "m": model})
        conn.execute(sa.text(
            "INSERT INTO artifact (job_id, attempt, kind, path, created_at) VALUES ('job_a', 2, 'model', :m, :at)"
        ), {"m": model, "at": utcnow()})  # fmt: skip
        for dataset_id, path in (("ds_rel", "t/ds_rel.npz"), ("ds_abs", "/old/home/datasets/t/ds_abs.csv")):
            conn.execute(sa.text(
                "INSERT INTO dataset (dataset_id, tenant_id, name, filename, path, size_bytes, description, "
                "created_at) VALUES (:id, 't', 'd', 'd.npz', :p, 1, '{}', :at)"
            ), {"id": dataset_id, "p": path, "at": utcnow()})  # fmt: skip

    command.upgrade(alembic_config(empty_db_url), "0004")
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT checkpoint_key, model_key FROM job")).one()
        assert tuple(job) == (
            "artifacts/job_a/attempt-2/checkpoint.1.pt",
            "artifacts/job_a/attempt-2/model.safetensors",
        )
        assert conn.execute(sa.text("SELECT key FROM artifact")).scalar() == job[1]
        keys = dict(conn.execute(sa.text("SELECT dataset_id, key FROM dataset")).all())
        assert keys == {"ds_rel": "datasets/t/ds_rel.npz", "ds_abs": "datasets/t/ds_abs.csv"}
    # The keys name the files where the default store looks for them.
    assert open_store(Settings(home=tmp_path)).local_path(keys["ds_rel"]) == tmp_path / "datasets" / "t" / "ds_rel.npz"

    command.downgrade(alembic_config(empty_db_url), "0003")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT path FROM dataset WHERE dataset_id = 'ds_rel'")).scalar() == "t/ds_rel.npz"
    engine.dispose()
