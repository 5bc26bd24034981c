"""The study spec: a base job spec, a space of values over dotted spec paths, seeds, a sampler, an objective and a
pruner; and the trial specs it makes, each resolved and validated like a job's."""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.spec import Seed, Strict

MAX_PATHS = 16
MAX_VALUES = 64
METRIC = r"^(train|val|test|model)/[a-z][a-z0-9_]{0,40}$"
DEFAULT_SEED_PATHS = ("train.seed", "data.split.seed")
KINDS = {"grid": "grid", "choice": "choice", "uniform": "uniform", "loguniform": "loguniform", "int": "integer"}


class Distribution(Strict):
    """Exactly one of: grid or choice (a list of values, each any JSON value: a number, a string, a whole
    sub-object, null), uniform or loguniform (floats [low, high]), int (integers [low, high], both included)."""

    grid: list[Any] | None = Field(None, min_length=1, max_length=MAX_VALUES, description="every value, in turn")
    choice: list[Any] | None = Field(None, min_length=1, max_length=MAX_VALUES, description="one value per point")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], low > 0")
    integer: tuple[int, int] | None = Field(None, alias="int", description="[low, high], both included")

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in KINDS.values() if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform, int")
        bounds = self.uniform or self.loguniform or self.integer
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError("low must be below high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and len({_canonical(v) for v in values}) != len(values):
            raise ValueError("values must be distinct")
        return self

    @property
    def kind(self) -> str:
        """grid, choice, uniform, loguniform or int."""
        return next(kind for kind, field in KINDS.items() if getattr(self, field) is not None)

    def plain(self) -> dict[str, Any]:
        """The form core.sampling takes: {"grid": [...]}, {"uniform": [low, high]}, ..."""
        return {self.kind: list(getattr(self, KINDS[self.kind]))}

    def probes(self) -> list[Any]:
        """Values that stand for the whole distribution when trial specs are checked before anything runs: every
        listed value, or both bounds (and, for int, the middle)."""
        if self.grid is not None or self.choice is not None:
            return list(self.grid if self.grid is not None else self.choice)  # type: ignore[arg-type]
        if self.integer is not None:
            first, last = self.integer
            return sorted({first, (first + last) // 2, last})
        bounds = self.uniform or self.loguniform
        return list(bounds or ())


class Objective(Strict):
    metric: str = Field("val/acc", pattern=METRIC, description="a metric the trials report: val/acc, val/loss, ...")
    mode: Literal["max", "min"] | None = Field(None, description="default: min for a loss, max otherwise")
    take: Literal["best", "final"] = Field("best", description="the trial's best epoch, or its last")

    @model_validator(mode="after")
    def _mode(self) -> Objective:
        if self.mode is None:
            self.mode = "min" if self.metric.endswith("loss") else "max"
        return self

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.mode == "max" else "minimize"


class Pruner(Strict):
    kind: Literal["none", "median", "asha", "hyperband"] = Field("none", description="the rule that stops trials")
    warmup_epochs: int = Field(1, ge=0, le=10000, description="median: epochs before a trial may be pruned")
    min_trials: int = Field(3, ge=1, le=1000, description="median: finished trials needed before pruning")
    min_resource: int = Field(1, ge=1, le=10000, description="asha, hyperband: epochs of the first rung")
    reduction_factor: int = Field(3, ge=2, le=10, description="asha, hyperband: 1 in this many trials go on")


class StudySpec(Strict):
    """A comparison of trials: every point of `space` runs once per seed, from `base` with the point's values."""

    name: str = Field("study", min_length=1, max_length=120, description="a label for people")
    base: dict[str, Any] = Field(description="a job spec, as for POST /v1/jobs")
    space: dict[str, Distribution] = Field(
        min_length=1, max_length=MAX_PATHS, description="dotted spec path -> distribution"
    )
    seeds: list[Seed] = Field([0], min_length=1, max_length=32, description="each point runs once per seed")
    seed_paths: list[str] = Field(
        list(DEFAULT_SEED_PATHS), max_length=8, description="the spec paths each seed is written to"
    )
    sampler: Literal["grid", "random", "tpe"] = Field("grid", description="how points are chosen")
    n_trials: int | None = Field(None, ge=1, le=10000, description="random, tpe: points to sample")
    sampler_seed: Seed = Field(0, description="seed of the sampler")
    objective: Objective = Field(default_factory=Objective)
    pruner: Pruner = Field(default_factory=Pruner)
    max_concurrent: int = Field(2, ge=1, le=256, description="most trials queued or running at once")

    @field_validator("space")
    @classmethod
    def _paths(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for path in space:
            if not path or any(not part.isidentifier() for part in path.split(".")):
                raise ValueError(f"{path!r}: a path is dotted field names, like optim.name")
        return space

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    @model_validator(mode="after")
    def _sampler(self) -> StudySpec:
        if self.sampler == "grid":
            others = [path for path, d in self.space.items() if d.kind != "grid"]
            if others:
                raise ValueError(f"the grid sampler needs grid values; {others[0]} is {self.space[others[0]].kind}")
            if self.n_trials is not None:
                raise ValueError("n_trials is for the random and tpe samplers; a grid runs every point")
        elif self.n_trials is None:
            raise ValueError(f"the {self.sampler} sampler needs n_trials")
        overlap = set(self.seed_paths) & set(self.space)
        if overlap:
            raise ValueError(f"{sorted(overlap)[0]} is both in the space and a seed path")
        return self

    @property
    def points(self) -> int:
        """How many points of the space the study runs."""
        if self.sampler == "grid":
            return math.prod(len(d.grid or ()) for d in self.space.values())
        return self.n_trials or 0

    @property
    def trials(self) -> int:
        return self.points * len(self.seeds)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every point of a grid, in order (the last path varies fastest)."""
        paths = list(self.space)
        return [
            dict(zip(paths, values, strict=True))
            for values in itertools.product(*(self.space[p].grid or () for p in paths))
        ]


@dataclass(frozen=True)
class TrialProblem:
    """Why a trial spec is not valid: the space path (or seed path, or base) it comes from, its value, the reason."""

    path: str
    value: Any
    message: str


def trial_spec(base: dict[str, Any], params: dict[str, Any], seed: int, seed_paths: list[str]) -> dict[str, Any]:
    """The job spec of one trial: `base` (a resolved job spec) with each path set to its value and the seed written
    to each seed path. Missing objects on the way are created: a base without `data.augment.crop` takes one."""
    spec = copy.deepcopy(base)
    for path, value in [*params.items(), *((p, seed) for p in seed_paths)]:
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return spec


def probe_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Points that exercise every value the study may use, for checking before anything is stored: the whole grid
    (it is bounded by the trials limit), or, for sampled spaces, each probe value of each path with the others at
    their first probe."""
    if spec.sampler == "grid":
        return spec.grid_points()
    firsts = {path: d.probes()[0] for path, d in spec.space.items()}
    points = [dict(firsts)]
    for path, distribution in spec.space.items():
        points += [{**firsts, path: value} for value in distribution.probes()[1:]]
    return points


def blame(problem_path: str, params: dict[str, Any], seed_paths: list[str]) -> str:
    """The study path a problem of a trial spec comes from: the space path it is under, a seed path, or the base."""
    for path in sorted(params, key=len, reverse=True):
        if problem_path == path or problem_path.startswith(f"{path}.") or path.startswith(f"{problem_path}."):
            return f"space.{path}"
    if problem_path in seed_paths:
        return "seed_paths"
    return f"base.{problem_path}"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def value_key(value: Any) -> str:
    """A stable text form of a parameter value (objects included), to group trials by value."""
    return _canonical(value)
