"""The `plot` command: save a job's learning curves or a study's comparison as the service draws them, in the
format the file's suffix names (.png or .svg)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from cli.client import _die, api_url, client

ROUTES = {"job_": "jobs", "stu_": "studies"}  # id prefix -> the resource the plot is of
FORMATS = (".png", ".svg")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `plot` to the `trickserve` parser."""
    p = sub.add_parser("plot", help="save a job's learning curves or a study's comparison as PNG or SVG")
    p.add_argument("id", metavar="JOB|STUDY", help="a job id (job_...) or a study id (stu_...)")
    p.add_argument("--out", required=True, type=Path, help="the file to write; its suffix, .png or .svg, is the format")
    p.add_argument("--metrics", default=None, help="job: comma-separated metrics (default: losses and accuracies)")
    p.add_argument("--path", default=None, help="study: the path whose values are compared (default: its first)")
    p.add_argument("--metric", default=None, help="study: the curves' metric (default: the objective's)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix.lower() not in FORMATS:
        sys.exit(f"error: --out {out}: name a .png or .svg file")
    route = next((route for prefix, route in ROUTES.items() if args.id.startswith(prefix)), None)
    if route is None:
        sys.exit(f"error: {args.id!r} is neither a job id (job_...) nor a study id (stu_...)")
    allowed = ("metrics",) if route == "jobs" else ("path", "metric")
    given = {name: getattr(args, name) for name in ("metrics", "path", "metric") if getattr(args, name)}
    misplaced = sorted(set(given) - set(allowed))
    if misplaced:
        sys.exit(f"error: --{misplaced[0]} is for a {'study' if route == 'jobs' else 'job'}")
    picture = _get(f"/v1/{route}/{args.id}/plot{out.suffix.lower()}", given)
    out.write_bytes(picture)
    print(f"saved {out} ({len(picture) / 1024:.0f} KiB)")
    return 0


def _get(path: str, params: dict[str, str]) -> bytes:
    """The answer's bytes; on an error answer print its code and message and exit 1."""
    try:
        with client(timeout=120.0) as c:  # a large study takes a while to draw
            r = c.get(path, params=params)
    except httpx.TransportError as exc:
        sys.exit(f"error: cannot reach {api_url()} ({exc}); is `trickserve up` running?")
    if r.status_code >= 400:
        _die(r)
    return r.content
