"""A fleet member under load, for the lock-waiting tests (``test_store_lock_waits.py``).

Served on a worker of a :class:`~fleetcache_cli.shared.Fleet` with ``(URL, POOL_SIZE)``
(:func:`serve`). Opens ``fleetcache.open(URL, pool_size=..., coordinate=False)``, says
ready, then answers each command:

* ``{"op": "load", "write_ns": W, "writers": n, "read_ns": R, "names": [...],
  "readers": m}``: start ``n`` tasks each writing one entry of W (once), and ``m`` tasks
  reading the names of R (hits) in a loop; answers at once.
* ``{"op": "counts"}``: writes started and finished, reads answered, errors (strings).

When the fleet closes it stops the readers, waits for the writers and closes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fleetcache
from fleetcache import Key, Produced
from fleetcache.stores.base import Entry
from fleetcache_cli.shared import WorkerContext


async def never(key: Key) -> Produced[Any]:
    """The readers only read entries the test stored; computing one is an error."""
    raise AssertionError(f"computed {key.coalesce_key}: it should have been a hit")


async def serve(ctx: WorkerContext, arg: tuple[str, int]) -> None:
    """Answer commands until the fleet closes."""
    url, pool_size = arg
    cache = await fleetcache.open(url, pool_size=pool_size, coordinate=False)
    counts: dict[str, Any] = {"writes_started": 0, "writes_done": 0, "reads": 0, "errors": []}
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def write(ns: str, i: int) -> None:
        counts["writes_started"] += 1
        try:
            await cache.store.write(Entry(Key(ns, f"{ns}w{i}"), {"i": i}))
        except Exception as exc:  # reported to the test
            counts["errors"].append(f"write: {type(exc).__name__}: {exc}")
        counts["writes_done"] += 1

    async def read(ns: str, names: list[str], task: int) -> None:
        n = task
        while not stop.is_set():
            try:
                await cache.get(Key(ns, names[n % len(names)]), never)
            except Exception as exc:  # reported to the test
                counts["errors"].append(f"read: {type(exc).__name__}: {exc}")
                return
            counts["reads"] += 1
            n += 1

    ctx.answer({"ready": True})
    try:
        while (command := await ctx.command()) is not None:
            if command["op"] == "load":
                tasks += [
                    asyncio.create_task(write(command["write_ns"], i))
                    for i in range(command["writers"])
                ]
                tasks += [
                    asyncio.create_task(read(command["read_ns"], command["names"], i))
                    for i in range(command["readers"])
                ]
                ctx.answer({})
            elif command["op"] == "counts":
                ctx.answer(dict(counts))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cache.close()
