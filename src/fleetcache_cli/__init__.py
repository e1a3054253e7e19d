"""The ``fleetcache`` command line: ``demo`` (the main job), ``bench``, ``migrate``,
``inspect``, ``purge`` and ``trigger``.

A package of its own beside :mod:`fleetcache` (in the same wheel), so the library never
imports it: nothing under ``fleetcache`` knows the command line exists. The demo and the
bench share only :mod:`fleetcache_cli.shared`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: Subcommand -> (module with ``add_arguments(parser)`` and ``run(args) -> int``, summary).
_COMMANDS = {
    "demo": ("fleetcache_cli.demo", "a fleet of processes coalescing on a real Postgres"),
    "bench": ("fleetcache_cli.bench", "fleetcache measured side by side with the minimal design"),
    "migrate": ("fleetcache_cli.migrate", "bring a database to the latest fleetcache schema"),
    "inspect": ("fleetcache_cli.inspect", "what a cache's database holds right now (read-only)"),
    "purge": ("fleetcache_cli.purge", "delete now the entries past their stale window"),
    "trigger": (
        "fleetcache_cli.trigger",
        "print or install a trigger invalidating in the row change's transaction",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fleetcache",
        description="fleetcache: a fleet of processes computes each missing cache entry once.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log fleetcache.* at DEBUG")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, summary) in _COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # The demo and the bench need extras (rich, the definitions layer); migrate does
            # not, so a missing extra must not take the whole command line down with it.
            sub.set_defaults(missing_module=(exc.name or "?").split(".")[0])
            continue
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    missing = getattr(args, "missing_module", None)
    if missing is None and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if missing is not None:
        print(
            f"fleetcache {args.command} needs the module {missing!r}: "
            "pip install 'fleetcache[embedded,definitions,cli]'",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    module = importlib.import_module(_COMMANDS[args.command][0])
    status: int = module.run(args)
    return status
