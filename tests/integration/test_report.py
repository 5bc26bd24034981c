"""`trickserve report` end to end on a tiny budget: two claims of a folder of their own are submitted as studies to a
real API and worker, and the report's files say what the trials measured, with the verdicts the rule gives."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from cli import main as cli
from cli.report import trial_results
from core.claims import Claim, judge
from tests.factories import make_spec
from tests.integration.conftest import Service

pytestmark = pytest.mark.integration

TINY = make_spec(train={"epochs": 2, "batch_size": 32})


def claim_file(folder: Path, key: str, claim: dict, space: dict, quick: dict) -> None:
    study = {"name": key, "base": TINY, "space": space, "seeds": [0, 1, 2], "max_concurrent": 2}
    text = f"# {key}: a tiny setting for the test.\n" + yaml.safe_dump({"claim": claim, "study": study, "quick": quick})
    (folder / f"{key}.yaml").write_text(text)


def test_a_quick_report_measures_each_claim_and_writes_it_down(
    embedded: Service, start_worker, start_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    claims = tmp_path / "claims"
    claims.mkdir()
    claim_file(claims, "adam-vs-sgd", {"article": "Adaptive methods converge faster.", "path": "optim.name",
                                       "trick": ["adam"], "baseline": ["sgd"]},
               {"optim.name": {"grid": ["adam", "sgd"]}}, {"base": {"train": {"epochs": 1}}})  # fmt: skip
    claim_file(claims, "zero-init", {"article": "Zero weights keep units identical.", "path": "model.init",
                                     "trick": ["he_normal"], "baseline": ["zeros"]},
               {"model.init": {"grid": ["he_normal", "zeros"]}}, {})  # fmt: skip
    api = start_api(embedded)
    start_worker()
    monkeypatch.setenv("TRICKSERVE_URL", api.url)
    monkeypatch.setenv("TRICKSERVE_API_KEY", api.headers["Authorization"].removeprefix("Bearer "))
    out = tmp_path / "report"
    assert cli.main(["report", "--out", str(out), "--quick", "--dir", str(claims), "--timeout", "120"]) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["budget"] == "quick" and [c["key"] for c in report["claims"]] == ["adam-vs-sgd", "zero-init"]
    with httpx.Client(base_url=api.url, headers=api.headers) as http:
        for entry in report["claims"]:
            detail = http.get(f"/v1/studies/{entry['study_id']}").json()
            assert detail["status"] == "succeeded" and len(detail["trials"]) == 6
            raw = yaml.safe_load((claims / f"{entry['key']}.yaml").read_text())["claim"]
            expected = judge(Claim.from_dict(entry["key"], raw), trial_results(detail), "max")
            assert entry["outcome"] == expected.outcome  # the report's verdict is the rule's, on the service's numbers
            if entry["key"] == "adam-vs-sgd":  # the quick block ran: one epoch per trial
                assert {t["epochs"] for t in detail["trials"]} == {1}
    assert (out / "adam-vs-sgd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "Adaptive methods converge faster." in text and "The rule" in text and "adam-vs-sgd.png" in text
    assert "| zero-init | " in md and page.startswith("<!doctype html>")

    again = tmp_path / "again"  # a second run finds the finished studies instead of training them again
    assert cli.main(["report", "--out", str(again), "--quick", "--dir", str(claims)]) == 0
    assert [c["study_id"] for c in json.loads((again / "report.json").read_text())["claims"]] == [
        c["study_id"] for c in report["claims"]
    ]
