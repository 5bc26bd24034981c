"""A study's next point of the space, chosen by Optuna's samplers on an in-memory study rebuilt from the points
already sampled (the database holds them; nothing outlives a call). Pure: no database, no I/O."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState, create_trial

Distribution = dict[
    str, Any
]  # {"grid": [...]}, {"choice": [...]}, {"uniform": [lo, hi]}, {"loguniform": ...}, {"int": ...}
Space = dict[str, Distribution]  # dotted spec path -> distribution

# Hyperband assigns brackets by hashing the study's name with the trial number: one fixed name makes every rebuild
# of a study agree with the last.
STUDY_NAME = "trickserve"
STATES = {
    "running": TrialState.RUNNING,
    "complete": TrialState.COMPLETE,
    "pruned": TrialState.PRUNED,
    "failed": TrialState.FAIL,
}
LISTED = ("grid", "choice")  # kinds that list their values; Optuna sees each value as its index in the list

# Every call builds a study and adds each stored trial to it; Optuna would log each of these at INFO.
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class PointRecord:
    """One sampled point of the space, as stored (a study runs each point once per seed)."""

    number: int  # 0, 1, 2, ... in the order the points were sampled
    params: dict[str, Any]  # path -> value (for grid and choice the value itself, which may be an object)
    state: str  # running | complete | pruned | failed
    value: float | None  # the objective (mean over the point's finished seeds) when complete
    intermediate: dict[int, float] = field(default_factory=dict)  # epoch -> objective: TPE ranks pruned points by it


def grid_size(space: Space) -> int | None:
    """The number of points of the grid when every distribution is a grid, else None."""
    kinds = [kind_of(d) for d in space.values()]
    if any(kind != "grid" for kind in kinds):
        return None
    return math.prod(len(d["grid"]) for d in space.values())


def next_point(
    sampler: str,
    space: Space,
    direction: str,
    points: list[PointRecord],
    *,
    seed: int,
    n_startup_trials: int = 10,
) -> dict[str, Any] | None:
    """The params of the next point (path -> value) that Optuna's `sampler` (grid, random or tpe) asks for after
    `points`, or None when a grid has no point left. The same arguments give the same answer."""
    paths = sorted(space)  # a JSONB column does not keep the order of an object's keys
    distributions = {path: to_optuna(path, space[path]) for path in paths}
    if sampler == "grid" and grid_size(space) is None:
        raise ValueError("the grid sampler needs a grid for every path")
    number = max((p.number for p in points), default=-1) + 1
    study = optuna.create_study(
        study_name=STUDY_NAME,
        direction=direction,  # type: ignore[arg-type]
        sampler=make_sampler(sampler, space, seed, number, n_startup_trials),
        pruner=optuna.pruners.NopPruner(),
    )
    add_in_order(study, [(p.number, as_trial(p, space, distributions, study.sampler)) for p in points])
    taken = {grid_point(p.params, space) for p in points} if sampler == "grid" else set()
    if sampler == "grid" and len(taken) == grid_size(space):
        return None
    trial = study.ask(distributions)
    params = {path: from_optuna(space[path], trial.params[path]) for path in paths}
    if grid_point(params, space) in taken:
        # Optuna gives trial n the grid's n-th point: the points were not all sampled from this grid and seed.
        raise ValueError(f"the grid sampler repeats point {params}: were the space or the seed changed?")
    return params


def make_sampler(sampler: str, space: Space, seed: int, number: int, n_startup_trials: int) -> BaseSampler:
    if sampler == "grid":  # the seed shuffles the grid, so it must be the same for every point
        return GridSampler(grid_indices(space), seed=seed_32(seed))
    # A random draw depends only on the generator's state, so a generator seeded alike for every point would give
    # every point the same values: mix the point's number into the seed.
    if sampler == "random":
        return RandomSampler(seed=seed_32(seed, number))
    if sampler == "tpe":
        return TPESampler(seed=seed_32(seed, number), n_startup_trials=n_startup_trials)
    raise ValueError(f"unknown sampler {sampler!r}: grid, random or tpe")


def seed_32(*entropy: int) -> int:
    """A 32-bit seed (what numpy's RandomState takes, under Optuna's samplers) from any non-negative ints."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def kind_of(distribution: Distribution) -> str:
    kinds = list(distribution)
    if len(kinds) != 1 or kinds[0] not in (*LISTED, "uniform", "loguniform", "int"):
        raise ValueError(f"a distribution is one of grid, choice, uniform, loguniform, int; got {distribution}")
    return kinds[0]


