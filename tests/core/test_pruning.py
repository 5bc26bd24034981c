"""Pruning decisions rebuilt from stored trials are the ones Optuna's own pruners take on a study where the same
trials report epoch by epoch: median, ASHA and Hyperband, minimizing and maximizing, trials one after another or
several at once, with NaN, failed trials, and what each decision writes on its trial stored for the next one."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, SuccessiveHalvingPruner
from optuna.trial import TrialState

from core.pruning import Decision, PrunerSpec, TrialRecord, decide
from core.sampling import STUDY_NAME

EPOCHS = 9
NAN = math.nan
FAILS_AFTER = {8: 4}  # trial 8 crashes after reporting epoch 4


@dataclass
class Row:
    """A trial as the database holds it."""

    state: str = "running"
    intermediate: dict[int, float] = field(default_factory=dict)
    value: float | None = None
    system_attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    expected: list[tuple[int, int, bool]]  # (trial, epoch, prune) from Optuna's pruner on a study run directly
    got: list[tuple[int, int, bool]]  # the same from decide() on rebuilt studies
    decisions: list[Decision]
    study: optuna.Study  # the direct one


def make_curves(direction: str, n_trials: int = 14, seed: int = 0) -> list[list[float]]:
    """Noisy power-law losses (or accuracies falling from 1 by as much), one trial with a NaN epoch and one that
    diverged from the start."""
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_trials):
        scale, rate = rng.uniform(0.5, 2.0), rng.uniform(0.2, 1.5)
        loss = [scale * epoch**-rate + rng.normal(0, 0.02) for epoch in range(1, EPOCHS + 1)]
        curves.append(loss if direction == "minimize" else [1 - v / 3 for v in loss])
    curves[3][1] = NAN
    curves[5] = [NAN] * EPOCHS
    return curves


def run(
    spec: PrunerSpec,
    optuna_pruner: BasePruner,
    direction: str,
    curves: list[list[float]],
    *,
    concurrency: int = 1,
    fails_after: dict[int, int] | None = None,
    persist: bool = True,
    absent: frozenset[int] = frozenset(),
) -> Run:
    """Trials start in number order, `concurrency` at a time, and report one epoch each in a random order. Each
    report goes to a direct Optuna study (trial.report, then should_prune) and to decide() on rows like the
    database's; the direct decision drives both (a pruned trial stops, a trial that reported its last epoch
    completes). `persist`: store Decision.system_attrs in the row, as the caller does. `absent`: trial numbers that
    fail at once in the direct study and have no row."""
    fails_after = fails_after or {}
    study = optuna.create_study(
        study_name=STUDY_NAME, direction=direction, pruner=optuna_pruner, sampler=optuna.samplers.RandomSampler(0)
    )
    handles = [study.ask() for _ in curves]
    for n in absent:
        study.tell(handles[n], state=TrialState.FAIL)
    rows = {n: Row() for n in range(len(curves)) if n not in absent}
    order = random.Random(7)
    waiting, active = list(rows), []
    result = Run([], [], [], study)
    while waiting or active:
        while waiting and len(active) < concurrency:
            active.append(waiting.pop(0))
        n = order.choice(active)
        epoch = len(rows[n].intermediate) + 1
        value = curves[n][epoch - 1]
        handles[n].report(value, epoch)
        pruned = handles[n].should_prune()
        rows[n].intermediate[epoch] = value
        records = [
            TrialRecord(i, r.state, dict(r.intermediate), r.value, dict(r.system_attrs)) for i, r in rows.items()
        ]
        decision = decide(spec, direction, records, n)
        check_threshold(decision, direction)
        if persist:
            rows[n].system_attrs = decision.system_attrs
        result.expected.append((n, epoch, pruned))
        result.got.append((n, epoch, decision.prune))
        result.decisions.append(decision)
        if persist:
            assert decision.system_attrs == study.trials[n].system_attrs, (n, epoch)
        if pruned:
            study.tell(handles[n], state=TrialState.PRUNED)
            rows[n].state = "pruned"
        elif fails_after.get(n) == epoch:
            study.tell(handles[n], state=TrialState.FAIL)
            rows[n].state = "failed"
        elif epoch == len(curves[n]):
            study.tell(handles[n], value)  # a NaN objective fails the trial there; decide() does the same
            rows[n].state, rows[n].value = "complete", value
        if rows[n].state != "running":
            active.remove(n)
    return result


def worse(value: float, threshold: float, direction: str) -> bool:
    return value > threshold if direction == "minimize" else value < threshold


def check_threshold(decision: Decision, direction: str) -> None:
    """The threshold a message will show agrees with the decision it explains."""
    if decision.threshold is None:
        return
    if math.isnan(decision.compared):
        assert decision.prune
    else:
        assert decision.prune == worse(decision.compared, decision.threshold, direction), decision


PRUNERS: dict[str, tuple[PrunerSpec, Callable[[], BasePruner]]] = {
    "median": (PrunerSpec("median"), lambda: MedianPruner(n_startup_trials=1, n_warmup_steps=1, n_min_trials=1)),
    "median-warmup": (
        PrunerSpec("median", warmup_epochs=2, min_trials=3),
        lambda: MedianPruner(n_startup_trials=3, n_warmup_steps=3, n_min_trials=3),
    ),
    "asha": (PrunerSpec("asha"), lambda: SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)),
    "asha-2-2": (
        PrunerSpec("asha", min_resource=2, reduction_factor=2),
        lambda: SuccessiveHalvingPruner(min_resource=2, reduction_factor=2),
    ),
    "hyperband": (
        PrunerSpec("hyperband", max_resource=EPOCHS),
        lambda: HyperbandPruner(min_resource=1, max_resource=EPOCHS, reduction_factor=3),
    ),
    "hyperband-auto": (PrunerSpec("hyperband"), lambda: HyperbandPruner(min_resource=1, reduction_factor=3)),
}


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("name", list(PRUNERS))
def test_decisions_are_optunas_at_every_epoch_of_every_trial(name: str, direction: str, concurrency: int):
    spec, optuna_pruner = PRUNERS[name]
    result = run(
        spec, optuna_pruner(), direction, make_curves(direction), concurrency=concurrency, fails_after=FAILS_AFTER
    )
    assert result.got == result.expected
    prunes = [pruned for _, _, pruned in result.expected]
    assert any(prunes) and not all(prunes)  # both answers were put to the test
    assert {d.rule for d in result.decisions} == {spec.kind}


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_hyperband_trials_fall_into_several_brackets_and_rungs_are_compared_within_one(direction: str):
    spec, optuna_pruner = PRUNERS["hyperband"]
    result = run(spec, optuna_pruner(), direction, make_curves(direction, n_trials=20), concurrency=3)
    assert result.got == result.expected
    pruner = result.study.pruner
    assert isinstance(pruner, HyperbandPruner)
    assert len({pruner._get_bracket_id(result.study, t) for t in result.study.trials}) == 3
    assert any(d.threshold is not None for d in result.decisions)


def test_without_the_stored_rungs_asha_decides_otherwise():
    spec, optuna_pruner = PRUNERS["asha"]
    curves = make_curves("minimize")
    honest = run(spec, optuna_pruner(), "minimize", curves, concurrency=2)
    forgetful = run(spec, optuna_pruner(), "minimize", curves, concurrency=2, persist=False)
    assert honest.got == honest.expected
    assert forgetful.got != forgetful.expected


def test_a_steep_loss_is_pruned_when_it_trails_the_median_at_the_same_epoch():
    """Losses c / epoch**3 fall eightfold from epoch 1 to 2. Optuna holds a trial's best loss so far (for a falling
    loss, its latest) against the median of the completed trials' losses at the same epoch, never against their
    final losses, which a young trial could not reach: so the rule fires, at the first epoch allowed, on a trial
    whose c is above the median c, and spares one at the median (the first three run best last: none is pruned).
    The other face: the median curve one epoch late is 8 times worse at epoch 2 and is pruned there, though it
    would end as low."""
    steep = [[c / epoch**3 for epoch in range(1, 7)] for c in (3.0, 2.0, 1.0)]
    equal, above = steep[1], [2.2 / epoch**3 for epoch in range(1, 7)]
    late = [2.0 / max(epoch - 1, 1) ** 3 for epoch in range(1, 7)]  # the median curve, one epoch late
    curves = [*steep, equal, above, late]
    result = run(PrunerSpec("median"), MedianPruner(1, 1, n_min_trials=1), "minimize", curves)
    assert result.got == result.expected
    decided = {(n, epoch): pruned for n, epoch, pruned in result.expected}
    assert [decided[(3, epoch)] for epoch in range(1, 7)] == [False] * 6  # as good as the median: never pruned
    assert decided[(4, 1)] and (4, 2) not in decided  # 10% above the median: pruned at once
    assert not decided[(5, 1)] and decided[(5, 2)]  # one epoch late: pruned at epoch 2
    last = result.decisions[-1]
    assert (last.step, last.value, last.threshold) == (2, 2.0, 0.25)


def test_warmup_epochs_are_never_pruned_and_the_first_decision_follows_them():
    curves = [[1.0] * 4, [1.0] * 4, [1.0] * 4, [9.0] * 4]  # the last trial is far worse from its first epoch
    result = run(PrunerSpec("median", warmup_epochs=2), MedianPruner(1, 3, n_min_trials=1), "minimize", curves)
    assert result.got == result.expected
    assert [(e, p) for n, e, p in result.got if n == 3] == [(1, False), (2, False), (3, True)]
    assert [d.threshold for d in result.decisions[-3:]] == [None, None, 1.0]


def test_median_needs_min_trials_completed_and_ignores_running_ones():
    curves = [[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]]
    spec = PrunerSpec("median", min_trials=2)
    alone = [TrialRecord(0, "complete", {1: 1.0, 2: 1.0}, 1.0, {}), TrialRecord(2, "running", {1: 5.0}, None, {})]
    assert not decide(spec, "minimize", alone, 2).prune
    running_peer = [*alone, TrialRecord(1, "running", {1: 1.0, 2: 1.0}, None, {})]
    assert not decide(spec, "minimize", running_peer, 2).prune
    completed_peer = [*alone, TrialRecord(1, "complete", {1: 1.0, 2: 1.0}, 1.0, {})]
    assert decide(spec, "minimize", completed_peer, 2).prune
    result = run(spec, MedianPruner(2, 1, n_min_trials=2), "minimize", curves)
    assert result.got == result.expected == [(0, 1, False), (0, 2, False), (1, 1, False), (1, 2, False), (2, 1, True)]


def test_nan_epochs():
    done = [TrialRecord(n, "complete", {1: 1.0, 2: 1.0}, 1.0, {}) for n in range(2)]
    all_nan = decide(PrunerSpec("median"), "minimize", [*done, TrialRecord(2, "running", {1: NAN}, None, {})], 2)
    assert all_nan.prune and math.isnan(all_nan.value) and all_nan.threshold == 1.0
    one_nan = decide(
        PrunerSpec("median"), "minimize", [*done, TrialRecord(2, "running", {1: 0.5, 2: NAN}, None, {})], 2
    )
    assert not one_nan.prune and one_nan.compared == 0.5  # its best so far skips the NaN
    # Too few completed trials: no decision at all, not even on NaN (Optuna's n_startup_trials).
    spec = PrunerSpec("median", min_trials=3)
    assert not decide(spec, "minimize", [*done, TrialRecord(2, "running", {1: NAN}, None, {})], 2).prune
    at_rung = decide(PrunerSpec("asha"), "minimize", [TrialRecord(0, "running", {1: NAN}, None, {})], 0)
    assert at_rung.prune and at_rung.system_attrs == {}


def test_a_completed_trial_without_a_value_counts_as_failed():
    """As in Optuna, where an objective that returns NaN fails its trial: it is not a completed peer."""
    records = [
        TrialRecord(0, "complete", {1: 1.0}, None, {}),
        TrialRecord(1, "complete", {1: 1.0}, NAN, {}),
        TrialRecord(2, "running", {1: 5.0}, None, {}),
    ]
    assert not decide(PrunerSpec("median"), "minimize", records, 2).prune


def test_gaps_in_trial_numbers_keep_hyperband_brackets():
    """Trials that were never made leave gaps in the numbers; each trial keeps its number in the rebuilt study, so
    it stays in the bracket Optuna gives that number."""
    spec, optuna_pruner = PRUNERS["hyperband"]
    absent = frozenset({1, 2, 6})
    result = run(spec, optuna_pruner(), "minimize", make_curves("minimize", 16), concurrency=3, absent=absent)
    assert result.got == result.expected
    assert not {n for n, _, _ in result.got} & absent


def test_the_current_trial_must_be_running_with_an_epoch():
    done = TrialRecord(0, "complete", {1: 1.0}, 1.0, {})
    for records in ([done], [done, TrialRecord(1, "running", {}, None, {})]):
        with pytest.raises(ValueError, match="running"):
            decide(PrunerSpec("median"), "minimize", records, records[-1].number)
    with pytest.raises(ValueError, match="distinct"):
        decide(PrunerSpec("median"), "minimize", [TrialRecord(0, "running", {1: 1.0}, None, {}), done], 0)
