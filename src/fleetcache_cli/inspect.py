"""``fleetcache inspect``: what a cache's database holds right now, as tables or JSON.

Runs :func:`fleetcache.inspection.inspect` (read-only: it never creates or migrates
anything). Exit status 0 with the report; 2 when there is nothing to inspect (no schema,
an older or newer one, ``memory://``, no URL); 1 when the database cannot be reached or
a statement fails. ``--json`` needs no extra; the tables need rich (the ``cli`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fleetcache.errors import (
    ConfigurationError,
    FleetcacheError,
    SchemaMissingError,
    SchemaVersionError,
)
from fleetcache.inspection import TOP_NAMESPACES, AdvisoryLock, CacheReport, inspect

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: Errors that mean "nothing to inspect here" (exit 2) rather than a failure (exit 1).
NOTHING_TO_INSPECT = (ConfigurationError, SchemaMissingError, SchemaVersionError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="a Postgres URL or connection string, or sqlite:///path (default: $DATABASE_URL)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--top",
        type=int,
        default=TOP_NAMESPACES,
        metavar="N",
        help=f"list the N largest namespaces (default {TOP_NAMESPACES})",
    )


def run(args: argparse.Namespace) -> int:
    """Inspect and print; the exit status as the module docstring says."""
    url: str | None = args.database_url
    if not url:
        print("fleetcache inspect: give --database-url (or set DATABASE_URL)", file=sys.stderr)
        return 2
    console = None
    if not args.json:
        try:
            from rich.console import Console  # noqa: PLC0415 - only the tables need rich
        except ImportError:
            print(
                "fleetcache inspect needs the module 'rich' for its tables: pip install "
                "'fleetcache[cli]', or pass --json",
                file=sys.stderr,
            )
            return 2
        console = Console()
    try:
        report = asyncio.run(inspect(url, top=args.top))
    except NOTHING_TO_INSPECT as exc:
        print(f"fleetcache inspect: nothing to inspect: {exc}", file=sys.stderr)
        return 2
    except FleetcacheError as exc:
        print(f"fleetcache inspect failed: {exc}", file=sys.stderr)
        return 1
    if console is None:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        render(report, console)
    return 0


# ------------------------------------------------------------------------ the tables


def size(n: int) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``3.2 MiB``..."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def age(seconds: float) -> str:
    """A duration for people: ``42 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _moment(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    when = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
    return f"{when} ({age(max(0, now_ms - ms) / 1000)} ago)"


def render(report: CacheReport, console: Console) -> None:
    """Print the report as rich tables."""
    from rich.table import Table  # noqa: PLC0415 - rich is imported only to print tables

    console.print(
        f"[bold]{report.target}[/bold] ({report.backend} {report.server_version}), "
        f"fleetcache schema version {report.schema_version}"
    )
    entries = Table(title="Entries", show_header=False)
    entries.add_column("what")
    entries.add_column("value", justify="right")
    rows = [
        ("entries", f"{report.entries:,}"),
        ("values", size(report.value_bytes)),
        ("on disk" if report.backend == "postgres" else "file", size(report.storage_bytes)),
        ("namespaces", f"{report.namespaces:,}"),
        ("oldest entry", _moment(report.oldest_created_at_ms, report.now_ms)),
        ("newest entry", _moment(report.newest_created_at_ms, report.now_ms)),
        ("fresh", f"{report.fresh:,} ({report.without_expiry:,} never expire)"),
        ("stale (in their stale window)", f"{report.stale:,}"),
        ("dead (past their stale window)", f"{report.dead:,}"),
        ("cached errors", f"{report.errors:,}"),
    ]
    for what, value in rows:
        entries.add_row(what, value)
    console.print(entries)

    if report.top_namespaces:
        spaces = Table(
            title=f"Largest namespaces ({len(report.top_namespaces)} of {report.namespaces})"
        )
        for column in ("namespace", "entries", "values", "stale", "dead"):
            spaces.add_column(column, justify="left" if column == "namespace" else "right")
        for ns in report.top_namespaces:
            spaces.add_row(
                ns.namespace,
                f"{ns.entries:,}",
                size(ns.value_bytes),
                f"{ns.stale:,}",
                f"{ns.dead:,}",
            )
        console.print(spaces)

    marks = Table(title="Invalidation marks")
    for column in ("kind", "marks", "oldest", "newest"):
        marks.add_column(column, justify="left" if column == "kind" else "right")
    for mark in report.marks:
        marks.add_row(
            mark.kind, f"{mark.count:,}", age(mark.oldest_age_seconds), age(mark.newest_age_seconds)
        )
    if not report.marks:
        marks.add_row("(none)", "0", "-", "-")
    console.print(marks)

    activity = report.activity
    if activity is None:
        console.print(
            "Locks and backends: not applicable (sqlite has no server: no fleet-wide locks, "
            "no backends)"
        )
        return
    for title, locks in (
        ("Advisory locks held", activity.held),
        ("Waiting for an advisory lock", activity.waiting),
    ):
        console.print(_locks_table(title, locks))
    connections = Table(
        title=f"Connections to this database ({activity.server_connections} of "
        f"max_connections {activity.max_connections} on the server)"
    )
    for column in ("application_name", "total", "active", "idle", "idle in xact", "lock wait"):
        connections.add_column(column, justify="left" if column == "application_name" else "right")
    for group in activity.connections:
        connections.add_row(
            group.application_name or "(none)",
            str(group.total),
            str(group.active),
            str(group.idle),
            str(group.idle_in_transaction),
            str(group.waiting_for_lock),
        )
    console.print(connections)


def _locks_table(title: str, locks: tuple[AdvisoryLock, ...]) -> Table:
    from rich.table import Table  # noqa: PLC0415

    waiting = any(lock.waiting_seconds is not None for lock in locks)
    table = Table(title=f"{title}: {len(locks)}")
    columns = ["kind", "lock", "namespace", "mode", "pid", "application_name", "state"]
    if waiting:
        columns += ["waiting", "blocked by"]
    for column in columns:
        table.add_column(column)
    for lock in locks:
        cells = [
            lock.kind,
            str(lock.lock),
            lock.namespace or "-",
            lock.mode,
            str(lock.pid),
            lock.application_name or "-",
            lock.state or "-",
        ]
        if waiting:
            cells += [
                age(lock.waiting_seconds or 0.0),
                ", ".join(str(pid) for pid in lock.blocked_by) or "-",
            ]
        table.add_row(*cells)
    return table
