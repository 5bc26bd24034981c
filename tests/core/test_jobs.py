"""core.jobs on a real SQLite file and a real PostgreSQL: lifecycle, fencing, claims, cancel, reaper, idempotency,
pages, events; and concurrent SQLite writers from several processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core import jobs, tenants
from core.db import create_db_engine, make_sessionmaker
from core.engine.callbacks import Event
from core.engine.events import EventKind
from core.models import Artifact, FailureClass, Job, JobEvent, JobStatus, utcnow
from tests.factories import make_job_spec

Sessions = sessionmaker[Session]
LEASE_S = 30.0


def submit(sessions: Sessions, tenant: str = "acme", max_attempts: int = 3, **kwargs: Any) -> Job:
    with sessions() as s:
        tenants.create_tenant(session=s, tenant_id=tenant)
        spec = kwargs.pop("spec", None) or make_job_spec(resources={"max_attempts": max_attempts})
        return jobs.create_job(session=s, tenant_id=tenant, spec=spec, advice=[], **kwargs)


def claim(sessions: Sessions, job_id: str, worker: str = "w1") -> jobs.Claim | None:
    with sessions() as s:
        return jobs.claim_job(session=s, job_id=job_id, worker_id=worker, lease_s=LEASE_S)


def reap(sessions: Sessions, after_s: float = LEASE_S + 1) -> list[str]:
    with sessions() as s:
        return jobs.requeue_expired(session=s, now=utcnow() + timedelta(seconds=after_s))


def record(sessions: Sessions, job_id: str, attempt: int, steps: range, kind: str = "progress") -> None:
    events = [event_dict(step, kind) for step in steps]
    with sessions() as s:
        assert jobs.record_events(session=s, job_id=job_id, attempt=attempt, events=events)


def load(sessions: Sessions, job_id: str) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def event_dict(step: int, kind: str = "progress") -> dict[str, Any]:
    return {"kind": kind, "step": step, "epoch": 0, "data": {"train/loss": 0.5}}


def stored_events(sessions: Sessions, job_id: str, **kwargs: Any) -> list[JobEvent]:
    with sessions() as s:
        return jobs.list_events(s, job_id, **kwargs)


def points(sessions: Sessions, job_id: str, kind: str = "progress") -> list[tuple[int, int]]:
    """(step, attempt) of the job's events of one kind, in cursor order."""
    with sessions() as s:
        return [(e.step, e.attempt) for e in jobs.list_events(s, job_id, kinds=[kind])]


def transitions(sessions: Sessions, job_id: str) -> list[tuple[str | None, str, int]]:
    with sessions() as s:
        return [(t.from_status, t.to_status, t.attempt) for t in jobs.list_transitions(s, job_id)]


def in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released at once; return their results in order, or raise their first error."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


# ------------------------------------------------------------------------------------------ lifecycle


def test_lifecycle_from_submit_to_success(session_factory: Sessions) -> None:
    job = submit(session_factory)
    assert job.job_id.startswith("job_") and len(job.job_id) == 24
    assert (job.status, job.attempt, job.max_attempts, job.spec["name"]) == (JobStatus.queued, 0, 3, "tiny")

    got = claim(session_factory, job.job_id)
    assert got is not None and got.attempt == 1 and got.checkpoint_key is None
    with session_factory() as s:
        assert jobs.heartbeat(session=s, job_id=job.job_id, attempt=1, lease_s=LEASE_S) == jobs.HeartbeatResult(
            alive=True, cancel_requested=False
        )
        assert jobs.set_checkpoint(
            session=s, job_id=job.job_id, attempt=1, key="artifacts/j/attempt-1/last.pt", step=10
        )
        assert jobs.finish_job(
            session=s,
            job_id=job.job_id,
            attempt=1,
            status="succeeded",
            stop_reason="completed",
            final_metrics={"val/acc": 0.97},
            best_metrics={"val/loss": 0.1},
            model_key="artifacts/j/attempt-1/model.safetensors",
        )

    done = load(session_factory, job.job_id)
    assert (done.status, done.stop_reason, done.final_metrics, done.checkpoint_step) == (
        JobStatus.succeeded,
        "completed",
        {"val/acc": 0.97},
        10,
    )
    assert done.created_at.tzinfo is not None and done.created_at.utcoffset() == timedelta(0)
    assert done.started_at is not None and done.finished_at is not None and done.started_at <= done.finished_at
    assert done.lease_expires_at is None
    assert transitions(session_factory, job.job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "succeeded", 1),
    ]
    status_events = [e.data["to"] for e in stored_events(session_factory, job.job_id, kinds=["status"])]
    assert status_events == ["queued", "running", "succeeded"]
    with session_factory() as s:
        kinds = sorted(str(a.kind) for a in s.scalars(sa.select(Artifact)))
    assert kinds == ["checkpoint", "model"]


