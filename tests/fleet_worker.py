"""A fleet member for cross-process tests: a real OS process serving commands.

:func:`start` runs :func:`serve` on one worker of a :class:`~fleetcache_cli.shared.Fleet`
(arguments as on a command line: ``--url``, ``--coordinate``...); it answers each command
(:meth:`~fleetcache_cli.shared.Member.call`) with one dict. Commands:

- ``{"op": "invalidate", "ns": ..., "names": [...]}`` (generic lookup)
- ``{"op": "clear_namespace", "ns": ...}`` / ``{"op": "clear_all"}``
- ``{"op": "get", "ns": ..., "name": ..., "compute_ms": N, "version": V, "ttl": T,
  "stale_ttl": S}`` (generic lookup, expiry optional; produces ``{"pid", "name",
  "version", "began"}`` after N ms, ``began`` being the ``time.time()`` at which the
  computation began)
- ``{"op": "definitions", "urls": [...]}`` (definitions lookup over the prerender server,
  all URLs concurrently; answers per URL ``ok``/``error``/``none``/``raised``)
- ``{"op": "invalidate_module", "url": ...}`` (definitions lookup)
- ``{"op": "stats"}``
Every answer carries ``t_start``/``t_end`` (``time.time()``; one clock on one machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import fleetcache
from fleetcache import Key, Produced
from fleetcache.definitions import CachingDefinitionLookup, HttpPrerenderer, Realm
from fleetcache_cli.shared import Fleet, Member, WorkerContext


async def start(fleet: Fleet[Any, Any], index: int, *argv: str) -> Member:
    """Serve on worker ``index`` of ``fleet`` with command-line arguments ``argv``; return
    it once its cache is open."""
    member = fleet.serve(index, serve, list(argv))
    ready = await member.receive()
    assert ready.get("ready"), ready
    return member


async def serve(ctx: WorkerContext, argv: list[str]) -> None:
    """Open the cache, say ready, then answer commands until the fleet closes."""
    args = parse(argv)
    cache = await fleetcache.open(
        args.url,
        coordinate=args.coordinate,
        near=args.near,
        wait_timeout=args.wait_timeout,
        probe_interval=args.probe_interval,
    )
    if args.no_listen and cache.listener is not None:
        await cache.listener.close()
    prerenderer = (
        HttpPrerenderer(args.prerender, auth=lambda realm_url, user_id: f"token:{user_id}")
        if args.prerender
        else None
    )
    definitions = CachingDefinitionLookup(cache, prerenderer) if prerenderer else None
    for realm in args.realm:
        url, visibility, owner = realm.split(",")
        if definitions is not None:
            definitions.register_realm(Realm(url, visibility, owner))  # type: ignore[arg-type]
    ctx.answer({"ready": True, "pid": os.getpid()})
    try:
        while (command := await ctx.command()) is not None:
            started = time.time()
            try:
                answer = await run(command, cache, definitions)
            except Exception as exc:  # report, keep serving
                answer = {"raised": f"{type(exc).__name__}: {exc}"}
            answer.update(t_start=started, t_end=time.time())
            ctx.answer(answer)
    finally:
        if prerenderer is not None:
            await prerenderer.aclose()
        await cache.close()


async def run(
    command: dict[str, Any], cache: Any, definitions: CachingDefinitionLookup | None
) -> dict[str, Any]:
    """Carry out one command."""
    op = command["op"]
    lookup = cache.lookup
    if op == "invalidate":
        return {"names": await lookup.invalidate(command["ns"], command["names"])}
    if op == "clear_namespace":
        await lookup.clear_namespace(command["ns"])
        return {}
    if op == "clear_all":
        await lookup.clear_all()
        return {}
    if op == "get":
        delay = command.get("compute_ms", 0) / 1000

        async def produce(key: Key) -> Produced[Any]:
            began = time.time()
            await asyncio.sleep(delay)
            value = {"pid": os.getpid(), "name": key.name, "version": command.get("version")}
            return Produced(value={**value, "began": began})

        expiry = {k: command[k] for k in ("ttl", "stale_ttl") if k in command}
        entry = await lookup.get(Key(command["ns"], command["name"]), produce, **expiry)
        return {"value": None if entry is None else entry.value}
    if op == "stats":
        return {"stats": cache.stats()}
    assert definitions is not None, "start the worker with --prerender for definitions"
    if op == "invalidate_module":
        return {"urls": await definitions.invalidate(command["url"])}
    if op == "definitions":

        async def one(url: str) -> dict[str, Any]:
            try:
                module = await definitions.get_cached_definitions(url)
            except Exception as exc:
                return {"url": url, "outcome": "raised", "error": f"{type(exc).__name__}: {exc}"}
            if module is None:
                return {"url": url, "outcome": "none"}
            return {
                "url": url,
                "outcome": "error" if module.error else "ok",
                "definitions": module.definitions,
                "t": time.time(),
            }

        return {"results": await asyncio.gather(*(one(url) for url in command["urls"]))}
    raise ValueError(f"unknown op {op!r}")


def parse(argv: list[str]) -> argparse.Namespace:
    """The member's options, from command-line arguments."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--coordinate", action="store_true")
    parser.add_argument("--near", type=int)
    parser.add_argument("--no-listen", action="store_true")
    parser.add_argument("--prerender")
    parser.add_argument("--realm", action="append", default=[])
    parser.add_argument("--wait-timeout", type=float, default=180.0)
    parser.add_argument("--probe-interval", type=float, default=1.0)
    return parser.parse_args(argv)
