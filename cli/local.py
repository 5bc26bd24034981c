"""Commands that need no service: run a spec in this process (`train`), check it (`validate`), print the schema."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from core.spec import JobSpec, SpecError, load_spec, spec_errors


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `validate` and `schema` to the `trickserve` parser."""
    p = sub.add_parser("train", help="run a spec locally with a live progress bar")
    p.add_argument("spec")
    p.add_argument("--out", required=True, help="run directory: result.json, checkpoint, model, spec")
    p.add_argument("--device", default=None, help="override resources.device (cpu, cuda, cuda:N)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="print the resolved spec and advice")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of a job spec")
    p.set_defaults(func=cmd_schema)


def read_spec_or_exit(path: str) -> JobSpec:
    """Load a spec; on errors print every problem with its path and exit 2."""
    try:
        return load_spec(Path(path))
    except FileNotFoundError:
        sys.exit(f"error: no such file: {path}")
    except ValidationError as exc:
        lines = [f"  {e['path']}: {e['message']}" for e in spec_errors(exc)]
        sys.exit("error: invalid spec\n" + "\n".join(lines))
    except ValueError as exc:
        sys.exit(f"error: invalid spec: {exc}")


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from core.engine.advice import advise

    spec = read_spec_or_exit(args.spec)
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    for a in advise(spec):
        print(f"[{a.severity}] {a.code} ({a.path}): {a.message}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cli.progress import ProgressBar
    from core.engine import train
    from core.engine.advice import advise
    from core.engine.checkpoint import CHECKPOINT_NAME

    spec = read_spec_or_exit(args.spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(spec.model_dump_json(indent=2))
    for a in advise(spec):
        print(f"[{a.severity}] {a.code}: {a.message}", file=sys.stderr)
    resume = out / CHECKPOINT_NAME if args.resume else None
    if resume is not None and not resume.exists():
        sys.exit(f"error: nothing to resume: {resume} does not exist")
    try:
        with ProgressBar(spec.name, spec.train.epochs) as bar:
            result = train(spec, [bar], device=args.device, resume_from=resume, out_dir=out)
    except SpecError as exc:
        sys.exit(f"error: {exc}")
    (out / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    m = result.metrics
    print(
        f"{result.status} after {result.epochs_run} epochs"
        f"{f' ({result.stop_reason})' if result.stop_reason else ''}: "
        f"test/acc={_fmt(m.get('test/acc'))} test/loss={_fmt(m.get('test/loss'))} -> {out / 'result.json'}"
    )
    return 0 if result.status in ("succeeded", "early_stopped") else 1


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
