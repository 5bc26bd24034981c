"""The next point of a study from Optuna's samplers, rebuilt from the points stored so far: a grid enumerates each
point once (object, null and look-alike values intact) and then ends; random and TPE points stay in bounds, differ
from one another, use the completed values, and the same stored points always give the same next one."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from core.sampling import PointRecord, Space, grid_size, next_point

GRID: Space = {
    "optim": {"grid": [{"name": "sgd", "lr": 0.1}, None]},
    "model.width": {"grid": [16, 32, 64]},
}
MIXED: Space = {
    "model.dropout": {"uniform": [0, 0.5]},
    "optim.lr": {"loguniform": [1e-5, 1e-1]},
    "train.batch_size": {"int": [8, 64]},
    "optim.name": {"choice": ["sgd", {"name": "adam", "betas": [0.9, 0.99]}, None]},
    "model.norm": {"grid": [True, False]},
}


def stored(params: dict[str, Any]) -> dict[str, Any]:
    """Params as they come back from a JSON column."""
    return json.loads(json.dumps(params))


def sample(
    sampler: str,
    space: Space,
    n: int,
    *,
    seed: int = 0,
    objective: Any = None,
    direction: str = "minimize",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Up to `n` points, each stored (complete with objective(params), or running) before the next is asked for."""
    points: list[PointRecord] = []
    while len(points) < n:
        params = next_point(sampler, space, direction, points, seed=seed, **kwargs)
        if params is None:
            break
        state, value = ("complete", objective(params)) if objective else ("running", None)
        points.append(PointRecord(len(points), stored(params), state, value))
    return [p.params for p in points]


def key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def test_a_2_by_3_grid_gives_each_point_once_then_none():
    assert grid_size(GRID) == 6
    points = sample("grid", GRID, 100)
    every = [{"optim": o, "model.width": w} for o in GRID["optim"]["grid"] for w in GRID["model.width"]["grid"]]
    assert sorted(map(key, points)) == sorted(map(key, every))
    assert any(p["optim"] is None for p in points) and any(p["optim"] == {"name": "sgd", "lr": 0.1} for p in points)


def test_the_grid_skips_points_already_stored_whatever_their_state():
    first = sample("grid", GRID, 4)
    states = ["complete", "failed", "pruned", "running"]
    points = [
        PointRecord(n, p, s, 1.0 if s == "complete" else None)
        for n, (p, s) in enumerate(zip(first, states, strict=True))
    ]
    rest = []
    while (params := next_point("grid", GRID, "maximize", points, seed=0)) is not None:
        rest.append(params)
        points.append(PointRecord(len(points), params, "running", None))
    assert len(rest) == 2 and not {key(p) for p in rest} & {key(p) for p in first}


def test_values_equal_in_python_stay_apart():
    """1, 1.0 and true are equal to Python (and to Optuna's choices); they are different spec values."""
    space: Space = {"x": {"grid": [1, 1.0, True, "1", None, [1]]}}
    points = sample("grid", space, 100)
    assert sorted(json.dumps(p["x"]) for p in points) == sorted(["1", "1.0", "true", '"1"', "null", "[1]"])


@pytest.mark.parametrize("missing", range(3))
def test_the_grid_finds_its_missing_point_among_look_alikes(missing: int):
    space: Space = {"x": {"grid": [1, 1.0, True]}}
    every = sample("grid", space, 3)
    ran = [p for n, p in enumerate(every) if n != missing]
    points = [PointRecord(0, ran[0], "complete", 1.0), PointRecord(2, ran[1], "complete", 2.0)]  # 1 never stored
    assert json.dumps(next_point("grid", space, "minimize", points, seed=0)) == json.dumps(every[missing])


def test_the_grid_order_depends_on_the_seed_only():
    assert sample("grid", GRID, 6, seed=1) == sample("grid", GRID, 6, seed=1)
    assert sample("grid", GRID, 6, seed=1) != sample("grid", GRID, 6, seed=2)
    reordered = dict(reversed(GRID.items()))  # a JSONB column may give the keys in another order
    assert sample("grid", reordered, 6, seed=1) == sample("grid", GRID, 6, seed=1)


def test_a_large_seed_is_taken():
    assert len(sample("grid", GRID, 6, seed=2**63 - 1)) == 6
    assert len(sample("random", MIXED, 2, seed=2**63 - 1)) == 2


def test_the_grid_sampler_needs_grids_and_refuses_a_foreign_point():
    with pytest.raises(ValueError, match="grid"):
        next_point("grid", {**GRID, "x": {"uniform": [0, 1]}}, "minimize", [], seed=0)
    assert grid_size({**GRID, "x": {"choice": [1, 2]}}) is None
    foreign = PointRecord(0, {"optim": None, "model.width": 128}, "running", None)
    with pytest.raises(ValueError, match="128"):
        next_point("grid", GRID, "minimize", [foreign], seed=0)
    with pytest.raises(ValueError, match="distinct"):
        next_point("grid", {"x": {"grid": [1, 1]}}, "minimize", [], seed=0)


