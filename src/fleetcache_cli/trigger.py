"""``fleetcache trigger``: print (or, with ``--install``, create) a trigger that invalidates,
in the transaction that changes a row, the names the row maps to.

The trigger calls ``fleetcache_invalidate`` (created by the migrations, schema version 5),
so the cache's invalidation commits, or rolls back, with the change, whoever makes it
(psql, a migration, another service). ``--names`` is SQL you write (a ``text[]`` over the
row ``r``); the table, namespace and generated names are quoted. Exit status 0; 2 for a
bad option or a database without the functions (run ``fleetcache migrate``); 1 when the
database cannot be reached or the DDL fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from fleetcache.errors import FleetcacheError
from fleetcache.stores import queries as q
from fleetcache.stores.payloads import INVALIDATED_CHANNEL
from fleetcache.stores.triggers import invalidation_trigger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="the Postgres URL (needed with --install; default: $DATABASE_URL)",
    )
    parser.add_argument("--table", required=True, help="the table: schema.table or table")
    parser.add_argument("--namespace", required=True, help="the cache namespace to invalidate")
    parser.add_argument(
        "--names",
        required=True,
        metavar="SQL",
        help="a text[] expression over the changed row r, e.g. \"ARRAY['product:' || r.id]\"",
    )
    parser.add_argument("--name", default=None, help="the trigger's and its function's name")
    parser.add_argument(
        "--channel", default=INVALIDATED_CHANNEL, help="the invalidation broadcast's channel"
    )
    parser.add_argument(
        "--install", action="store_true", help="create it in the database instead of printing"
    )


def run(args: argparse.Namespace) -> int:
    """Print or install the trigger; the exit status as the module docstring says."""
    try:
        ddl = invalidation_trigger(
            args.table, args.namespace, args.names, name=args.name, channel=args.channel
        )
    except FleetcacheError as exc:
        print(f"fleetcache trigger: {exc}", file=sys.stderr)
        return 2
    if not args.install:
        print(ddl.as_string(None))
        return 0
    if not args.database_url:
        print("fleetcache trigger: --install needs --database-url", file=sys.stderr)
        return 2
    try:
        with psycopg.connect(args.database_url) as conn, conn.transaction():
            row = conn.execute(q.PG_HAS_INVALIDATE_FUNCTION).fetchone()
            if row is None or not row[0]:
                print(
                    "fleetcache trigger: the database has no fleetcache_invalidate function: "
                    "run fleetcache migrate first",
                    file=sys.stderr,
                )
                return 2
            conn.execute(ddl)
    except psycopg.Error as exc:
        print(f"fleetcache trigger failed: {exc}".strip(), file=sys.stderr)
        return 1
    print(f"installed the invalidation trigger on {args.table} (namespace {args.namespace!r})")
    return 0
