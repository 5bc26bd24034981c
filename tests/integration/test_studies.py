"""A study on real worker processes, in both modes: one of its two workers is killed with SIGKILL in the middle of
a trial. No trial is lost, made twice or run twice: the killed trial resumes on another process from its checkpoint,
the next trials are made as trials end, and the study ends with exactly its points x seeds."""

from __future__ import annotations

from collections import Counter

import pytest
import sqlalchemy as sa

from core import studies, tenants
from core.dispatch import dispatch
from core.models import Job, Study
from core.submit import Caps
from tests.factories import TENANT, slow_spec, wait_for
from tests.integration.conftest import Service
from tests.integration.test_reliability import checkpoint_after

pytestmark = pytest.mark.integration


def trials(service: Service, study_id: str) -> list[Job]:
    with service.session(read_only=True) as session:
        return list(session.scalars(sa.select(Job).where(Job.study_id == study_id).order_by(Job.trial_number)))


def load(service: Service, study_id: str) -> Study:
    with service.session(read_only=True) as session:
        return session.get_one(Study, study_id)


def test_a_study_survives_a_worker_killed_mid_trial(service: Service, start_worker):
    raw = {
        "name": "killed",
        "base": slow_spec(epochs=4),
        "space": {"optim.name": {"grid": ["adam", "sgd", "rmsprop"]}},
        "seeds": [1, 2],
        "max_concurrent": 2,
    }
    with service.session() as session:
        tenants.create_tenant(session=session, tenant_id=TENANT)
        spec = studies.parse_study(raw)
        base, advice = studies.check_study(session, TENANT, spec, Caps.from_settings(service.settings), 100)
        session.rollback()
        created = studies.create_study(session=session, tenant_id=TENANT, spec=spec, base=base, advice=advice)
        dispatch(session, created.trials, service.publisher.send_run_job)
    study_id = created.study.study_id
    workers = [start_worker(), start_worker()]
    victim = wait_for(lambda: next((t for t in trials(service, study_id) if checkpoint_after(service, t.job_id)), None),
                      timeout=60, what="a trial with a checkpoint")  # fmt: skip
    pid = service.running_pid(victim.job_id)
    killed = next(w for w in workers if w.proc.pid == pid or _is_child(pid, w.proc.pid))
    killed.kill()
    workers.append(start_worker())
    wait_for(lambda: load(service, study_id).status.is_terminal, timeout=120, what="the study to end")
    done, made = load(service, study_id), trials(service, study_id)
    assert done.status == "succeeded" and done.trials_created == done.trials_planned == 6
    assert [t.trial_number for t in made] == list(range(6))
    assert Counter((t.params["optim.name"], t.trial_seed) for t in made) == Counter(
        {(name, seed): 1 for name in ("adam", "sgd", "rmsprop") for seed in (1, 2)}
    )
    assert {t.status for t in made} == {"succeeded"}
    resumed = next(t for t in made if t.job_id == victim.job_id)
    assert resumed.attempt == 2 and service.statuses(resumed.job_id).count("running") == 2
    assert all(t.attempt == 1 for t in made if t.job_id != victim.job_id)
    with service.session(read_only=True) as session:
        kinds = Counter(e.kind for e in studies.list_events(session, study_id))
    assert kinds["trial_created"] == kinds["trial_ended"] == 6 and kinds["study_ended"] == 1


def _is_child(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == parent
    except OSError:
        return False
