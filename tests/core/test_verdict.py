"""The verdict's numbers on fixed inputs: intervals of means (Student's t), of paired differences and of Welch
differences, the words they give, and the line that sums up a path."""

from __future__ import annotations

import pytest

from core.verdict import TrialResult, difference, paired_difference, summarize, verdict

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom


def trials(values: dict[str, list[float]], seeds: list[int] | None = None) -> list[TrialResult]:
    out = []
    for name, numbers in values.items():
        for i, value in enumerate(numbers):
            seed = (seeds or list(range(len(numbers))))[i]
            out.append(TrialResult(len(out), f"job_{len(out)}", {"optim.name": name}, seed, "succeeded", value, 5))
    return out


def test_a_mean_has_a_student_t_interval_and_none_below_two_values():
    s = summarize([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["sd"] == pytest.approx(0.1)
    half = T_975_2 * 0.1 / 3**0.5
    assert s["ci95"] == pytest.approx([0.9 - half, 0.9 + half])
    assert summarize([0.7])["ci95"] is None and summarize([])["mean"] is None


def test_pairs_remove_the_seeds_luck_that_independent_samples_keep():
    # Each seed moves both values alike; one value is always 0.02 better.
    a, b = [0.70, 0.80, 0.90], [0.72, 0.82, 0.92]
    welch = difference(a, b)
    paired = paired_difference(list(zip(a, b, strict=True)))
    assert welch["excludes_zero"] is False and welch["method"] == "welch"
    assert paired["diff"] == pytest.approx(-0.02) and paired["excludes_zero"] is True and paired["n"] == 3


def test_each_value_is_judged_against_the_best_one_over_shared_seeds():
    results = trials({"adam": [0.90, 0.94, 0.92], "sgd": [0.80, 0.85, 0.82], "rmsprop": [0.91, 0.90, 0.95]})
    [path] = verdict(results, ["optim.name"], "max")["parameters"]
    rows = {row["value"]: row for row in path["values"]}
    assert path["best_value"] == "adam" and rows["adam"]["verdict"] == "best"
    assert rows["sgd"]["verdict"] == "worse" and rows["sgd"]["effect"]["method"] == "paired"
    assert rows["sgd"]["effect"]["diff"] == pytest.approx(0.82333 - 0.92, abs=1e-4)
    assert rows["rmsprop"]["verdict"] == "no clear difference"
    assert path["conclusion"] == '"adam" has the best mean; "sgd" worse; "rmsprop" not told apart from it'


def test_without_shared_seeds_the_groups_are_compared_as_independent_samples():
    adam = trials({"adam": [0.90, 0.94, 0.92]}, seeds=[0, 1, 2])
    sgd = trials({"sgd": [0.80, 0.85, 0.82]}, seeds=[10, 11, 12])
    results = adam + [TrialResult(r.number + 3, f"job_{r.number + 3}", r.params, r.seed, r.status, r.value, r.epochs)
                      for r in sgd]  # fmt: skip
    rows = {row["value"]: row for row in verdict(results, ["optim.name"], "max")["parameters"][0]["values"]}
    assert rows["sgd"]["effect"]["method"] == "welch" and rows["sgd"]["verdict"] == "worse"


def test_when_nothing_is_worse_the_path_has_no_clear_winner_and_one_trial_is_inconclusive():
    results = trials({"a": [0.90, 0.80, 0.85], "b": [0.86, 0.84, 0.86], "c": [0.5]})
    [path] = verdict(results, ["optim.name"], "max")["parameters"]
    rows = {row["value"]: row for row in path["values"]}
    assert rows["c"]["verdict"] == "inconclusive" and rows["c"]["ci95"] is None
    assert path["conclusion"].startswith("no clear winner")


def test_a_loss_is_judged_downwards_and_pruned_trials_are_counted_not_averaged():
    results = trials({"a": [0.30, 0.32, 0.31], "b": [0.50, 0.52, 0.51]})
    results.append(TrialResult(99, "job_p", {"optim.name": "b"}, 5, "pruned", None, 2))
    out = verdict(results, ["optim.name"], "min")
    rows = {row["value"]: row for row in out["parameters"][0]["values"]}
    assert out["best_trial"]["value"] == 0.30 and rows["a"]["verdict"] == "best"
    assert rows["b"]["n"] == 3 and rows["b"]["n_pruned"] == 1 and rows["b"]["verdict"] == "worse"
