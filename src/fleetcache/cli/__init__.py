"""The ``fleetcache`` command line (layer 7): ``demo`` (the main job) and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: Subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS = {
    "demo": ("fleetcache.cli.demo", "a fleet of processes coalescing on a real Postgres"),
    "bench": ("fleetcache.cli.bench", "measure coordination against the uncoordinated path"),
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
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    module = importlib.import_module(_COMMANDS[args.command][0])
    status: int = module.run(args)
    return status


if __name__ == "__main__":  # pragma: no cover - exercised through the console script
    sys.exit(main())