def test_a_finished_job_never_changes(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    with session_factory() as s:
        assert jobs.finish_job(session=s, job_id=job.job_id, attempt=1, status="early_stopped")
        assert not jobs.finish_job(session=s, job_id=job.job_id, attempt=1, status="failed")
        assert not jobs.record_events(session=s, job_id=job.job_id, attempt=1, events=[event_dict(1)])
        assert jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="acme").status == JobStatus.early_stopped
    assert claim(session_factory, job.job_id) is None
    assert reap(session_factory) == []
    assert load(session_factory, job.job_id).status == JobStatus.early_stopped
    assert len(transitions(session_factory, job.job_id)) == 3


@pytest.mark.parametrize(
    ("from_status", "to_status"),
    [
        ("succeeded", "running"),
        ("failed", "queued"),
        ("cancelled", "running"),
        ("early_stopped", "failed"),
        ("cancelling", "queued"),
        ("queued", "succeeded"),
        ("queued", "cancelling"),
    ],
)
def test_illegal_transitions_are_refused(from_status: str, to_status: str) -> None:
    with pytest.raises(jobs.IllegalTransition):
        jobs.check_transition("job_x", JobStatus(from_status), JobStatus(to_status))


def test_finish_rejects_a_non_terminal_status_or_a_stray_failure_class(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    with session_factory() as s:
        with pytest.raises(ValueError):
            jobs.finish_job(session=s, job_id=job.job_id, attempt=1, status="queued")
        with pytest.raises(ValueError):
            jobs.finish_job(session=s, job_id=job.job_id, attempt=1, status="succeeded", failure_class="diverged")
        assert jobs.finish_job(
            session=s,
            job_id=job.job_id,
            attempt=1,
            status="failed",
            failure_class="diverged",
            failure_message="loss is nan",
            final_metrics={"train/loss": float("nan")},
        )
    failed = load(session_factory, job.job_id)
    assert (failed.failure_class, failed.failure_message) == (FailureClass.diverged, "loss is nan")
    assert failed.final_metrics == {"train/loss": "NaN"}


def test_unknown_tenant_is_refused_by_the_foreign_key(session_factory: Sessions) -> None:
    with session_factory() as s, pytest.raises(sa.exc.IntegrityError):
        jobs.create_job(session=s, tenant_id="nobody", spec=make_job_spec(), advice=[])


# ------------------------------------------------------------------------------------ claim, fencing


def test_only_one_of_two_concurrent_claims_wins(session_factory: Sessions) -> None:
    for _ in range(3):
        job = submit(session_factory)
        claims = in_threads(2, lambda i, job_id=job.job_id: claim(session_factory, job_id, worker=f"w{i}"))
        winners = [c for c in claims if c is not None]
        assert len(winners) == 1 and winners[0].attempt == 1
        assert load(session_factory, job.job_id).attempt == 1


def test_a_stale_attempt_changes_nothing(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id, worker="old")
    assert reap(session_factory) == [job.job_id]
    fresh = claim(session_factory, job.job_id, worker="new")
    assert fresh is not None and fresh.attempt == 2
    before = load(session_factory, job.job_id)

    with session_factory() as s:
        assert jobs.heartbeat(session=s, job_id=job.job_id, attempt=1, lease_s=LEASE_S).alive is False
        assert not jobs.record_events(session=s, job_id=job.job_id, attempt=1, events=[event_dict(99)])
        assert not jobs.set_checkpoint(
            session=s, job_id=job.job_id, attempt=1, key="artifacts/j/attempt-1/old.pt", step=99
        )
        assert not jobs.record_artifact(
            session=s, job_id=job.job_id, attempt=1, kind="spec", key="artifacts/j/attempt-1/old.json"
        )
        assert not jobs.finish_job(session=s, job_id=job.job_id, attempt=1, status="succeeded")

    after = load(session_factory, job.job_id)
    assert (after.status, after.attempt, after.lease_owner, after.checkpoint_key) == (
        JobStatus.running,
        2,
        "new",
        None,
    )
    assert after.lease_expires_at == before.lease_expires_at
    assert points(session_factory, job.job_id) == []
    with session_factory() as s:
        assert jobs.finish_job(session=s, job_id=job.job_id, attempt=2, status="succeeded")


def test_heartbeat_keeps_the_reaper_away(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    with session_factory() as s:
        jobs.heartbeat(session=s, job_id=job.job_id, attempt=1, lease_s=120)
    assert reap(session_factory, after_s=60) == []
    assert reap(session_factory, after_s=121) == [job.job_id]


# ---------------------------------------------------------------------------------------------- cancel


def test_cancel_of_a_queued_job_is_immediate_and_idempotent(session_factory: Sessions) -> None:
    job = submit(session_factory)
    with session_factory() as s:
        first = jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="acme")
        second = jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="acme")
    assert first.status == second.status == JobStatus.cancelled and second.cancel_requested
    assert claim(session_factory, job.job_id) is None
    assert transitions(session_factory, job.job_id) == [(None, "queued", 0), ("queued", "cancelled", 0)]


