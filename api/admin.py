"""`trickserve keys create|revoke|list`: API key administration, straight on the database (like `migrate`)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add `keys` and its subcommands to the `trickserve` parser."""
    keys = sub.add_parser("keys", help="create, revoke and list API keys (on the database directly)")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    p = actions.add_parser("create", help="make a key for a tenant (created if new); the key is the last line")
    p.add_argument("--tenant", required=True, help="tenant id: letters, digits, '_', '.', '-'")
    p.add_argument("--name", default=None, help="a label to recognise the key by")
    p.set_defaults(func=cmd_create)

    p = actions.add_parser("revoke", help="revoke a key, given whole or by the prefix `keys list` shows")
    p.add_argument("key", metavar="KEY_OR_PREFIX")
    p.set_defaults(func=cmd_revoke)

    p = actions.add_parser("list", help="list keys by prefix (keys themselves are never stored)")
    p.add_argument("--tenant", default=None)
    p.set_defaults(func=cmd_list)


def cmd_create(args: argparse.Namespace) -> int:
    from core import tenants
    from core.db import session_scope

    with session_scope() as session:
        try:
            tenants.create_tenant(session=session, tenant_id=args.tenant)
        except tenants.InvalidTenantId as exc:
            sys.exit(f"error: {exc}")
        key = tenants.create_api_key(session=session, tenant_id=args.tenant, name=args.name)
    print(f"API key for tenant {args.tenant!r} (shown once; only its hash is stored):", file=sys.stderr)
    print(key)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from core import tenants
    from core.db import session_scope

    with session_scope() as session:
        revoked = tenants.revoke_api_key(session=session, key_or_prefix=args.key)
    if not revoked:
        sys.exit("error: no live key matches")
    print("revoked")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from core import tenants
    from core.db import session_scope

    with session_scope(read_only=True) as session:
        rows = tenants.list_api_keys(session, args.tenant)
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "live"
        print(f"{row.tenant_id:<20} {row.prefix}…  {state:<22} {row.created_at:%Y-%m-%d %H:%M}  {row.name or ''}")
    return 0
