"""The article's claims put to the test: a claim names the study path it is about, the values the article
recommends (`trick`) and those it says do worse (`baseline`), and, where the claim may hold only in some settings,
a second path of the study whose values are the settings. Its verdict is computed from the trials by one rule,
stated here and printed in the report:

In each setting, every trick value is compared with every baseline value over the seeds they share (paired; as
independent samples where fewer than two seeds are shared), on the study's objective, signed so that a positive
difference favours the trick. A comparison *supports* the claim when its 95% interval lies above zero, *refutes* it
when the interval lies below zero, and *finds no difference* otherwise; with fewer than two finished trials on a
side it is *too thin*.
- A setting holds when every comparison supports the claim, fails when any refutes it or all find no difference,
  and is unclear otherwise (some support, some find no difference, or some are too thin).
- The claim `holds` when every setting holds; `holds under conditions` when some settings hold and others do not;
  `does not hold` when no setting holds and at least one fails; `inconclusive` otherwise.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from core.studyspec import value_key
from core.verdict import TrialResult, difference, paired_difference

Outcome = Literal["holds", "holds under conditions", "does not hold", "inconclusive"]
RULE = __doc__.split("stated here and printed in the report:", 1)[1].strip()  # type: ignore[union-attr]


@dataclass(frozen=True)
class Claim:
    """What the article says, as a comparison a study can make."""

    key: str
    article: str  # the article's sentence
    path: str  # the study path the claim is about
    trick: list[Any]  # the values the article recommends
    baseline: list[Any]  # the values it says do worse
    setting: str | None = None  # another path of the study: the claim is judged in each of its values
    # Where the article recommends another value in each setting (transfer learning: freeze more on less data):
    # the setting's value -> its trick values; the baseline is then every other value the setting ran.
    trick_by_setting: dict[str, list[Any]] | None = None
    setting_label: str = ""  # what a setting is, for people ("training examples per class")
    metric_label: str = ""  # what the objective measures, for people

    @classmethod
    def from_dict(cls, key: str, raw: dict[str, Any]) -> Claim:
        return cls(key=key, **raw)


@dataclass
class Comparison:
    trick: Any
    baseline: Any
    diff: float | None  # trick - baseline, signed so that positive favours the trick
    ci95: list[float] | None
    method: str
    n: int
    result: Literal["supports", "refutes", "no difference", "too thin"]
    trick_mean: float | None
    baseline_mean: float | None


@dataclass
class Setting:
    value: Any  # the setting path's value, or None for a claim without settings
    comparisons: list[Comparison] = field(default_factory=list)
    outcome: Literal["holds", "fails", "unclear"] = "unclear"


@dataclass
class ClaimVerdict:
    claim: Claim
    outcome: Outcome
    settings: list[Setting]

    def as_dict(self) -> dict[str, Any]:
        return {
            "claim": self.claim.key,
            "outcome": self.outcome,
            "settings": [
                {"value": s.value, "outcome": s.outcome, "comparisons": [vars(c) for c in s.comparisons]}
                for s in self.settings
            ],
        }


def judge(claim: Claim, trials: Sequence[TrialResult], mode: str) -> ClaimVerdict:
    """The claim's verdict from the study's trials (their objective values), by the rule above."""
    sign = 1 if mode == "max" else -1
    values = [None] if claim.setting is None else _setting_values(trials, claim.setting)
    settings = []
    for value in values:
        members = [
            t for t in trials if claim.setting is None or value_key(t.params.get(claim.setting)) == value_key(value)
        ]
        setting = Setting(value)
        tricks, baselines = _sides(claim, members, value)
        for trick in tricks:
            for baseline in baselines:
                setting.comparisons.append(_compare(claim, members, trick, baseline, sign))
        setting.outcome = _setting_outcome(setting.comparisons)
        settings.append(setting)
    return ClaimVerdict(claim, _outcome([s.outcome for s in settings]), settings)


def _sides(claim: Claim, trials: Sequence[TrialResult], setting: Any) -> tuple[list[Any], list[Any]]:
    if claim.trick_by_setting is None:
        return claim.trick, claim.baseline
    by_key = {value_key(_parsed(k)): v for k, v in claim.trick_by_setting.items()}
    tricks = by_key.get(value_key(setting), [])
    ran = {value_key(t.params.get(claim.path)): t.params.get(claim.path) for t in trials}
    return tricks, [v for k, v in ran.items() if k not in {value_key(t) for t in tricks}]


def _has(trial: TrialResult, path: str, value: Any) -> bool:
    return value_key(trial.params.get(path)) == value_key(value)


def _parsed(key: str) -> Any:
    """A trick_by_setting key: JSON text (`5`, `null`, `"tanh"`) or a bare string (`tanh`)."""
    try:
        return json.loads(key)
    except ValueError:
        return key


def _setting_values(trials: Sequence[TrialResult], path: str) -> list[Any]:
    """The setting's values, numbers in increasing order, others in the order the trials came."""
    seen: dict[str, Any] = {}
    for trial in trials:
        seen.setdefault(value_key(trial.params.get(path)), trial.params.get(path))
    values = list(seen.values())
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return values


def _compare(claim: Claim, trials: Sequence[TrialResult], trick: Any, baseline: Any, sign: int) -> Comparison:
    def by_seed(value: Any) -> dict[Any, list[float]]:
        out: dict[Any, list[float]] = {}
        for t in trials:
            if (
                value_key(t.params.get(claim.path)) == value_key(value)
                and t.value is not None
                and math.isfinite(t.value)
            ):
                out.setdefault(t.seed, []).append(sign * t.value)
        return out

    a, b = by_seed(trick), by_seed(baseline)
    flat_a, flat_b = [v for vs in a.values() for v in vs], [v for vs in b.values() for v in vs]
    means = (
        None if not flat_a else sign * statistics.fmean(flat_a),
        None if not flat_b else sign * statistics.fmean(flat_b),
    )
    shared = sorted(a.keys() & b.keys(), key=str)
    if len(shared) >= 2:
        effect = paired_difference([(statistics.fmean(a[s]), statistics.fmean(b[s])) for s in shared])
    elif len(flat_a) >= 2 and len(flat_b) >= 2:
        effect = difference(flat_a, flat_b)
    else:
        return Comparison(trick, baseline, None, None, "none", 0, "too thin", *means)
    low, high = effect["ci95"]
    result: Literal["supports", "refutes", "no difference"] = (
        "supports" if low > 0 else "refutes" if high < 0 else "no difference"
    )
    return Comparison(trick, baseline, effect["diff"], [low, high], effect["method"], effect["n"], result, *means)


def _setting_outcome(comparisons: Sequence[Comparison]) -> Literal["holds", "fails", "unclear"]:
    results = [c.result for c in comparisons]
    if results and all(r == "supports" for r in results):
        return "holds"
    if "refutes" in results or (results and all(r == "no difference" for r in results)):
        return "fails"
    return "unclear"


def _outcome(settings: Sequence[str]) -> Outcome:
    if settings and all(s == "holds" for s in settings):
        return "holds"
    if "holds" in settings:
        return "holds under conditions"
    if "fails" in settings:
        return "does not hold"
    return "inconclusive"


def describe(value: Any) -> str:
    """A value as the report prints it."""
    return value if isinstance(value, str) else json.dumps(value)