def test_cancel_of_a_running_job_reaches_the_worker(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    with session_factory() as s:
        with pytest.raises(jobs.JobNotFound):
            jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="someone-else")
        assert jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="acme").status == JobStatus.cancelling
        assert jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="acme").status == JobStatus.cancelling
        beat = jobs.heartbeat(session=s, job_id=job.job_id, attempt=1, lease_s=LEASE_S)
        assert beat == jobs.HeartbeatResult(alive=True, cancel_requested=True)
        assert jobs.record_events(session=s, job_id=job.job_id, attempt=1, events=[event_dict(5, kind="checkpoint")])
        assert jobs.finish_job(session=s, job_id=job.job_id, attempt=1, status="cancelled", stop_reason="cancelled")
    assert [t[1] for t in transitions(session_factory, job.job_id)] == ["queued", "running", "cancelling", "cancelled"]


def test_claim_settles_a_queued_job_that_carries_a_cancel_flag(session_factory: Sessions) -> None:
    job = submit(session_factory)
    with session_factory() as s:
        s.execute(sa.update(Job).where(Job.job_id == job.job_id).values(cancel_requested=True))
        s.commit()
    assert claim(session_factory, job.job_id) is None
    assert load(session_factory, job.job_id).status == JobStatus.cancelled


# ---------------------------------------------------------------------------------------------- reaper


def test_reaper_requeues_until_attempts_run_out(session_factory: Sessions) -> None:
    job = submit(session_factory, max_attempts=2)
    with session_factory() as s:
        jobs.mark_dispatched(session=s, job_ids=[job.job_id])
    claim(session_factory, job.job_id)
    assert reap(session_factory, after_s=1) == []  # lease still valid
    assert reap(session_factory) == [job.job_id]
    requeued = load(session_factory, job.job_id)
    assert (requeued.status, requeued.lease_owner, requeued.dispatched_at) == (JobStatus.queued, None, None)

    claim(session_factory, job.job_id)
    assert reap(session_factory) == []
    failed = load(session_factory, job.job_id)
    assert (failed.status, failed.failure_class, failed.attempt) == (JobStatus.failed, FailureClass.worker_lost, 2)
    with session_factory() as s:
        reasons = [t.reason for t in jobs.list_transitions(s, job.job_id)]
    assert reasons[2] == "lease expired" and "lease expired on attempt 2 of 2" in reasons[-1]
    assert claim(session_factory, job.job_id) is None


