"""``fleetcache bench`` (being rewritten)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options."""


def run(args: argparse.Namespace) -> int:
    """Run the bench."""
    return 1
