"""`trickserve keys create|revoke|list`: API key administration, straight on the database (like `migrate`), and
the embedded deployment's first key, which `trickserve up` makes and the client reads."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

from core import tenants
from core.config import Settings
from core.db import Database

EMBEDDED_TENANT = "default"
KEY_FILE = "api-key"


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
    with _database() as db, db.session() as session:
        try:
            tenants.create_tenant(session=session, tenant_id=args.tenant)
        except tenants.InvalidTenantId as exc:
            sys.exit(f"error: {exc}")
        key = tenants.create_api_key(session=session, tenant_id=args.tenant, name=args.name)
    print(f"API key for tenant {args.tenant!r} (shown once; only its hash is stored):", file=sys.stderr)
    print(key)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with _database() as db, db.session() as session:
        revoked = tenants.revoke_api_key(session=session, key_or_prefix=args.key)
    if not revoked:
        sys.exit("error: no live key matches")
    print("revoked")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _database() as db, db.session(read_only=True) as session:
        rows = tenants.list_api_keys(session, args.tenant)
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "live"
        print(f"{row.tenant_id:<20} {row.prefix}…  {state:<22} {row.created_at:%Y-%m-%d %H:%M}  {row.name or ''}")
    return 0


@contextlib.contextmanager
def _database(settings: Settings | None = None) -> Iterator[Database]:
    db = Database.from_settings(settings or Settings())
    try:
        yield db
    finally:
        db.dispose()


def ensure_embedded_key(settings: Settings) -> tuple[str, bool]:
    """The key of the embedded `default` tenant, kept in {home}/api-key (mode 0600): the saved one while it still
    authenticates, else a new one (returned with True, so that `trickserve up` can print it once)."""
    path = settings.home / KEY_FILE
    with _database(settings) as db, db.session() as session:
        saved = _read_key(path)
        if saved and tenants.authenticate(session, saved):
            path.chmod(0o600)  # a copy someone loosened is tightened again
            return saved, False
        tenants.create_tenant(session=session, tenant_id=EMBEDDED_TENANT)
        key = tenants.create_api_key(session=session, tenant_id=EMBEDDED_TENANT, name="embedded")
    write_private(path, key + "\n")
    return key, True


def write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only, atomically: it is created 0600, never wider even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