def test_reaper_finishes_an_abandoned_cancel(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    with session_factory() as s:
        jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="acme")
    assert reap(session_factory) == []
    assert load(session_factory, job.job_id).status == JobStatus.cancelled


def test_outbox_lists_jobs_until_dispatched_and_again_when_stale(session_factory: Sessions) -> None:
    job = submit(session_factory)
    with session_factory() as s:
        assert [j.job_id for j in jobs.undispatched_jobs(s)] == [job.job_id]
        jobs.mark_dispatched(session=s, job_ids=[job.job_id])
        assert jobs.undispatched_jobs(s) == []
        later = utcnow() + timedelta(seconds=120)
        assert jobs.undispatched_jobs(s, redispatch_after_s=300, now=later) == []
        assert [j.job_id for j in jobs.undispatched_jobs(s, redispatch_after_s=60, now=later)] == [job.job_id]


def test_a_dead_process_attempt_is_failed_from_outside_only_while_it_holds_the_job(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claimed = claim(session_factory, job.job_id, worker="host-a@node/123")
    assert claimed is not None

    def fail(held_by: str) -> bool:
        with session_factory() as s:
            oom = FailureClass.out_of_memory
            return jobs.fail_held_attempt(
                session=s, job_id=job.job_id, held_by=held_by, failure_class=oom, message="out of memory: killed"
            )

    assert not fail("host-b@node/")  # another worker's process died: not this attempt
    assert fail("host-a@node/")
    done = load(session_factory, job.job_id)
    assert (done.status, done.failure_class, done.failure_message, done.attempt) == (
        "failed", "out_of_memory", "out of memory: killed", 1)  # fmt: skip
    assert reap(session_factory) == [] and not fail("host-a@node/")  # settled: never retried, never failed twice


# ----------------------------------------------------------------------------------------- idempotency


def test_idempotency_key_returns_the_first_job_or_conflicts(session_factory: Sessions) -> None:
    first = submit(session_factory, idempotency_key="k1")
    assert submit(session_factory, idempotency_key="k1").job_id == first.job_id
    with pytest.raises(jobs.IdempotencyConflict):
        submit(session_factory, idempotency_key="k1", spec=make_job_spec(name="other"))
    assert submit(session_factory, tenant="globex", idempotency_key="k1").job_id != first.job_id
    assert submit(session_factory).job_id != submit(session_factory).job_id
    with session_factory() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 4


def test_concurrent_submits_with_one_key_make_one_job(session_factory: Sessions) -> None:
    with session_factory() as s:
        tenants.create_tenant(session=s, tenant_id="acme")

    def create(_: int) -> str:
        with session_factory() as s:
            job = jobs.create_job(session=s, tenant_id="acme", spec=make_job_spec(), advice=[], idempotency_key="k")
            return job.job_id

    assert len(set(in_threads(6, create))) == 1
    with session_factory() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 1


# ----------------------------------------------------------------------------------------------- pages


def test_list_filters_apply_before_the_limit_and_cursors_page_through(session_factory: Sessions) -> None:
    made = [submit(session_factory, spec=make_job_spec(name="a" if i % 3 else "b")) for i in range(12)]
    submit(session_factory, tenant="globex", spec=make_job_spec(name="a"))
    with session_factory() as s:
        for job in made[:4]:
            jobs.request_cancel(session=s, job_id=job.job_id, tenant_id="acme")
    wanted = [j.job_id for j in reversed(made[4:]) if j.name == "a"]  # queued "a" jobs, newest first

    seen, cursor = [], None
    with session_factory() as s:
        while True:
            page, cursor = jobs.list_jobs(s, "acme", status="queued", name="a", cursor=cursor, limit=2)
            assert len(page) == 2 or cursor is None
            seen += [j.job_id for j in page]
            if cursor is None:
                break
        assert seen == wanted
        everything, last = jobs.list_jobs(s, "acme", limit=100)
        assert len(everything) == 12 and last is None
        assert len(jobs.list_jobs(s, "acme", status=["cancelled", "queued"], limit=100)[0]) == 12
        with pytest.raises(jobs.InvalidCursor):
            jobs.list_jobs(s, "acme", cursor="not-a-cursor")


# ---------------------------------------------------------------------------------------------- events


def test_events_page_by_cursor_and_filter_by_kind(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    batch = [
        Event("progress", 1, 0, {"train/loss": 2.0, "lr": 0.1}),
        Event("epoch_end", 1, 0, {"train/loss": 1.5, "val/loss": 1.7}),
        Event("warning", 1, 0, {"message": "lr high"}),
        Event("warning", 1, 0, {"message": "again"}),
        Event("diverged", 2, 0, {"train/loss": float("inf")}),
    ]
    with session_factory() as s:
        assert jobs.record_events(session=s, job_id=job.job_id, attempt=1, events=batch)
        assert jobs.record_events(session=s, job_id=job.job_id, attempt=1, events=batch[:2])  # a replayed batch
        engine_events = [e for e in jobs.list_events(s, job.job_id) if e.kind != "status"]
        assert [e.kind for e in engine_events] == ["progress", "epoch_end", "warning", "warning", "diverged"]
        assert engine_events[-1].data == {"train/loss": "Infinity"}
        assert [e.kind for e in jobs.list_events(s, job.job_id, kinds=["epoch_end", "warning"])] == [
            "epoch_end",
            *["warning"] * 2,
        ]
        first_two = jobs.list_events(s, job.job_id, limit=2)
        rest = jobs.list_events(s, job.job_id, after=first_two[-1].job_event_id)
        assert [e.job_event_id for e in first_two + rest] == [e.job_event_id for e in jobs.list_events(s, job.job_id)]


def test_queued_running_and_cancelling_jobs_count_as_active(session_factory: Sessions) -> None:
    assert JobStatus.leased() == (JobStatus.running, JobStatus.cancelling)
    assert JobStatus.active() == (JobStatus.queued, JobStatus.running, JobStatus.cancelling)
    queued, running, cancelling, done = (submit(session_factory) for _ in range(4))
    for job in (running, cancelling, done):
        claim(session_factory, job.job_id)
    with session_factory() as s:
        jobs.request_cancel(session=s, job_id=cancelling.job_id, tenant_id="acme")
        assert jobs.finish_job(session=s, job_id=done.job_id, attempt=1, status="succeeded")
        assert tenants.usage(s, "acme").active_jobs == 3
        assert not jobs.heartbeat(session=s, job_id=done.job_id, attempt=1, lease_s=LEASE_S).alive
        assert jobs.heartbeat(session=s, job_id=cancelling.job_id, attempt=1, lease_s=LEASE_S).cancel_requested
    assert load(session_factory, queued.job_id).status.is_active
    assert not load(session_factory, done.job_id).status.is_active


def test_event_kinds_are_stored_as_the_strings_clients_read(session_factory: Sessions) -> None:
    stored = ["progress", "epoch_end", "early_stop", "restored", "checkpoint", "warning", "resumed", "test", "diverged",
              "pruned"]  # fmt: skip
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    batch = [Event(kind, 1, 1, {"value": 1.0}) for kind in EventKind if kind != EventKind.status]
    with session_factory() as s:
        assert jobs.record_events(session=s, job_id=job.job_id, attempt=1, events=batch)
        events = jobs.list_events(s, job.job_id)
        assert [e.kind for e in events if e.kind != "status"] == stored
        assert {type(e.kind) for e in events} == {str}
        [claimed] = jobs.list_events(s, job.job_id, kinds=[EventKind.status], after=events[0].job_event_id)
        assert claimed.data["to"] == "running"
    assert sorted(EventKind) == sorted([*stored, "status"])


def test_resume_keeps_one_point_per_step_from_the_surviving_attempt(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    record(session_factory, job.job_id, 1, range(1, 11))
    record(session_factory, job.job_id, 1, range(7, 8), kind="warning")
    with session_factory() as s:
        jobs.set_checkpoint(session=s, job_id=job.job_id, attempt=1, key="artifacts/j/attempt-1/5.pt", step=5)
        old_ids = [e.job_event_id for e in jobs.list_events(s, job.job_id)]
    reap(session_factory)

    resumed = claim(session_factory, job.job_id, worker="w2")
    assert resumed is not None and (resumed.attempt, resumed.checkpoint_step) == (2, 5)
    assert points(session_factory, job.job_id) == [(step, 1) for step in range(1, 6)]
    assert points(session_factory, job.job_id, kind="warning") == []  # step 7 belonged to the lost timeline

    record(session_factory, job.job_id, 2, range(6, 11))
    assert sorted(points(session_factory, job.job_id)) == [(s, 1) for s in range(1, 6)] + [(s, 2) for s in range(6, 11)]
    new_ids = [e.job_event_id for e in stored_events(session_factory, job.job_id) if e.attempt == 2]
    assert min(new_ids) > max(old_ids)  # ids of deleted events are never reused: cursors only move forward


def test_an_attempt_that_restarts_from_scratch_replaces_earlier_points(session_factory: Sessions) -> None:
    job = submit(session_factory)
    claim(session_factory, job.job_id)
    record(session_factory, job.job_id, 1, range(1, 9))
    with session_factory() as s:
        jobs.set_checkpoint(session=s, job_id=job.job_id, attempt=1, key="artifacts/j/attempt-1/6.pt", step=6)
    reap(session_factory)
    claim(session_factory, job.job_id)
    record(session_factory, job.job_id, 2, range(1, 4))  # the checkpoint would not load: it began again
    assert points(session_factory, job.job_id) == [(1, 2), (2, 2), (3, 2)]


# -------------------------------------------------------------------------------------- SQLite writers


sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@sqlite_only
def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(db_url: str) -> None:
    engine = create_db_engine(db_url)
    with engine.connect() as conn:
        pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "foreign_keys")}
        pragma["busy_timeout"] = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    engine.dispose()
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 30000}


