"""A fleet member for cross-process tests: a real OS process driven by JSON lines.

Started by :class:`tests.fleet.Worker`; reads one JSON command per stdin line and answers
one JSON line on stdout. Commands:

- ``{"op": "invalidate", "ns": ..., "names": [...]}`` (generic lookup)
- ``{"op": "clear_namespace", "ns": ...}`` / ``{"op": "clear_all"}``
- ``{"op": "get", "ns": ..., "name": ..., "compute_ms": N, "version": V, "ttl": T,
  "stale_ttl": S}`` (generic lookup, expiry optional; produces ``{"pid", "name",
  "version", "began"}`` after N ms, ``began`` being the ``time.time()`` at which the
  computation began)
- ``{"op": "definitions", "urls": [...]}`` (definitions lookup over the prerender server,
  all URLs concurrently; answers per URL ``ok``/``error``/``none``/``raised``)
- ``{"op": "invalidate_module", "url": ...}`` (definitions lookup)
- ``{"op": "stats"}``; ``{"op": "exit"}``
Every answer carries ``t_start``/``t_end`` (``time.time()``; one clock on one machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import fleetcache
from fleetcache import Key, Produced
from fleetcache.definitions import CachingDefinitionLookup, HttpPrerenderer, Realm


async def serve(args: argparse.Namespace) -> None:
    """Open the cache, say ready, then answer commands until exit or EOF."""
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
            started = time.time()
            try:
                answer = await run(command, cache, definitions)
            except Exception as exc:  # report, keep serving
                answer = {"raised": f"{type(exc).__name__}: {exc}"}
            answer.update(t_start=started, t_end=time.time())
            say(answer)
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


def say(doc: dict[str, Any]) -> None:
    """Write one JSON line to stdout."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--coordinate", action="store_true")
    parser.add_argument("--near", type=int)
    parser.add_argument("--no-listen", action="store_true")
    parser.add_argument("--prerender")
    parser.add_argument("--realm", action="append", default=[])
    parser.add_argument("--wait-timeout", type=float, default=180.0)
    parser.add_argument("--probe-interval", type=float, default=1.0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
