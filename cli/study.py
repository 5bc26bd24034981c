"""The study commands (`study submit [--watch]`, `study show`, `study list`, `study cancel`): submit a study, follow
its trials live, and print its trials table and verdict."""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cli.client import call, stream_events

REFRESH_S = 1.5  # the live table re-reads the study this often, so that epochs and running values move
TRIAL_EVENTS = frozenset({"trial_created", "trial_started", "trial_ended", "trial_pruned", "new_best"})
STYLES = {"running": "bold", "pruned": "yellow", "early_stopped": "cyan", "failed": "red", "cancelled": "dim"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add `study submit|show|list|cancel` to the `trickserve` parser."""
    family = sub.add_parser("study", help="compare trials of a spec over a space of values, with a verdict")
    study = family.add_subparsers(dest="study_command", required=True)

    p = study.add_parser("submit", help="submit a study spec (YAML or JSON)")
    p.add_argument("spec", help="a study spec file; its base is a job spec, inline or the path of a spec file")
    p.add_argument("--watch", action="store_true", help="follow the trials live, then print the verdict")
    p.add_argument("--idempotency-key", default=None)
    p.set_defaults(func=cmd_submit)

    p = study.add_parser("show", help="a study's status, best trial, trials and verdict")
    p.add_argument("study")
    p.set_defaults(func=cmd_show)

    p = study.add_parser("list", help="list studies, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_list)

    p = study.add_parser("cancel", help="cancel a study and its active trials")
    p.add_argument("study")
    p.set_defaults(func=cmd_cancel)


# --------------------------------------------------------------------------------------- commands


def cmd_submit(args: argparse.Namespace) -> int:
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    study = call("POST", "/v1/studies", json=read_study_or_exit(args.spec), headers=headers)
    at_once = study["spec"]["max_concurrent"]
    print(f"submitted {study['id']} ({study['status']}): {study['trials_planned']} trials, {at_once} at a time")
    for a in study.get("advice") or []:
        print(f"[{a['severity']}] {a['code']} ({a['path']}): {a['message']}", file=sys.stderr)
    return watch(study["id"]) if args.watch else 0


def cmd_show(args: argparse.Namespace) -> int:
    detail = call("GET", f"/v1/studies/{args.study}")
    print(study_text(detail, running_values(detail)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for s in call("GET", "/v1/studies", params={"limit": args.limit})["items"]:
        best = "" if s["best"] is None else f"best={num(s['best']['value'])}"
        trials = f"{s['trials_created']}/{s['trials_planned']} trials"
        print(f"{s['id']}  {s['status']:<10} {s['name']:<24} {trials:<14} {s['created_at']}  {best}".rstrip())
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    study = call("POST", f"/v1/studies/{args.study}/cancel")
    print(f"{study['id']} {study['status']}")
    return 0


def read_study_or_exit(path: str) -> dict[str, Any]:
    """The study spec in a YAML or JSON file; a `base` given as a path (relative to that file) is read from its
    own file. The service checks the rest and names every problem."""
    file = Path(path)
    try:
        study = yaml.safe_load(file.read_text())
        if isinstance(study, dict) and isinstance(study.get("base"), str):
            study["base"] = yaml.safe_load((file.parent / study["base"]).read_text())
    except OSError as exc:
        sys.exit(f"error: cannot read {exc.filename}: {exc.strerror}")
    except yaml.YAMLError as exc:
        sys.exit(f"error: not YAML or JSON: {exc}")
    if not isinstance(study, dict):
        sys.exit(f"error: {path}: a study spec must be a mapping of fields")
    return study


# ------------------------------------------------------------------------------------------ watch


def watch(study_id: str) -> int:
    """Follow the study until it ends (a line per event; on a terminal also a live trials table), then print it as
    `study show` does. Exit 0 when it succeeded."""
    inbox: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=_pump, args=(stream_study_events(study_id), inbox), daemon=True).start()
    with LiveTrials(study_id) if sys.stdout.isatty() else EventLines() as view:
        while True:
            batch = _batch(inbox, REFRESH_S)
            for line in filter(None, (event_line(kind, event) for kind, event in batch)):
                view.print(line)
            if any(kind == "end" for kind, _ in batch):
                break
            view.update(force=any(kind in TRIAL_EVENTS for kind, _ in batch))
    detail = call("GET", f"/v1/studies/{study_id}")
    print(study_text(detail, running_values(detail)))
    return 0 if detail["status"] == "succeeded" else 1


def stream_study_events(study_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (kind, event) from the study's SSE stream until `end`, reconnecting with Last-Event-ID after a drop."""
    return stream_events(study_id, f"/v1/studies/{study_id}/events")


def _pump(events: Iterator[tuple[str, dict[str, Any]]], inbox: queue.Queue[Any]) -> None:
    # The stream is read in a thread so that the table can be re-read while no event comes; whatever stops the
    # reader (an error answer exits) is handed to the main thread, which raises it.
    try:
        for item in events:
            inbox.put(item)
        inbox.put(("end", {}))  # a stream resumed after the study's end closes without one
    except BaseException as exc:  # noqa: BLE001 - SystemExit included
        inbox.put(exc)


def _batch(inbox: queue.Queue[Any], timeout: float) -> list[tuple[str, dict[str, Any]]]:
    """The events that came within `timeout`, waiting for the first: empty when none came."""
    items = []
    try:
        items.append(inbox.get(timeout=timeout))
        while True:
            items.append(inbox.get_nowait())
    except queue.Empty:
        pass
    for item in items:
        if isinstance(item, BaseException):
            raise item
    return items


def event_line(kind: str, event: dict[str, Any]) -> str | None:
    """One event of the study's stream, for people; None for those that say nothing new (the end of the stream,
    and study_ended, which follows the status line saying the same)."""
    d, trial = event.get("data") or {}, f"trial #{event.get('trial_number')}"
    if kind == "trial_created":
        return f"{trial} created: {params_text(d.get('params') or {})} seed {d.get('seed')}"
    if kind == "trial_started":
        return f"{trial} started (attempt {d.get('attempt')})"
    if kind in ("trial_ended", "trial_pruned"):
        value = "" if d.get("value") is None else f", objective {num(d['value'])}"
        return f"{trial} {d.get('status')} after {d.get('epochs')} epochs{value}"
    if kind == "new_best":
        return f"new best: {trial}, objective {num(d.get('value'))} with {params_text(d.get('params') or {})}"
    if kind == "status":
        return f"study {d.get('to')}: {d.get('reason')}"
    if kind == "cancel_requested":
        return "study cancel requested: no trial is made any more, the active ones are cancelled"
    return None if kind in ("end", "study_ended") else f"{kind}: {d}"


class EventLines:
    """Where stdout is not a terminal: one plain line per event, nothing redrawn."""

    def __enter__(self) -> EventLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def print(self, line: str) -> None:
        print(line, flush=True)

    def update(self, force: bool) -> None:
        pass


class LiveTrials:
    """On a terminal: the event lines, under which the trials table is redrawn in place, re-read from the API on
    trial events and every REFRESH_S. It is cleared at the end, where the full study is printed."""

    def __init__(self, study_id: str):
        from rich.console import Console
        from rich.live import Live

        self.study_id, self.read_at = study_id, -math.inf
        self.live = Live(console=Console(), transient=True, auto_refresh=False)

    def __enter__(self) -> LiveTrials:
        self.live.start()
        self.update(force=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.stop()

    def print(self, line: str) -> None:
        self.live.console.print(line, markup=False, highlight=False)

    def update(self, force: bool) -> None:
        if not force and time.monotonic() - self.read_at < REFRESH_S:
            return
        detail = call("GET", f"/v1/studies/{self.study_id}")
        self.read_at = time.monotonic()
        rows = max(5, self.live.console.height - 8)  # the newest trials that fit: Live crops what does not
        self.live.update(live_table(detail, running_values(detail), rows), refresh=True)


def live_table(detail: dict[str, Any], running: dict[str, float], last: int) -> Any:
    """The headline and the `last` trials, styled by status, for a terminal."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    headers, rows = trial_rows(detail, running)
    table = Table(*headers, box=box.SIMPLE_HEAD)
    for trial, cells in list(zip(detail["trials"], rows, strict=True))[-last:]:
        table.add_row(*map(Text, cells), style=STYLES.get(trial["status"]))
    hidden = f" (the last {last} shown)" if len(rows) > last else ""
    return Group(Text(headline(detail) + hidden), table, Text(LEGEND, style="dim"))


# --------------------------------------------------------------------------------------- the study


LEGEND = "* best trial so far; (x) the objective of a running trial so far"


def study_text(detail: dict[str, Any], running: dict[str, float]) -> str:
    """What `study show` prints: the status, the best trial, the trials table and the verdict."""
    objective = detail["spec"]["objective"]
    parts = [
        headline(detail),
        f"objective: {objective['metric']} at each trial's {'best' if objective['take'] == 'best' else 'last'} epoch, "
        f"{'higher' if objective['mode'] == 'max' else 'lower'} is better",
        best_text(detail),
        "",
        render(*trial_rows(detail, running)),
        LEGEND,
    ]
    for parameter in detail["verdict"]["parameters"]:
        parts += ["", f"{parameter['path']}: {parameter['conclusion']}"]
        parts.append(render(*verdict_rows(parameter)))
    return "\n".join(parts)


def headline(detail: dict[str, Any]) -> str:
    cancelling = " (cancel requested)" if detail["cancel_requested"] and detail["status"] != "cancelled" else ""
    trials = f"{detail['trials_created']}/{detail['trials_planned']} trials"
    return f"{detail['id']}  {detail['name']}  {detail['status']}{cancelling}  {trials}"


def best_text(detail: dict[str, Any]) -> str:
    best = detail["verdict"]["best_trial"]
    if best is None:
        return "best: none yet"
    return (f"best: trial #{best['number']} ({best['job_id']}), objective {num(best['value'])}, with "
            f"{params_text(best['params'])} seed {best['seed']}")  # fmt: skip


def trial_rows(detail: dict[str, Any], running: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """The trials table: number, one column per path of the space, seed, status, epochs done (of those planned)
    and the objective."""
    paths = list(detail["spec"]["space"])
    epochs = detail["spec"]["base"]["train"]["epochs"]
    best = detail["best"]["job_id"] if detail["best"] else None
    rows = []
    for t in detail["trials"]:
        if t["value"] is not None:
            value = num(t["value"]) + (" *" if t["job_id"] == best else "")
        else:
            value = f"({num(running[t['job_id']])})" if t["job_id"] in running else ""
        planned = t["params"].get("train.epochs", epochs)
        params = [value_text(t["params"].get(path)) for path in paths]
        rows.append([str(t["number"]), *params, str(t["seed"]), t["status"], f"{t['epochs']}/{planned}", value])
    return ["#", *paths, "seed", "status", "epochs", detail["spec"]["objective"]["metric"]], rows


def verdict_rows(parameter: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each value of one path: n, mean, sd and 95% interval of the objective, and against the best value the
    difference, its 95% interval and the verdict."""
    headers = ["value", "n", "mean", "sd", "95% interval", "vs best", "95% interval of it", "verdict"]
    rows = []
    for v in parameter["values"]:
        effect = v["effect"] or {}
        lost = [f"{v[k]} {k.removeprefix('n_')}" for k in ("n_pruned", "n_failed") if v[k]]
        verdict = v["verdict"] + (f" ({', '.join(lost)})" if lost else "")
        diff = "" if effect.get("diff") is None else f"{effect['diff']:+.4g}"
        if effect.get("method") == "paired":
            diff += f" (paired, {effect['n']})"
        cells = [value_text(v["value"]), str(v["n"]), num(v["mean"]), num(v["sd"]), interval(v["ci95"])]
        rows.append([*cells, diff, interval(effect.get("ci95")), verdict])
    return headers, rows


def running_values(detail: dict[str, Any]) -> dict[str, float]:
    """The objective of each running trial so far (job id -> value), from its metric series: its best or its last
    epoch, as the study takes it. A test/ objective has none until the trial ends."""
    objective = detail["spec"]["objective"]
    found = {}
    for t in detail["trials"]:
        if t["status"] != "running":
            continue
        params = {"names": objective["metric"], "max_points": 4}  # keeps the first, last, lowest and highest
        series = call("GET", f"/v1/jobs/{t['job_id']}/metrics/series", params=params)["series"]
        points = series.get(objective["metric"], {"epoch": [], "value": []})
        values = [(e, v) for e, v in zip(points["epoch"], points["value"], strict=True) if isinstance(v, float | int)]
        if values and objective["take"] == "final":
            found[t["job_id"]] = max(values)[1]
        elif values:
            found[t["job_id"]] = (max if objective["mode"] == "max" else min)(v for _, v in values)
    return found


# ------------------------------------------------------------------------------------------ text


def render(headers: list[str], rows: list[list[str]]) -> str:
    """A plain table: columns left-aligned, two spaces apart."""
    widths = [max(map(len, column)) for column in zip(headers, *rows, strict=True)]
    lines = [headers, *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in lines)


def num(x: float | None) -> str:
    """A number to four significant digits; empty for none."""
    return "" if x is None else f"{x:.4g}"


def interval(bounds: list[float] | None) -> str:
    return "" if bounds is None else f"[{num(bounds[0])}, {num(bounds[1])}]"


def value_text(value: Any) -> str:
    """A parameter value: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{path}={value_text(v)}" for path, v in params.items())