@sqlite_only
def test_sqlite_sessions_take_the_write_lock_unless_read_only(db_url: str) -> None:
    engine = create_db_engine(db_url)
    other = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0.05, isolation_level=None)
    for read_only, lock_free in ((True, True), (False, False)):
        with make_sessionmaker(engine, read_only=read_only)() as s:
            s.execute(sa.select(Job)).all()  # a transaction is open now
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
                got_lock = True
            except sqlite3.OperationalError:
                got_lock = False
        assert got_lock is lock_free
    other.close()
    engine.dispose()


def _write_events(url: str, job_id: str, batches: int) -> None:
    """One worker process: batches of events and heartbeats, as fast as it can."""
    sessions = make_sessionmaker(create_db_engine(url))
    for b in range(batches):
        with sessions() as s:
            assert jobs.record_events(
                session=s, job_id=job_id, attempt=1, events=[event_dict(b * 5 + i) for i in range(5)]
            )
            assert jobs.heartbeat(session=s, job_id=job_id, attempt=1, lease_s=LEASE_S).alive


@sqlite_only
def test_concurrent_sqlite_writers_never_see_database_is_locked(db_url: str, session_factory: Sessions) -> None:
    ids = [submit(session_factory).job_id for _ in range(4)]
    for job_id in ids:
        claim(session_factory, job_id)
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_write_events, args=(db_url, job_id, 100)) for job_id in ids]
    for w in workers:
        w.start()
    # Meanwhile this process reads and submits, as the API would.
    while any(w.is_alive() for w in workers):
        submit(session_factory)
        with make_sessionmaker(session_factory.kw["bind"], read_only=True)() as s:
            jobs.list_events(s, ids[0])
            jobs.list_jobs(s, "acme")
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert [len(points(session_factory, job_id)) for job_id in ids] == [500] * 4
