"""Studies run by worker.runner.run_job in-process on a real SQLite file: a grid with seeds makes exactly its trials,
each trial's end makes the next ones within max_concurrent, the pruner stops trials that trail (status `pruned`,
with its event and its checkpoint), and the verdict comes from the numbers."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from core import studies, tenants
from core.models import Job, JobStatus, Study
from core.sampling import next_point
from core.submit import Caps
from tests.factories import TENANT, Backend, make_spec
from worker import runner

BASE = make_spec(train={"epochs": 3, "batch_size": 32, "progress_interval_s": 0.001})


def study_spec(**overrides: Any) -> dict[str, Any]:
    spec = {"name": "grid", "base": BASE, "space": {"optim.name": {"grid": ["sgd", "adam"]}}, "seeds": [1, 2, 3]}
    return {**spec, **overrides}


def create(backend: Backend, raw: dict[str, Any], *, max_active_jobs: int = 100) -> Study:
    with backend.session() as session:
        tenants.create_tenant(session=session, tenant_id=TENANT)
        spec = studies.parse_study(raw)
        base, advice = studies.check_study(session, TENANT, spec, Caps.from_settings(backend.settings), 500)
        session.rollback()
        return studies.create_study(
            session=session, tenant_id=TENANT, spec=spec, base=base, advice=advice, max_active_jobs=max_active_jobs
        ).study


def trials(backend: Backend, study_id: str) -> list[Job]:
    with backend.session(read_only=True) as session:
        return list(session.scalars(sa.select(Job).where(Job.study_id == study_id).order_by(Job.trial_number)))


def run_queued(backend: Backend, study_id: str) -> list[tuple[int, str]]:
    """Run the study's queued trials one at a time, as one worker would, until none is left."""
    ran = []
    while queued := [t for t in trials(backend, study_id) if t.status == JobStatus.queued]:
        for trial in queued:
            status = runner.run_job(trial.job_id, worker_id="w/1", settings=backend.settings, db=backend.db)
            ran.append((trial.trial_number, status))
    return ran


def load(backend: Backend, study_id: str) -> Study:
    with backend.session(read_only=True) as session:
        return session.get_one(Study, study_id)


def test_a_grid_with_seeds_runs_exactly_each_point_once_per_seed(backend):
    study = create(backend, study_spec(max_concurrent=2))
    assert [t.trial_number for t in trials(backend, study.study_id)] == [0, 1]  # max_concurrent at once
    ran = run_queued(backend, study.study_id)
    assert sorted(n for n, _ in ran) == list(range(6)) and {s for _, s in ran} == {"succeeded"}
    made = trials(backend, study.study_id)
    assert len(made) == 2 * 3
    assert sorted((t.params["optim.name"], t.trial_seed) for t in made) == [
        (name, seed) for name in ("adam", "sgd") for seed in (1, 2, 3)
    ]
    for trial in made:  # the seed went where the study said, and the value where its path said
        assert trial.spec["train"]["seed"] == trial.trial_seed == trial.spec["data"]["split"]["seed"]
        assert trial.spec["optim"]["name"] == trial.params["optim.name"]
    done = load(backend, study.study_id)
    assert done.status == "succeeded" and done.trials_created == done.trials_planned == 6
    with backend.session(read_only=True) as session:
        results, verdict = studies.study_verdict(session, done)
        kinds = [e.kind for e in studies.list_events(session, study.study_id)]
    assert kinds.count("trial_created") == kinds.count("trial_ended") == 6 and kinds[-1] == "study_ended"
    [optimizer] = verdict["parameters"]
    by_value = {row["value"]: row for row in optimizer["values"]}
    for name, row in by_value.items():  # the numbers are the trials' own
        values = [r.value for r in results if r.params["optim.name"] == name]
        assert row["n"] == 3 and row["mean"] == pytest.approx(sum(values) / 3)
        assert row["ci95"][0] < row["mean"] < row["ci95"][1]
    best = max(by_value.values(), key=lambda row: row["mean"])
    assert optimizer["best_value"] == best["value"] and best["verdict"] == "best"
    assert done.best_value == max(r.value for r in results)


def test_a_study_waits_for_room_under_the_tenants_cap_instead_of_failing(backend):
    with backend.session() as session:
        tenants.create_tenant(session=session, tenant_id=TENANT)
    other = backend.submit(make_spec())  # one of the tenant's two active jobs
    study = create(backend, study_spec(max_concurrent=4), max_active_jobs=2)
    assert len(trials(backend, study.study_id)) == 1 and load(backend, study.study_id).status == "queued"
    runner.run_job(other.job_id, worker_id="w/1", settings=backend.settings, db=backend.db)
    with backend.session() as session:  # the reaper's sweep finds the room the finished job left
        made = studies.sweep(session, max_active_jobs=2)
    assert [t.trial_number for t in made] == [1]


