"""The claims' verdict rule on fixed numbers: supported, refuted, no difference and too thin comparisons, settings,
and the four outcomes."""

from __future__ import annotations

from typing import Any

from core.claims import RULE, Claim, judge
from core.verdict import TrialResult


def trials(rows: list[tuple[dict[str, Any], list[float]]]) -> list[TrialResult]:
    out = []
    for params, values in rows:
        for seed, value in enumerate(values):
            out.append(TrialResult(len(out), f"job_{len(out)}", params, seed, "succeeded", value, 5))
    return out


OPTIMIZERS = Claim("optimizers", "Adaptive methods converge faster.", "optim.name", ["adam"], ["sgd"])


def test_a_claim_holds_when_every_comparison_lies_above_zero():
    results = trials([({"optim.name": "adam"}, [0.95, 0.96, 0.97]), ({"optim.name": "sgd"}, [0.85, 0.87, 0.86])])
    verdict = judge(OPTIMIZERS, results, "max")
    [comparison] = verdict.settings[0].comparisons
    assert verdict.outcome == "holds" and comparison.result == "supports" and comparison.method == "paired"
    assert abs(comparison.diff - 0.1) < 1e-9 and comparison.ci95[0] > 0


def test_a_claim_does_not_hold_when_the_baseline_is_better_or_no_difference_shows():
    worse = trials([({"optim.name": "adam"}, [0.80, 0.82, 0.81]), ({"optim.name": "sgd"}, [0.90, 0.91, 0.92])])
    assert judge(OPTIMIZERS, worse, "max").settings[0].comparisons[0].result == "refutes"
    assert judge(OPTIMIZERS, worse, "max").outcome == "does not hold"
    same = trials([({"optim.name": "adam"}, [0.90, 0.85, 0.93]), ({"optim.name": "sgd"}, [0.91, 0.86, 0.90])])
    assert judge(OPTIMIZERS, same, "max").settings[0].comparisons[0].result == "no difference"
    assert judge(OPTIMIZERS, same, "max").outcome == "does not hold"


def test_a_loss_objective_counts_lower_as_better_for_the_trick():
    losses = trials([({"optim.name": "adam"}, [0.20, 0.21, 0.22]), ({"optim.name": "sgd"}, [0.40, 0.42, 0.41])])
    verdict = judge(OPTIMIZERS, losses, "min")
    assert verdict.outcome == "holds" and verdict.settings[0].comparisons[0].diff > 0


def test_a_claim_that_holds_in_some_settings_only_holds_under_conditions():
    claim = Claim("augment", "Augmentation helps when data is scarce.", "data.augment", [{"flip": {}}], [None],
                  setting="data.max_per_class")  # fmt: skip
    rows = [
        ({"data.augment": {"flip": {}}, "data.max_per_class": 5}, [0.70, 0.72, 0.71]),
        ({"data.augment": None, "data.max_per_class": 5}, [0.60, 0.61, 0.62]),
        ({"data.augment": {"flip": {}}, "data.max_per_class": 500}, [0.97, 0.96, 0.98]),
        ({"data.augment": None, "data.max_per_class": 500}, [0.97, 0.97, 0.96]),
    ]
    verdict = judge(claim, trials(rows), "max")
    assert [(s.value, s.outcome) for s in verdict.settings] == [(5, "holds"), (500, "fails")]
    assert verdict.outcome == "holds under conditions"


def test_a_trick_per_setting_is_compared_with_every_other_value_of_that_setting():
    claim = Claim("transfer", "Freeze more on less data.", "transfer.freeze", [], [], setting="data.max_per_class",
                  trick_by_setting={"5": ["large"], "500": ["none"]})  # fmt: skip
    rows = [
        ({"transfer.freeze": "large", "data.max_per_class": 5}, [0.80, 0.81, 0.82]),
        ({"transfer.freeze": "none", "data.max_per_class": 5}, [0.70, 0.72, 0.71]),
        ({"transfer.freeze": "large", "data.max_per_class": 500}, [0.90, 0.91, 0.90]),
        ({"transfer.freeze": "none", "data.max_per_class": 500}, [0.97, 0.98, 0.97]),
    ]
    verdict = judge(claim, trials(rows), "max")
    assert [(c.trick, c.baseline) for s in verdict.settings for c in s.comparisons] == [("large", "none"),
                                                                                       ("none", "large")]  # fmt: skip
    assert verdict.outcome == "holds"


def test_too_few_trials_are_inconclusive_and_the_rule_is_printed_as_applied():
    thin = trials([({"optim.name": "adam"}, [0.95]), ({"optim.name": "sgd"}, [0.85])])
    verdict = judge(OPTIMIZERS, thin, "max")
    assert verdict.settings[0].comparisons[0].result == "too thin" and verdict.outcome == "inconclusive"
    assert "holds under conditions" in RULE and "95% interval" in RULE


def test_settings_keys_may_be_json_or_bare_strings_and_numbers_come_in_order():
    claim = Claim("init", "Xavier for tanh, He for ReLU.", "model.init", [], [], setting="model.activation",
                  trick_by_setting={"tanh": ["xavier"], '"relu"': ["he"]})  # fmt: skip
    curves = (("he", [0.9, 0.91, 0.92]), ("xavier", [0.8, 0.81, 0.8]))
    rows = [({"model.init": i, "model.activation": act}, values) for act in ("relu", "tanh") for i, values in curves]
    verdict = judge(claim, trials(rows), "max")
    found = [(s.value, [c.trick for c in s.comparisons]) for s in verdict.settings]
    assert found == [("relu", ["he"]), ("tanh", ["xavier"])]
    numbers = Claim("aug", "Augment scarce data.", "a", [True], [False], setting="n")
    rows = [({"a": a, "n": n}, [0.5, 0.6, 0.7]) for n in (100, 3) for a in (True, False)]
    assert [s.value for s in judge(numbers, trials(rows), "max").settings] == [3, 100]
