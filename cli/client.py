"""The HTTP client commands (`submit`, `jobs`, `show`, `cancel`, `metrics`, `watch`) and the event-stream reader."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from cli.local import read_spec_or_exit

DEFAULT_URL = "http://127.0.0.1:8000"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the client subcommands to the `trickserve` parser."""
    p = sub.add_parser("submit", help="submit a spec to the service")
    p.add_argument("spec")
    p.add_argument("--watch", action="store_true", help="follow the job live until it ends")
    p.add_argument("--idempotency-key", default=None)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list jobs")
    p.add_argument("--status", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_jobs)

    for name, func, text in (
        ("show", cmd_show, "show one job"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("watch", cmd_watch, "follow a job's events live"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job")
        p.set_defaults(func=func)

    p = sub.add_parser("metrics", help="print a job's per-epoch metrics")
    p.add_argument("job")
    p.add_argument("--names", default=None, help="comma-separated, e.g. val/loss,val/acc")
    p.set_defaults(func=cmd_metrics)


# ------------------------------------------------------------------------------------------ HTTP


def api_url() -> str:
    return os.environ.get("TRICKSERVE_URL", DEFAULT_URL).rstrip("/")


def api_key() -> str | None:
    """TRICKSERVE_API_KEY, else the key `trickserve up` wrote to $TRICKSERVE_HOME/api-key."""
    if os.environ.get("TRICKSERVE_API_KEY"):
        return os.environ["TRICKSERVE_API_KEY"]
    from cli.keys import KEY_FILE
    from core.config import Settings

    path = Settings().home / KEY_FILE
    return path.read_text().strip() if path.exists() else None


def client(timeout: float | httpx.Timeout | None = 30.0) -> httpx.Client:
    key = api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=api_url(), headers=headers, timeout=timeout)


def call(method: str, path: str, **kwargs: Any) -> Any:
    """One request; on an error answer print its code and message and exit 1."""
    try:
        with client() as c:
            r = c.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        sys.exit(f"error: cannot reach {api_url()} ({exc}); is `trickserve up` running?")
    if r.status_code >= 400:
        _die(r)
    return r.json()


def _die(r: httpx.Response) -> None:
    try:
        err = r.json()["error"]
        detail = "".join(
            f"\n  {d.get('path', '')}: {d.get('message', d)}" for d in err.get("details") or [] if isinstance(d, dict)
        )
        sys.exit(f"error {r.status_code} {err['code']}: {err['message']}{detail}")
    except (ValueError, KeyError, TypeError):
        sys.exit(f"error {r.status_code}: {r.text[:500]}")


# --------------------------------------------------------------------------------------- commands


def cmd_submit(args: argparse.Namespace) -> int:
    spec = read_spec_or_exit(args.spec)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = call("POST", "/v1/jobs", json=spec.model_dump(mode="json", exclude_unset=True), headers=headers)
    print(f"submitted {job['id']} ({job['status']})")
    for a in job.get("advice") or []:
        print(f"[{a['severity']}] {a['code']}: {a['message']}", file=sys.stderr)
    if not args.watch:
        return 0
    return watch(job["id"], job["name"], spec.train.epochs)


def cmd_watch(args: argparse.Namespace) -> int:
    job = call("GET", f"/v1/jobs/{args.job}")
    return watch(job["id"], job["name"], job["spec"]["train"]["epochs"])


def watch(job_id: str, name: str, epochs: int) -> int:
    """Follow the job's event stream with a progress bar; print the final metrics; exit 0 on success."""
    from cli.progress import ProgressBar

    with ProgressBar(name, epochs) as bar:
        for kind, event in stream_events(job_id):
            if kind == "status":
                bar.progress.console.print(f"status: {event['data'].get('to')}")
            elif kind != "end":
                bar.show(kind, event.get("epoch") or 0, event.get("data") or {})
    job = call("GET", f"/v1/jobs/{job_id}")
    print_job(job)
    return 0 if job["status"] in ("succeeded", "early_stopped") else 1


def stream_events(job_id: str, path: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (kind, event) from a job's SSE stream (or the stream at `path`, e.g. a study's) until `end`,
    reconnecting with Last-Event-ID after a drop."""
    path = path or f"/v1/jobs/{job_id}/events"
    last_id: str | None = None
    failures = 0
    while failures < 30:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            with (
                client(timeout=httpx.Timeout(30.0, read=120.0)) as c,
                c.stream("GET", path, headers=headers) as r,
            ):
                if r.status_code == 204:  # resumed after the end: nothing more will come
                    return
                if r.status_code >= 400:
                    r.read()
                    _die(r)
                for event_id, kind, data in parse_sse(r.iter_lines()):
                    failures = 0
                    last_id = event_id or last_id
                    yield kind, data
                    if kind == "end":
                        return
        except httpx.TransportError:
            failures += 1
            time.sleep(min(5.0, 0.5 * failures))
    sys.exit("error: lost the event stream")


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """Minimal Server-Sent Events parser: yields (id, event, parsed JSON data) per message."""
    event_id: str | None = None
    kind = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, kind, json.loads("\n".join(data))
            event_id, kind, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                event_id = value
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)


def cmd_jobs(args: argparse.Namespace) -> int:
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    page = call("GET", "/v1/jobs", params=params)
    for j in page["items"]:
        acc = (j.get("final_metrics") or {}).get("test/acc")
        print(
            f"{j['id']}  {j['status']:<13} {j['name']:<24} {j['created_at']}  "
            f"{'' if acc is None else f'test/acc={acc:.4f}'}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print_job(call("GET", f"/v1/jobs/{args.job}"))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = call("POST", f"/v1/jobs/{args.job}/cancel")
    print(f"{job['id']} {job['status']}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": 1000}
    if args.names:
        params["names"] = args.names
    rows: dict[int, dict[str, float]] = {}
    while True:
        page = call("GET", f"/v1/jobs/{args.job}/metrics", params=params)
        for p in page["items"]:
            rows.setdefault(p["epoch"], {})[p["name"]] = p["value"]
        if not page.get("next_cursor"):
            break
        params["after"] = page["next_cursor"]
    names = sorted({n for r in rows.values() for n in r})
    print("epoch  " + "  ".join(f"{n:>12}" for n in names))
    for epoch in sorted(rows):
        print(f"{epoch:>5}  " + "  ".join(_cell(rows[epoch].get(n)) for n in names))
    return 0


def _cell(v: float | None) -> str:
    return f"{'':>12}" if v is None else f"{v:>12.4f}"


def print_job(job: dict[str, Any]) -> None:
    reason = f" ({job['stop_reason']})" if job.get("stop_reason") else ""
    print(f"{job['id']}  {job['name']}  {job['status']}{reason}  attempt {job.get('attempt')}")
    if job.get("failure"):
        print(f"failure: {job['failure']['class']}: {job['failure']['message']}")
    for label, key in (("final", "final_metrics"), ("best", "best_metrics")):
        metrics = job.get(key) or {}
        shown = {k: v for k, v in metrics.items() if "/" in k and v is not None}
        if shown:
            print(f"{label}: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
