"""`trickserve report`: put the article's claims to the test on a running service. It submits one study per claim
(examples/claims/*.yaml; a finished one is reused), waits for them, computes each claim's verdict from the trials
by the rule of core.claims, and writes report.md, report.html, report.json and a picture per claim."""

from __future__ import annotations

import argparse
import copy
import hashlib
import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cli.client import call, client
from core.claims import RULE, Claim, ClaimVerdict, describe, judge
from core.verdict import TrialResult

CLAIMS_DIR = Path(__file__).resolve().parents[1] / "examples" / "claims"
POLL_S = 2.0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `report` to the `trickserve` parser."""
    p = sub.add_parser("report", help="put the article's claims to the test: one study each, then a report")
    p.add_argument("--out", required=True, type=Path, help="folder for report.md, report.html, report.json, PNGs")
    p.add_argument("--quick", action="store_true", help="the smaller budgets of each claim's `quick` block")
    p.add_argument("--claims", default=None, help="comma-separated keys (default: every file in the folder)")
    p.add_argument("--dir", type=Path, default=CLAIMS_DIR, help=f"the claims' folder (default {CLAIMS_DIR})")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the studies (default 3600)")
    p.set_defaults(func=cmd_report)


@dataclass
class Entry:
    """One claim of the report: its file's parts, its study once submitted, its verdict once judged."""

    claim: Claim
    about: str  # the file's leading comment: the setting, for people
    study_spec: dict[str, Any]
    source: dict[str, Any] | None  # a job the study's trials transfer from, trained first
    study: dict[str, Any] | None = None
    verdict: ClaimVerdict | None = None
    picture: str | None = None


