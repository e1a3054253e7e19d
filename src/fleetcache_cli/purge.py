"""``fleetcache purge``: delete now the entries past their stale window.

Runs :func:`fleetcache.inspection.purge`: entries whose stale window ended more than
``--margin`` seconds ago go, in batches; live entries (fresh, or stale inside their
window) never do, and nothing is invalidated. The fleet does the same in passing (once a
minute per process); this is for a database no process is using, or to reclaim space now.
Exit status 0 with the count; 2 when there is nothing to purge from (no schema, an older
or newer one, ``memory://``, no URL, a bad option); 1 when the database cannot be reached
or a statement fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime

from fleetcache.errors import FleetcacheError
from fleetcache.inspection import PURGE_MARGIN, purge
from fleetcache_cli.inspect import NOTHING_TO_INSPECT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="a Postgres URL or connection string, or sqlite:///path (default: $DATABASE_URL)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=PURGE_MARGIN,
        metavar="SECONDS",
        help=(
            "keep entries whose stale window ended less than SECONDS ago (default "
            f"{PURGE_MARGIN:g}, as the fleet's own purge: clocks may disagree a little)"
        ),
    )


def run(args: argparse.Namespace) -> int:
    """Purge and say how many went; the exit status as the module docstring says."""
    url: str | None = args.database_url
    if not url:
        print("fleetcache purge: give --database-url (or set DATABASE_URL)", file=sys.stderr)
        return 2
    try:
        done = asyncio.run(purge(url, margin=args.margin))
    except NOTHING_TO_INSPECT as exc:
        print(f"fleetcache purge: nothing to purge: {exc}", file=sys.stderr)
        return 2
    except FleetcacheError as exc:
        print(f"fleetcache purge failed: {exc}", file=sys.stderr)
        return 1
    before = datetime.fromtimestamp(done.before_ms / 1000, UTC).isoformat(timespec="seconds")
    print(
        f"purged {done.entries} entries past their stale window (ended before {before}, "
        f"margin {args.margin:g} s) from {done.target}"
    )
    return 0
