"""``fleetcache bench``: fleetcache measured side by side with the minimal design.

Fleet scenarios (real OS processes, both designs with the same processes, keys and
timing; medians of the repetitions):

=========  =================================================
default    P=8 processes x C=4 tasks, K=50 cold keys, D=200 ms
fast       D=20 ms, otherwise as default
hotkey     K=1, otherwise as default
p16        P=16, otherwise as default
fleet      64 x 2 x 10,000 keys through PgBouncer, max_connections = 100
=========  =================================================

Then the ``local`` scenario (:mod:`.local`: the embedded sqlite file shared by 4
processes, beside diskcache; needs no Postgres), the ``sync`` scenario (:mod:`.sync`: the
sync API and the Django backend beside Django's ``DatabaseCache``), the read-heavy
near-tier scenario
(tier off vs on), the xmin probe (does a long computation hold a transaction or a
snapshot?) and the one-process micro-benchmarks. The
report is JSON (``--json PATH``, or stdout) plus tables drawn with rich, with every target
of issues 9, 11, 12 and 19 judged (met, missed and by how much). The exit status is 1 only
when something *failed* (a worker, a request, a deadline); a missed target is reported,
not an error.

Modules: :mod:`~fleetcache_cli.bench.config` (options), :mod:`.minimal` (the contender),
:mod:`.probes` (statement counter, connection ledger, recording coordinator),
:mod:`.fleet_run` (a fleet scenario's worker and metrics), :mod:`.near`, :mod:`.xmin`,
:mod:`.micro`, :mod:`.targets`, :mod:`.report` (tables), :mod:`.runner` (the order of it all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import psycopg

from fleetcache.errors import FleetcacheError
from fleetcache_cli.bench.config import add_arguments, resolve_config
from fleetcache_cli.shared import command_database, redacted

__all__ = ["add_arguments", "run"]

_EMBEDDED_DATABASE = "fleetcache_bench"


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the bench described by ``args``; 0 unless something failed."""
    # Imported here: worker processes import this package to reach their job, and need
    # neither rich nor the driver of the whole run.
    from rich.console import Console  # noqa: PLC0415

    from fleetcache_cli.bench.report import render  # noqa: PLC0415

    try:
        report = _run_report(args)
    except (FleetcacheError, psycopg.Error) as exc:
        _progress(f"error: {exc}")
        return 1
    to_stdout = args.json in (None, "-")
    render(report, Console(stderr=to_stdout))  # stdout stays pure JSON when it gets the JSON
    text = json.dumps(report, indent=2, default=str)
    if to_stdout:
        sys.stdout.write(text + "\n")
    else:
        with open(args.json, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        _progress(f"report written to {args.json}")
    return 0 if report["ok"] else 1


def _run_report(args: argparse.Namespace) -> dict[str, Any]:
    from fleetcache_cli.bench.runner import Bench  # noqa: PLC0415 - see run()

    config = resolve_config(args)
    if not config.postgres:  # the local scenario alone needs no server
        return asyncio.run(Bench(config, "", uuid.uuid4().hex[:8], _progress).run())
    if args.database_url is None:
        _progress("starting an embedded PostgreSQL")
    # The largest fleet: 2P processes, each with its pool and one direct connection (the
    # fleet scenario brings its own server, with max_connections = 100).
    slots = max(100, 2 * config.processes * config.budget + 40)
    with command_database(args.database_url, _EMBEDDED_DATABASE, max_connections=slots) as (
        url,
        embedded,
    ):
        bench = Bench(config, url, uuid.uuid4().hex[:8], _progress)
        report = asyncio.run(bench.run())
    report["machine"]["database"] = "embedded" if embedded else "external"
    if not embedded:
        report["machine"]["database_url"] = redacted(url)
    return report