def cmd_report(args: argparse.Namespace) -> int:
    entries = load(args.dir, args.claims, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = "quick" if args.quick else "full"
    print(f"{len(entries)} claims, {budget} budgets")
    for entry in entries:
        entry.study = submit(entry, budget)
        print(f"{entry.claim.key}: study {entry.study['id']} ({entry.study['status']})")
    wait(entries, args.timeout)
    for entry in entries:
        assert entry.study is not None
        detail = call("GET", f"/v1/studies/{entry.study['id']}")
        entry.study = detail
        entry.verdict = judge(entry.claim, trial_results(detail), detail["spec"]["objective"]["mode"])
        entry.picture = save_picture(entry, args.out)
        print(f"{entry.claim.key}: {entry.verdict.outcome}")
    write(entries, args.out, budget)
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.html'} and {args.out / 'report.json'}")
    return 0


# ------------------------------------------------------------------------------------------- claims


def load(folder: Path, keys: str | None, quick: bool) -> list[Entry]:
    """The claims of the folder (or those named), each with its study spec at the budget asked for."""
    wanted = None if keys is None else [k.strip() for k in keys.split(",") if k.strip()]
    files = sorted(folder.glob("*.yaml"))
    if wanted is not None:
        files = [folder / f"{key}.yaml" for key in wanted]
    entries = []
    for path in files:
        if not path.is_file():
            sys.exit(f"error: no claim {path.stem} in {folder}")
        text = path.read_text()
        raw = yaml.safe_load(text)
        spec = _merged(raw["study"], raw.get("quick") or {}) if quick else raw["study"]
        about = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        entries.append(Entry(Claim.from_dict(path.stem, raw["claim"]), about, spec, raw.get("source")))
    return entries


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def submit(entry: Entry, budget: str) -> dict[str, Any]:
    """POST the claim's study (after its transfer source, if any), with an idempotency key made from the spec: the
    same report run again finds its studies instead of training them again."""
    spec = entry.study_spec
    if entry.source is not None:
        source = _submit_job(entry.source, f"claims-{entry.claim.key}-source")
        source_id = _wait_job(source["id"])
        spec = json.loads(json.dumps(spec).replace('"{source}"', json.dumps(source_id)))
    key = f"claims-{entry.claim.key}-{budget}-{_digest(spec)}"
    return call("POST", "/v1/studies", json=spec, headers={"Idempotency-Key": key})


def _submit_job(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return call("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": f"{name}-{_digest(spec)}"})


def _wait_job(job_id: str) -> str:
    while True:
        job = call("GET", f"/v1/jobs/{job_id}")
        if job["status"] in ("succeeded", "early_stopped"):
            return job_id
        if job["status"] in ("failed", "cancelled", "pruned"):
            sys.exit(f"error: the transfer source {job_id} ended {job['status']}")
        time.sleep(POLL_S)


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def wait(entries: list[Entry], timeout: float) -> None:
    """Poll the studies until every one has ended, printing their progress as it changes."""
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    while True:
        pending = []
        for entry in entries:
            assert entry.study is not None
            study = call("GET", f"/v1/studies/{entry.study['id']}")
            line = f"{study['status']}, {study['trials_created']}/{study['trials_planned']} trials made"
            if shown.get(entry.claim.key) != line:
                print(f"{entry.claim.key}: {line}", flush=True)
                shown[entry.claim.key] = line
            if study["status"] not in ("succeeded", "failed", "cancelled"):
                pending.append(entry)
        if not pending:
            return
        if time.monotonic() > deadline:
            sys.exit(f"error: {len(pending)} studies still running after {timeout:g} s")
        time.sleep(POLL_S)


def trial_results(detail: dict[str, Any]) -> list[TrialResult]:
    return [
        TrialResult(t["number"], t["job_id"], t["params"], t["seed"], t["status"], t["value"], t["epochs"])
        for t in detail["trials"]
    ]


def save_picture(entry: Entry, out: Path) -> str | None:
    """The study's picture, by the claim's path (the service draws it)."""
    assert entry.study is not None
    with client(timeout=120) as c:
        r = c.get(f"/v1/studies/{entry.study['id']}/plot.png", params={"path": entry.claim.path})
    if r.status_code != 200:
        print(f"{entry.claim.key}: no picture ({r.status_code})", file=sys.stderr)
        return None
    name = f"{entry.claim.key}.png"
    (out / name).write_bytes(r.content)
    return name


# --------------------------------------------------------------------------------------------- writing


def write(entries: list[Entry], out: Path, budget: str) -> None:
    (out / "report.json").write_text(json.dumps(as_json(entries, budget), indent=2))
    (out / "report.md").write_text(markdown(entries, budget))
    (out / "report.html").write_text(page(entries, budget))


def as_json(entries: list[Entry], budget: str) -> dict[str, Any]:
    return {
        "budget": budget,
        "rule": RULE,
        "claims": [
            {
                "key": e.claim.key,
                "article": e.claim.article,
                "setting": e.about,
                "study_id": e.study["id"] if e.study else None,
                "picture": e.picture,
                **(e.verdict.as_dict() if e.verdict else {}),
            }
            for e in entries
        ],
    }


def _rows(entry: Entry) -> list[list[str]]:
    """The comparisons of a claim as table rows: setting, trick, baseline, means, difference and interval, result."""
    assert entry.verdict is not None
    rows = []
    for setting in entry.verdict.settings:
        label = "" if entry.claim.setting is None else f"{entry.claim.setting} = {describe(setting.value)}"
        for c in setting.comparisons:
            interval = "" if c.ci95 is None else f"[{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]"
            diff = "" if c.diff is None else f"{c.diff:+.4f}"
            method = "" if c.method == "none" else f" ({c.method}, n={c.n})"
            rows.append([label, describe(c.trick), describe(c.baseline), _num(c.trick_mean), _num(c.baseline_mean),
                         f"{diff} {interval}{method}".strip(), c.result])  # fmt: skip
    return rows


HEADERS = ["setting", "trick", "baseline", "trick mean", "baseline mean", "difference, 95% interval", "result"]


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _overstated(entries: list[Entry]) -> list[str]:
    """The claims the numbers do not back everywhere: a line each, with every comparison that did not support it
    (in a setting the article may not speak of, such as plenty of data for augmentation, too)."""
    lines = []
    for e in entries:
        if e.verdict is None or e.verdict.outcome == "holds":
            continue
        failing = [
            f"{describe(c.trick)} vs {describe(c.baseline)}"
            + ("" if e.claim.setting is None else f" at {e.claim.setting} = {describe(s.value)}")
            + f": {c.result}"
            + ("" if c.diff is None else f" ({c.diff:+.4f})")
            for s in e.verdict.settings
            for c in s.comparisons
            if c.result != "supports"
        ]
        lines.append(f"{e.claim.key} ({e.verdict.outcome}): " + "; ".join(failing))
    return lines


def markdown(entries: list[Entry], budget: str) -> str:
    parts = [
        "# The article's claims, measured",
        "",
        f"Each claim of *Tips and Tricks for Deep Learning* was put to the test with a study on this service "
        f"({budget} budgets). Every number below comes from the studies' trials; every verdict from the rule at the "
        "end.",
        "",
        "| claim | verdict |",
        "|---|---|",
        *(f"| {e.claim.key} | {e.verdict.outcome if e.verdict else 'not run'} |" for e in entries),
        "",
    ]
    overstated = _overstated(entries)
    if overstated:
        parts += ["## Where the claim does not hold", "", *(f"- {line}" for line in overstated), ""]
    for i, e in enumerate(entries, 1):
        assert e.study is not None and e.verdict is not None
        parts += [
            f"## {i}. {e.claim.key}: {e.verdict.outcome}",
            "",
            f"> {e.claim.article}",
            "",
            f"**Setting.** {e.about} (study `{e.study['id']}`, objective {e.claim.metric_label or _objective(e)}).",
            "",
            "| " + " | ".join(HEADERS) + " |",
            "|" + "---|" * len(HEADERS),
            *("| " + " | ".join(row) + " |" for row in _rows(e)),
            "",
        ]
        if e.picture:
            parts += [f"![{e.claim.key}]({e.picture})", ""]
    parts += ["## The rule", "", RULE, ""]
    return "\n".join(parts)


def _objective(entry: Entry) -> str:
    assert entry.study is not None
    objective = entry.study["spec"]["objective"]
    return f"{objective['metric']} at the {objective['take']} epoch"


def page(entries: list[Entry], budget: str) -> str:
    """The same report as a page that opens in a browser (no script, no network)."""
    esc = html.escape
    body = [
        "<h1>The article's claims, measured</h1>",
        f"<p>Each claim of <em>Tips and Tricks for Deep Learning</em> was put to the test with a study on this "
        f"service ({esc(budget)} budgets). Every number comes from the studies' trials; every verdict from the rule "
        "at the end.</p>",
        "<table><tr><th>claim</th><th>verdict</th></tr>",
        *(
            f"<tr><td><a href='#{esc(e.claim.key)}'>{esc(e.claim.key)}</a></td><td class='{_css(e)}'>"
            f"{esc(e.verdict.outcome if e.verdict else 'not run')}</td></tr>"
            for e in entries
        ),  # fmt: skip
        "</table>",
    ]
    overstated = _overstated(entries)
    if overstated:
        body += ["<h2>Where the claim does not hold</h2><ul>", *(f"<li>{esc(line)}</li>" for line in overstated)]
        body.append("</ul>")
    for i, e in enumerate(entries, 1):
        assert e.study is not None and e.verdict is not None
        body += [
            f"<h2 id='{esc(e.claim.key)}'>{i}. {esc(e.claim.key)}: <span class='{_css(e)}'>"
            f"{esc(e.verdict.outcome)}</span></h2>",
            f"<blockquote>{esc(e.claim.article)}</blockquote>",
            f"<p><b>Setting.</b> {esc(e.about)} (study <code>{esc(e.study['id'])}</code>, objective "
            f"{esc(e.claim.metric_label or _objective(e))}).</p>",
            "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in HEADERS) + "</tr>",
            *("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in _rows(e)),
            "</table>",
        ]
        if e.picture:
            body.append(f"<p><img src='{esc(e.picture)}' alt='{esc(e.claim.key)}'></p>")
    body += ["<h2>The rule</h2>", "".join(f"<p>{esc(p)}</p>" for p in RULE.split("\n\n"))]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "img{max-width:100%}blockquote{border-left:4px solid #ccc;margin:1em 0;padding-left:1em;color:#444}"
        ".holds{color:#1a7f37}.cond{color:#9a6700}.no{color:#cf222e}.inc{color:#666}"
    )
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>The article's claims, measured</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")  # fmt: skip


def _css(entry: Entry) -> str:
    outcome = entry.verdict.outcome if entry.verdict else ""
    return {"holds": "holds", "holds under conditions": "cond", "does not hold": "no"}.get(outcome, "inc")