def to_optuna(path: str, distribution: Distribution) -> BaseDistribution:
    kind = kind_of(distribution)
    if kind in LISTED:
        values = distribution[kind]
        if not values or len({canonical(v) for v in values}) != len(values):
            raise ValueError(f"{path}: the values of a {kind} must be distinct, and at least one")
        # Indices, not the values: Optuna takes only scalars, and finds a value by ==, for which 1 == 1.0 == True.
        return CategoricalDistribution(tuple(range(len(values))))
    low, high = distribution[kind]
    if kind == "int":
        return IntDistribution(int(low), int(high))
    return FloatDistribution(float(low), float(high), log=kind == "loguniform")


def to_internal(path: str, distribution: Distribution, value: Any) -> Any:
    """A stored point's value as Optuna holds it: its index for a listed value."""
    kind = kind_of(distribution)
    if kind in LISTED:
        keys = [canonical(v) for v in distribution[kind]]
        if canonical(value) not in keys:
            raise ValueError(f"{path}: {value!r} is not one of the space's values")
        return keys.index(canonical(value))
    return int(value) if kind == "int" else float(value)


def from_optuna(distribution: Distribution, value: Any) -> Any:
    kind = kind_of(distribution)
    if kind in LISTED:
        return copy.deepcopy(distribution[kind][value])
    return int(value) if kind == "int" else float(value)


def canonical(value: Any) -> str:
    """A value's JSON text, keys sorted: tells 1, 1.0 and true apart, and compares objects by content."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def grid_indices(space: Space) -> dict[str, list[int]]:
    """The grid as the grid sampler sees it: each path's value indices (paths sorted, as the sampler keeps them)."""
    return {path: list(range(len(space[path][kind_of(space[path])]))) for path in sorted(space)}


def grid_point(params: dict[str, Any], space: Space) -> tuple[str, ...]:
    return tuple(canonical(params.get(path)) for path in sorted(space))


def trial_state(state: str, value: float | None) -> TrialState:
    """Optuna's state for a stored one. A complete trial without a value (or with NaN) is a failed one, as in Optuna,
    where an objective that returns NaN fails its trial."""
    if state not in STATES:
        raise ValueError(f"unknown trial state {state!r}: {', '.join(STATES)}")
    if state == "complete" and (value is None or math.isnan(value)):
        return TrialState.FAIL
    return STATES[state]


def as_trial(
    point: PointRecord, space: Space, distributions: dict[str, BaseDistribution], sampler: BaseSampler
) -> FrozenTrial:
    if set(point.params) != set(space):
        raise ValueError(f"point {point.number} has params {sorted(point.params)}, the space {sorted(space)}")
    params = {path: to_internal(path, space[path], v) for path, v in point.params.items()}
    state = trial_state(point.state, point.value)
    system_attrs = {}
    if isinstance(sampler, GridSampler):
        # What the grid sampler wrote on the trial when it chose the point: which grid, and which point of it.
        indices = tuple(params[path] for path in sorted(space))
        system_attrs = {"search_space": grid_indices(space), "grid_id": sampler._all_grids.index(indices)}
    return create_trial(
        state=state,
        value=point.value if state == TrialState.COMPLETE else None,
        params=params,
        distributions=distributions,
        system_attrs=system_attrs,
        intermediate_values={int(step): float(v) for step, v in point.intermediate.items()},
    )


def add_in_order(study: optuna.Study, numbered: list[tuple[int, FrozenTrial]]) -> None:
    """Add the trials to `study` under their own numbers. Optuna numbers trials 0, 1, 2, ... as they are added, and
    the grid sampler and Hyperband read the number: a missing number gets a failed trial with no params, values or
    attrs, which no sampler or pruner looks at."""
    trials = dict(numbered)
    if len(trials) != len(numbered) or any(number < 0 for number in trials):
        raise ValueError(f"trial numbers must be distinct and from 0: {sorted(n for n, _ in numbered)}")
    for number in range(max(trials, default=-1) + 1):
        study.add_trial(trials[number] if number in trials else create_trial(state=TrialState.FAIL))