def test_a_grid_sampled_with_another_seed_is_not_repeated_silently():
    """The grid sampler gives trial n the n-th point of its seeded order: points stored under another seed can hold
    that point already."""
    other = sample("grid", GRID, 3, seed=5)
    assert sample("grid", GRID, 4, seed=10)[3] in other
    with pytest.raises(ValueError, match="seed"):
        next_point("grid", GRID, "minimize", [PointRecord(n, p, "running", None) for n, p in enumerate(other)], seed=10)


def test_a_gap_in_the_point_numbers_is_filled_before_the_grid_ends():
    """A point number never stored (its grid point never ran) is the grid's last point to run."""
    every = sample("grid", GRID, 6)
    points = [PointRecord(n, p, "complete", 1.0) for n, p in enumerate(every) if n != 3]
    assert next_point("grid", GRID, "minimize", points, seed=0) == every[3]
    points.append(PointRecord(6, every[3], "running", None))
    assert next_point("grid", GRID, "minimize", points, seed=0) is None


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_points_keep_to_the_space(sampler: str):
    points = sample(sampler, MIXED, 25, objective=lambda p: p["model.dropout"], n_startup_trials=5)
    for p in points:
        assert set(p) == set(MIXED)
        assert isinstance(p["model.dropout"], float) and 0 <= p["model.dropout"] <= 0.5
        assert isinstance(p["optim.lr"], float) and 1e-5 <= p["optim.lr"] <= 1e-1
        assert type(p["train.batch_size"]) is int and 8 <= p["train.batch_size"] <= 64
        assert p["optim.name"] in MIXED["optim.name"]["choice"]
        assert p["model.norm"] in (True, False)
    # Each point is a new draw: a generator seeded alike at every rebuild would repeat the first point.
    assert len({p["model.dropout"] for p in points}) == 25
    assert len({key({"name": p["optim.name"]}) for p in points}) == 3
    # Log-uniform: as many points below the geometric middle (1e-3) as above it, roughly.
    assert 5 <= sum(p["optim.lr"] < 1e-3 for p in points) <= 20


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_the_same_stored_points_give_the_same_next_point(sampler: str):
    points = [PointRecord(n, p, "complete", float(n)) for n, p in enumerate(sample("random", MIXED, 12))]
    first = next_point(sampler, MIXED, "minimize", points, seed=3, n_startup_trials=5)
    assert next_point(sampler, MIXED, "minimize", points, seed=3, n_startup_trials=5) == first
    assert next_point(sampler, MIXED, "minimize", points, seed=4, n_startup_trials=5) != first


def test_tpe_follows_the_completed_values_once_past_its_startup_points():
    """The first n_startup_trials points are random, whatever the values; after them TPE's next point depends on
    which points did well, so it differs between minimizing and maximizing the same values."""
    space: Space = {"x": {"uniform": [0, 1]}, "c": {"choice": ["a", "b", "c"]}}
    points = [PointRecord(n, p, "complete", p["x"]) for n, p in enumerate(sample("random", space, 8, seed=9))]

    def ask(n_points: int, direction: str) -> dict[str, Any] | None:
        return next_point("tpe", space, direction, points[:n_points], seed=1, n_startup_trials=5)

    assert ask(4, "minimize") == ask(4, "maximize")
    minimizing, maximizing = ask(8, "minimize"), ask(8, "maximize")
    assert minimizing is not None and maximizing is not None
    assert minimizing["x"] < 0.5 < maximizing["x"]


def test_tpe_takes_pruned_failed_and_running_points():
    points = [PointRecord(n, p, "complete", p["model.dropout"]) for n, p in enumerate(sample("random", MIXED, 6))]
    more = sample("random", MIXED, 9, seed=1)[6:]
    points += [
        PointRecord(6, more[0], "pruned", None, intermediate={1: 0.9, 2: 0.8}),
        PointRecord(7, more[1], "failed", None),
        PointRecord(8, more[2], "running", None),
        PointRecord(10, more[2], "complete", math.nan),  # a NaN objective: a failed point; 9 was never stored
    ]
    params = next_point("tpe", MIXED, "minimize", points, seed=0, n_startup_trials=5)
    assert params is not None and set(params) == set(MIXED)


def test_points_must_match_the_space():
    with pytest.raises(ValueError, match="params"):
        next_point("random", MIXED, "minimize", [PointRecord(0, {"model.dropout": 0.1}, "running", None)], seed=0)
    outside = stored({**sample("random", MIXED, 1)[0], "model.dropout": 0.9})
    with pytest.raises(ValueError, match="0.9"):
        next_point("random", MIXED, "minimize", [PointRecord(0, outside, "running", None)], seed=0)
    with pytest.raises(ValueError, match="one of"):
        next_point("random", {"x": {"normal": [0, 1]}}, "minimize", [], seed=0)
