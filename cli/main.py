"""The `trickserve` command: train locally, validate specs, run the service, administer keys, and talk to the
service as a client. Each command family registers its own subcommands."""

from __future__ import annotations

import argparse

from cli import client, keys, local, plot, report, service, study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trickserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (local, service, keys, client, study, plot, report):
        family.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
