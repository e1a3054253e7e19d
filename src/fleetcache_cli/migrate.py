"""``fleetcache migrate``: bring a database to the latest fleetcache schema at deploy time.

Runs :func:`fleetcache.stores.migrations.migrate` (the same numbered migrations a store
applies when it opens, under the same lock) and prints the versions before and after.
Exit status 0 on success, 1 with one clear line when the database cannot be reached, is
newer than this release, or a statement fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from fleetcache.errors import FleetcacheError
from fleetcache.stores.migrations import migrate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="a Postgres URL or connection string, or sqlite:///path (default: $DATABASE_URL)",
    )


def describe(target: str) -> str:
    """Where ``target`` points, without its password."""
    from fleetcache_cli.shared import redacted  # noqa: PLC0415 - only for Postgres targets

    if target.startswith("sqlite:") or ("://" not in target and "=" not in target):
        return f"sqlite file {target.removeprefix('sqlite:///')!r}"
    return redacted(target)


def run(args: argparse.Namespace) -> int:
    """Migrate; 0 on success, 1 (with a message on stderr) on failure."""
    target: str | None = args.database_url
    if not target:
        print("fleetcache migrate: give --database-url (or set DATABASE_URL)", file=sys.stderr)
        return 1
    try:
        before, after = asyncio.run(migrate(target))
    except FleetcacheError as exc:
        print(f"fleetcache migrate failed: {exc}", file=sys.stderr)
        return 1
    change = "already at the latest version" if before == after else "upgraded"
    print(f"fleetcache schema of {describe(target)}: version {before} -> {after} ({change})")
    return 0
