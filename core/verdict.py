"""A study's answer, computed from its trials' numbers: per parameter value the objective's mean, standard deviation
and 95% interval over the trials that finished, and each value's effect against the best value, with the interval
of the difference (Welch) and whether it excludes zero. Never asserted: a value with one trial has no interval, and
says so."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.studyspec import value_key

CONFIDENCE = 0.95


@dataclass(frozen=True)
class TrialResult:
    """One trial as the verdict needs it: its parameter values, how it ended, its objective (None when it has
    none: failed, cancelled, pruned, or still running) and the epochs it used."""

    number: int
    job_id: str
    params: dict[str, Any]
    seed: int | None
    status: str
    value: float | None
    epochs: int


def t_quantile(df: float) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t  # imported when a verdict is computed, not when the API starts

    return float(t.ppf(0.5 + CONFIDENCE / 2, df))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, standard deviation and the 95% interval of the mean (Student's t); no interval below two values."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(values)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) with its 95% interval (Welch's t, unequal variances), and whether it excludes zero."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "ci95": None, "excludes_zero": None}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci95": [diff, diff], "excludes_zero": diff != 0}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(df) * se
    low, high = diff - half, diff + half
    return {"diff": diff, "ci95": [low, high], "excludes_zero": low > 0 or high < 0}


def verdict(trials: Sequence[TrialResult], paths: Sequence[str], mode: str) -> dict[str, Any]:
    """The best trial and, for every path of the space, each value's summary and its effect against the best value
    (the one with the best mean), with a word for it: `best`, `worse` (the interval of the difference excludes
    zero), `no clear difference` (it includes zero) or `inconclusive` (too few finished trials for an interval)."""
    sign = 1 if mode == "max" else -1
    finished = [t for t in trials if t.value is not None and math.isfinite(t.value)]
    best = max(finished, key=lambda t: (sign * t.value, -t.number), default=None)  # type: ignore[operator]
    return {
        "mode": mode,
        "best_trial": None if best is None else _trial(best),
        "parameters": [_parameter(path, trials, sign) for path in paths],
    }


def _parameter(path: str, trials: Sequence[TrialResult], sign: int) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for trial in trials:
        value = trial.params.get(path)
        group = groups.setdefault(value_key(value), {"value": value, "values": [], "statuses": []})
        group["statuses"].append(trial.status)
        if trial.value is not None and math.isfinite(trial.value):
            group["values"].append(trial.value)
    rows = []
    for group in groups.values():
        row = {"value": group["value"], **summarize(group["values"])}
        row["n_pruned"] = group["statuses"].count("pruned")
        row["n_failed"] = group["statuses"].count("failed")
        rows.append((row, group["values"]))
    scored = [(row, values) for row, values in rows if values]
    best_row, best_values = max(scored, key=lambda rv: sign * rv[0]["mean"], default=(None, []))
    out = []
    for row, values in rows:
        if row is best_row:
            row["effect"], row["verdict"] = None, "best"
        elif not values:
            row["effect"], row["verdict"] = None, "inconclusive"
        else:
            effect = difference(values, best_values)
            row["effect"] = effect
            if effect["excludes_zero"] is None:
                row["verdict"] = "inconclusive"
            else:
                row["verdict"] = "worse" if effect["excludes_zero"] else "no clear difference"
        out.append(row)
    return {"path": path, "best_value": None if best_row is None else best_row["value"], "values": out}


def _trial(trial: TrialResult) -> dict[str, Any]:
    return {
        "number": trial.number,
        "job_id": trial.job_id,
        "params": trial.params,
        "seed": trial.seed,
        "value": trial.value,
    }
