"""A fleet member for the metrics tests: opens a Postgres cache, exports it to a registry of
its own, and on ``{"op": "get", "names": [...], "callers": C, "compute_ms": N}`` gets every
name with C concurrent callers; ``{"op": "scrape"}`` answers the registry's exposition text.
Driven by :class:`tests.fleet.Worker` (one JSON line in, one out)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

import fleetcache
from fleetcache import Key, Produced
from fleetcache.contrib import prometheus


def say(answer: dict[str, Any]) -> None:
    """Write one answer line."""
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


async def serve(url: str) -> None:
    """Open the cache, say ready, answer commands until exit or EOF."""
    registry = CollectorRegistry()
    cache = await fleetcache.open(url)
    prometheus.register(cache, name="fleet", registry=registry)
    loop = asyncio.get_running_loop()
    say({"ready": True, "pid": os.getpid()})
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            if command["op"] == "exit":
                break
            if command["op"] == "scrape":
                say({"text": generate_latest(registry).decode()})
                continue
            delay = command["compute_ms"] / 1000

            async def produce(key: Key, delay: float = delay) -> Produced[str]:
                await asyncio.sleep(delay)
                return Produced(f"{key.name} by {os.getpid()}")

            gets = [
                cache.get(Key("metrics", name), produce)
                for name in command["names"]
                for _ in range(command["callers"])
            ]
            await asyncio.gather(*gets)
            say({"done": len(gets)})
    finally:
        await cache.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
