"""A study's answer, computed from its trials' numbers: per parameter value the objective's mean, standard deviation
and 95% interval over the trials that finished, and each value's effect against the best value, with the interval
of the difference and whether it excludes zero. Never asserted: a value with one trial has no interval, and says so.

Trials of two values that share a seed (and the values of the other paths) ran on the same split, the same subset
and the same initial draws, so they are compared in pairs: the interval is that of the mean paired difference,
which the seed's luck does not widen. Where fewer than two pairs exist, the two groups are compared as independent
samples (Welch's t)."""

from __future__ import annotations

import json
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


def paired_difference(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The mean of a - b over matched pairs, with its 95% interval (Student's t on the differences)."""
    diffs = [a - b for a, b in pairs]
    summary = summarize(diffs)
    ci = summary["ci95"]
    excludes = None if ci is None else (ci[0] > 0 or ci[1] < 0)
    if ci is not None and summary["sd"] == 0:
        excludes = summary["mean"] != 0
    return {"diff": summary["mean"], "ci95": ci, "excludes_zero": excludes, "method": "paired", "n": len(diffs)}


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) with its 95% interval (Welch's t, unequal variances), and whether it excludes zero."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    n = min(len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "ci95": None, "excludes_zero": None, "method": "welch", "n": n}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci95": [diff, diff], "excludes_zero": diff != 0, "method": "welch", "n": n}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(df) * se
    low, high = diff - half, diff + half
    return {"diff": diff, "ci95": [low, high], "excludes_zero": low > 0 or high < 0, "method": "welch", "n": n}


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
        group = groups.setdefault(value_key(value), {"value": value, "values": [], "statuses": [], "by_pair": {}})
        group["statuses"].append(trial.status)
        if trial.value is not None and math.isfinite(trial.value):
            group["values"].append(trial.value)
            group["by_pair"].setdefault(_pair_key(trial, path), []).append(trial.value)
    rows = []
    for group in groups.values():
        row = {"value": group["value"], **summarize(group["values"])}
        row["n_pruned"] = group["statuses"].count("pruned")
        row["n_failed"] = group["statuses"].count("failed")
        rows.append((row, group))
    scored = [(row, group) for row, group in rows if group["values"]]
    best_row, best = max(scored, key=lambda rg: sign * rg[0]["mean"], default=(None, None))
    for row, group in rows:
        if row is best_row:
            row["effect"], row["verdict"] = None, "best"
        elif not group["values"] or best is None:
            row["effect"], row["verdict"] = None, "inconclusive"
        else:
            row["effect"] = _effect(group, best)
            if row["effect"]["excludes_zero"] is None:
                row["verdict"] = "inconclusive"
            else:
                row["verdict"] = "worse" if row["effect"]["excludes_zero"] else "no clear difference"
    values = [row for row, _ in rows]
    return {
        "path": path,
        "best_value": None if best_row is None else best_row["value"],
        "conclusion": _conclusion(values),
        "values": values,
    }


def _pair_key(trial: TrialResult, path: str) -> str:
    """What a trial shares with its counterpart of another value: its seed and the other paths' values."""
    others = {p: v for p, v in trial.params.items() if p != path}
    return value_key([trial.seed, others])


def _effect(group: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """The group's difference from the best value's: paired over shared seeds when two or more pairs exist."""
    shared = sorted(group["by_pair"].keys() & best["by_pair"].keys())
    if len(shared) >= 2:
        pairs = [(statistics.fmean(group["by_pair"][k]), statistics.fmean(best["by_pair"][k])) for k in shared]
        return paired_difference(pairs)
    return difference(group["values"], best["values"])


def _conclusion(values: list[dict[str, Any]]) -> str:
    """One line for the path, from the words of its values."""
    best = next((row for row in values if row["verdict"] == "best"), None)
    if best is None:
        return "no value has a finished trial yet"
    worse = [json.dumps(row["value"]) for row in values if row["verdict"] == "worse"]
    unclear = [json.dumps(row["value"]) for row in values if row["verdict"] in ("no clear difference", "inconclusive")]
    name = json.dumps(best["value"])
    if worse and not unclear:
        return f"{name} is best: every other value is worse, beyond its interval"
    if worse:
        return f"{name} has the best mean; {', '.join(worse)} worse; {', '.join(unclear)} not told apart from it"
    if unclear:
        return f"no clear winner: {name} has the best mean, but no other value is worse beyond its interval"
    return f"{name} is the only value with finished trials"


def _trial(trial: TrialResult) -> dict[str, Any]:
    return {
        "number": trial.number,
        "job_id": trial.job_id,
        "params": trial.params,
        "seed": trial.seed,
        "value": trial.value,
    }
