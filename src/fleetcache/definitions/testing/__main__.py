"""``python -m fleetcache.definitions.testing``: serve a simulated prerenderer for a graph.

It prints its base URL as the first line of stdout and serves until SIGTERM or SIGINT;
:func:`~fleetcache.definitions.testing.start_in_subprocess` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Mapping, Sequence

from fleetcache.definitions.testing._graph import ModuleSpec, graph_from_json
from fleetcache.definitions.testing._server import SimulatedPrerenderServer


async def _serve_until_signalled(
    graph: Mapping[str, ModuleSpec], latency: float, host: str, port: int
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with SimulatedPrerenderServer(graph, latency=latency, host=host, port=port) as server:
        # The parent reads this first line to learn where we listen.
        sys.stdout.write(server.base_url + "\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve a graph until SIGTERM/SIGINT, printing the base URL first."""
    parser = argparse.ArgumentParser(
        prog="python -m fleetcache.definitions.testing",
        description="Serve a simulated prerenderer for a module graph given as JSON.",
    )
    parser.add_argument("--graph", required=True, help="graph JSON file ('-' for stdin)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="render latency (ms)")
    parser.add_argument("--port", type=int, default=0, help="port (0: a random free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)
    if args.graph == "-":
        raw = json.load(sys.stdin)
    else:
        with open(args.graph, encoding="utf-8") as source:
            raw = json.load(source)
    graph = graph_from_json(raw)
    asyncio.run(_serve_until_signalled(graph, args.latency_ms / 1000, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
