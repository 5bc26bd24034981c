"""Whether a study's trial stops after the epoch it just reported, decided by Optuna's pruner on an in-memory study
rebuilt from the stored trials; what the pruner writes on the trial comes back for the caller to store. Pure: no
database, no I/O.

Epochs count from 1 (as in epoch_end events) and are Optuna's steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from core.sampling import STUDY_NAME, add_in_order, trial_state

RUNG_PREFIX = "completed_rung_"  # SuccessiveHalvingPruner's system attr: the trial's value when it reached a rung


@dataclass(frozen=True)
class PrunerSpec:
    """A study's pruner. median: a trial stops when its best value so far is worse than the median of the
    completed trials' values at the same epoch. asha: asynchronous successive halving, rungs at min_resource *
    reduction_factor**k epochs. hyperband: brackets of asha with staggered first rungs."""

    kind: str  # none | median | asha | hyperband
    warmup_epochs: int = 0  # median: epochs never pruned; the first decision is at epoch warmup_epochs + 1
    # median: no decision before this many trials completed and as many of them reported the epoch decided at
    # (Optuna's n_startup_trials and n_min_trials, both)
    min_trials: int = 1
    min_resource: int = 1  # asha, hyperband: epochs of the first rung
    reduction_factor: int = 3  # asha, hyperband: 1 in this many trials goes on to the next rung
    max_resource: int | None = None  # hyperband: a trial's epochs (None: Optuna's "auto", from completed trials)


@dataclass(frozen=True)
class TrialRecord:
    """One trial (job) of a study, as stored."""

    number: int
    state: str  # running | complete | pruned | failed
    intermediate: dict[int, float]  # epoch -> the objective's metric at that epoch (NaN allowed)
    value: float | None  # the final objective when complete
    system_attrs: dict[str, Any]  # what earlier decisions returned for this trial


@dataclass(frozen=True)
class Decision:
    prune: bool
    rule: str  # none | median | asha | hyperband
    step: int  # the epoch decided at: the trial's last
    value: float  # the trial's value at that epoch
    compared: float  # what the rule held against threshold: median, the trial's best so far; asha, value
    threshold: float | None  # the value to beat (the median, the rung's cut-off), for messages; None if none was
    system_attrs: dict[str, Any]  # the trial's system attrs after the decision: the caller stores them


def decide(pruner: PrunerSpec, direction: str, trials: list[TrialRecord], current: int) -> Decision:
    """Optuna's pruning decision for trial `current` (running, among `trials`) at its last reported epoch."""
    mine = next((t for t in trials if t.number == current), None)
    if mine is None or mine.state != "running" or not mine.intermediate:
        raise ValueError(f"trial {current} must be among the trials, running, with an epoch reported")
    study = optuna.create_study(
        study_name=STUDY_NAME,
        direction=direction,  # type: ignore[arg-type]
        pruner=make_pruner(pruner),
        sampler=optuna.samplers.RandomSampler(seed=0),  # unused; saves building the default TPE sampler
    )
    add_in_order(study, [(t.number, as_trial(t)) for t in trials])
    # Trial.should_prune() after trial.report() is exactly this call, on the trial as stored.
    prune = study.pruner.prune(study, study.get_trials(deepcopy=False)[current])
    after = study.get_trials(deepcopy=False)[current]  # SHA has written the rungs it reached
    step = max(after.intermediate_values)
    value = after.intermediate_values[step]
    if isinstance(study.pruner, MedianPruner):
        compared = best_so_far(after, study.direction)
        threshold = median_at(study, pruner, step)
    else:
        compared, threshold = value, rung_cut_off(study, after, mine.system_attrs, pruner.reduction_factor)
    return Decision(prune, pruner.kind, step, value, compared, threshold, dict(after.system_attrs))


def make_pruner(spec: PrunerSpec) -> BasePruner:
    if spec.kind == "none":
        return NopPruner()
    if spec.kind == "median":
        # Optuna's steps count from 0, so n_warmup_steps steps are n_warmup_steps epochs there; ours count from 1.
        return MedianPruner(
            n_startup_trials=spec.min_trials, n_warmup_steps=spec.warmup_epochs + 1, n_min_trials=spec.min_trials
        )
    if spec.kind == "asha":
        return SuccessiveHalvingPruner(min_resource=spec.min_resource, reduction_factor=spec.reduction_factor)
    if spec.kind == "hyperband":
        max_resource = spec.max_resource if spec.max_resource is not None else "auto"
        return HyperbandPruner(spec.min_resource, max_resource, spec.reduction_factor)
    raise ValueError(f"unknown pruner {spec.kind!r}: none, median, asha or hyperband")


def as_trial(record: TrialRecord) -> FrozenTrial:
    state = trial_state(record.state, record.value)
    return create_trial(
        state=state,
        value=record.value if state == TrialState.COMPLETE else None,
        intermediate_values={int(step): float(v) for step, v in record.intermediate.items()},
        system_attrs=dict(record.system_attrs),
    )


def best_so_far(trial: FrozenTrial, direction: StudyDirection) -> float:
    values = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
    if not values:
        return math.nan
    return max(values) if direction == StudyDirection.MAXIMIZE else min(values)


def median_at(study: optuna.Study, spec: PrunerSpec, step: int) -> float | None:
    """The median of the completed trials' values at `step`, when the median rule applies there."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values = [t.intermediate_values[step] for t in completed if step in t.intermediate_values]
    if step <= spec.warmup_epochs or len(completed) < spec.min_trials or len(values) < spec.min_trials:
        return None
    if all(math.isnan(v) for v in values):
        return None
    return float(np.nanpercentile(values, 50))  # as Optuna computes it


def rung_cut_off(
    study: optuna.Study, trial: FrozenTrial, before: dict[str, Any], reduction_factor: int
) -> float | None:
    """The worst value promoted from the highest rung the trial reached in this decision (None if it reached none),
    among the trials that reached that rung (in the trial's bracket, for Hyperband)."""
    reached = [key for key in trial.system_attrs if key.startswith(RUNG_PREFIX) and key not in before]
    if not reached:
        return None
    key = max(reached, key=lambda k: int(k.removeprefix(RUNG_PREFIX)))
    others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number and key in t.system_attrs]
    if isinstance(study.pruner, HyperbandPruner):
        bracket = study.pruner._get_bracket_id(study, trial)
        others = [t for t in others if study.pruner._get_bracket_id(study, t) == bracket]
    competing = sorted([*(t.system_attrs[key] for t in others), trial.system_attrs[key]])
    promoted = max(len(competing) // reduction_factor - 1, 0)  # SuccessiveHalvingPruner's promotion index
    return competing[-(promoted + 1)] if study.direction == StudyDirection.MAXIMIZE else competing[promoted]
