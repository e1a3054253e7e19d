"""A fleet member for the connection-fault tests, and :func:`start` to run one.

On a worker of a :class:`~fleetcache_cli.shared.Fleet` (a real OS process) it opens
``fleetcache.open(url, **options)`` and answers ``{"ready": true, "pid": ...}``, or — if
opening fails — ``{"ready": false, "error": <type>, "message": ..., "cause": ...,
"elapsed": <seconds the open took>}`` and serves nothing. Then it answers each command:

- ``{"op": "get", "ns", "name", "compute_s", "tag"}``: ``get`` with a producer that sleeps
  ``compute_s`` (0.1 s when it runs again for the same command) and returns ``{"pid",
  "tag", "began"}`` (``began``: ``time.time()`` when it began); answers ``{"value": ...}``
- ``{"op": "gets", "ns", "names", "compute_s", "tag"}``: those gets concurrently; answers
  ``{"values": [...], "errors": [...]}``
- ``{"op": "invalidate", "ns", "names"}``, ``{"op": "peek", "ns", "name"}``,
  ``{"op": "stats"}`` (``{"stats": cache.stats(), "computed": <computations so far>}``)
Every answer carries ``t_end`` (``time.time()``); a failed command answers ``{"raised"}``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import fleetcache
from fleetcache import Key, Produced
from fleetcache_cli.shared import Fleet, Member, WorkerContext


async def start(
    fleet: Fleet[Any, Any], index: int, url: str, **options: Any
) -> tuple[Member, dict[str, Any]]:
    """Make worker ``index`` of ``fleet`` a member opening ``url`` with ``options``; return
    it and its first answer (``ready`` true, or false with the error)."""
    member = fleet.serve(index, serve, (url, options))
    return member, await member.receive()


#: How many computations this process ran (written by produce, read by "stats").
COMPUTED = [0]


async def run(command: dict[str, Any], cache: Any) -> dict[str, Any]:
    """Carry out one command."""
    op = command["op"]
    if op in ("get", "gets"):
        delays = [float(command.get("compute_s", 0))]

        async def produce(key: Key) -> Produced[Any]:
            COMPUTED[0] += 1
            began = time.time()
            delay = delays[0]
            delays[0] = min(delay, 0.1)  # a computation run again (refused) is quick
            await asyncio.sleep(delay)
            return Produced(value={"pid": os.getpid(), "tag": command.get("tag"), "began": began})

        async def one(name: str) -> Any:
            entry = await cache.get(Key(command["ns"], name), produce)
            return None if entry is None else entry.value

        if op == "get":
            return {"value": await one(command["name"])}
        outcomes = await asyncio.gather(
            *(one(name) for name in command["names"]), return_exceptions=True
        )
        return {
            "values": [o for o in outcomes if not isinstance(o, BaseException)],
            "errors": [
                f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)
            ],
        }
    if op == "invalidate":
        return {"names": await cache.invalidate(command["ns"], command["names"])}
    if op == "stats":
        return {"stats": cache.stats(), "computed": COMPUTED[0]}
    if op == "peek":
        entry = await cache.peek(Key(command["ns"], command["name"]))
        return {"value": None if entry is None else entry.value}
    raise ValueError(f"unknown op {op!r}")


async def serve(ctx: WorkerContext, arg: tuple[str, dict[str, Any]]) -> None:
    """Open, say whether that worked, then answer commands until the fleet closes."""
    url, options = arg
    began = time.monotonic()
    try:
        cache = await fleetcache.open(url, **options)
    except Exception as exc:  # reported to the test, which judges it
        ctx.answer(
            {
                "ready": False,
                "error": type(exc).__name__,
                "message": str(exc),
                "cause": getattr(exc, "cause", None),
                "elapsed": time.monotonic() - began,
            }
        )
        return
    ctx.answer({"ready": True, "pid": os.getpid(), "elapsed": time.monotonic() - began})
    try:
        while (command := await ctx.command()) is not None:
            try:
                answer = await run(command, cache)
            except Exception as exc:  # report, keep serving
                answer = {"raised": f"{type(exc).__name__}: {exc}"}
            answer["t_end"] = time.time()
            ctx.answer(answer)
    finally:
        await cache.close()
