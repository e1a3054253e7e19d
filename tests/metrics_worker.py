"""A fleet member for the metrics tests: opens a Postgres cache, exports it to a registry of
its own, and on ``{"op": "get", "names": [...], "callers": C, "compute_ms": N}`` gets every
name with C concurrent callers; ``{"op": "scrape"}`` answers the registry's exposition text.
Served on a worker of a :class:`~fleetcache_cli.shared.Fleet` (:func:`serve`)."""

from __future__ import annotations

import asyncio
import os

from prometheus_client import CollectorRegistry, generate_latest

import fleetcache
from fleetcache import Key, Produced
from fleetcache.contrib import prometheus
from fleetcache_cli.shared import WorkerContext


async def serve(ctx: WorkerContext, url: str) -> None:
    """Open the cache, say ready, answer commands until the fleet closes."""
    registry = CollectorRegistry()
    cache = await fleetcache.open(url)
    prometheus.register(cache, name="fleet", registry=registry)
    ctx.answer({"ready": True, "pid": os.getpid()})
    try:
        while (command := await ctx.command()) is not None:
            if command["op"] == "scrape":
                ctx.answer({"text": generate_latest(registry).decode()})
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
            ctx.answer({"done": len(gets)})
    finally:
        await cache.close()