def first_grid_point(space: dict[str, Any], value: Any) -> int:
    """A sampler seed whose grid order starts with `value` (the grid sampler shuffles the points by its seed)."""
    return next(seed for seed in range(100) if next_point("grid", space, "minimize", [], seed=seed) == value)


def test_the_pruner_stops_a_trailing_trial_which_keeps_its_checkpoint_and_curve(backend):
    # One good point, then one that cannot learn (lr 1e-7): the median rule stops it after its warm-up epoch.
    space = {"optim.lr": {"grid": [0.01, 1e-7]}}
    raw = study_spec(
        space=space,
        sampler_seed=first_grid_point(space, {"optim.lr": 0.01}),
        seeds=[1],
        max_concurrent=1,
        base={**BASE, "train": {**BASE["train"], "epochs": 6}},
        objective={"metric": "val/loss"},
        pruner={"kind": "median", "warmup_epochs": 1, "min_trials": 1},
    )
    study = create(backend, raw)
    ran = run_queued(backend, study.study_id)
    statuses = {t.params["optim.lr"]: t for t in trials(backend, study.study_id)}
    assert [s for _, s in ran] == ["succeeded", "pruned"]
    pruned = statuses[1e-7]
    assert pruned.status == "pruned" and pruned.stop_reason == "pruned" and pruned.checkpoint_key is not None
    assert backend.stored_file(pruned.checkpoint_key).is_file()
    [event] = backend.events(pruned.job_id, "pruned")
    assert event.data["rule"] == "median" and event.data["metric"] == "val/loss" and event.epoch == 2
    assert event.data["compared"] > event.data["threshold"]  # its best loss above the median of the finished trial
    epochs = [e.epoch for e in backend.events(pruned.job_id, "epoch_end")]
    assert epochs == [1, 2]  # its partial curve stays readable, cut at the decision
    assert backend.statuses(pruned.job_id)[-1] == "pruned"
    done = load(backend, study.study_id)
    assert done.status == "succeeded" and done.best_job_id == statuses[0.01].job_id
    with backend.session(read_only=True) as session:
        _, verdict = studies.study_verdict(session, done)
    rows = {row["value"]: row for row in verdict["parameters"][0]["values"]}
    assert rows[1e-7]["n"] == 0 and rows[1e-7]["n_pruned"] == 1 and rows[1e-7]["verdict"] == "inconclusive"


def test_cancelling_a_study_drops_queued_trials_and_makes_no_more(backend):
    study = create(backend, study_spec(max_concurrent=2))
    with backend.session() as session:
        studies.cancel(session=session, study_id=study.study_id, tenant_id=TENANT)
        again = studies.cancel(session=session, study_id=study.study_id, tenant_id=TENANT)  # idempotent
    assert again.status == "cancelled"
    assert [t.status for t in trials(backend, study.study_id)] == ["cancelled", "cancelled"]
    with backend.session() as session:
        assert studies.sweep(session) == []
    assert load(backend, study.study_id).trials_created == 2
    with backend.session(read_only=True) as session:
        assert [str(t.to_status) for t in studies.list_transitions(session, study.study_id)] == ["queued", "cancelled"]


def test_a_sampled_range_is_judged_by_thirds_of_it(backend):
    raw = study_spec(space={"optim.lr": {"loguniform": [1e-4, 1e-1]}}, sampler="random", n_trials=6, seeds=[1])
    study = create(backend, {**raw, "max_concurrent": 6})
    run_queued(backend, study.study_id)
    with backend.session(read_only=True) as session:
        results, verdict = studies.study_verdict(session, load(backend, study.study_id))
    rows = verdict["parameters"][0]["values"]
    assert {(row["value"]["from"], row["value"]["to"]) for row in rows} <= {(1e-4, 0.001), (0.001, 0.01), (0.01, 0.1)}
    assert sum(row["n"] for row in rows) == len(results) == 6
    for row in rows:  # each trial falls in its third
        inside = [r for r in results if row["value"]["from"] <= r.params["optim.lr"] < row["value"]["to"]]
        assert row["n"] == len(inside)
    assert all(isinstance(r.params["optim.lr"], float) for r in results)  # the trials table keeps exact values
    from core.plots import read_study_plot  # the study's picture groups the trials by the same thirds

    with backend.session(read_only=True) as session:
        plot = read_study_plot(session, load(backend, study.study_id))
    assert sum(len(group.seeds) for group in plot.groups) == 6 and all(" to " in group.label for group in plot.groups)
