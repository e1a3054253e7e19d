"""One side of the store race test, as its own OS process (``test_store_races.py``).

Served on a worker of a :class:`~fleetcache_cli.shared.Fleet` with ``("postgres" or
"sqlite", URL_OR_PATH)`` (:func:`serve`); answers each command:

* ``{"op": "populate", "x": X, "d": D, "delay": s}``: take a stamp for D and read X (D's
  computation reads its dependency after the stamp), wait ``delay`` seconds, then write D
  (deps ``[X]``, value saying whether X was the old one) under the stamp. Answers the
  times and whether the write was accepted.
* ``{"op": "invalidate", "x": X, "delay": s, "hold": h}``: wait ``delay`` seconds, then
  invalidate X; ``expand`` sleeps ``h`` seconds on each name (inside the invalidation's
  transaction, widening any window an implementation might leave). Answers the times and
  the closure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from fleetcache.stores.base import Entry, Key, Store
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore
from fleetcache_cli.shared import WorkerContext

NS = "https://race.example/"


async def populate(store: Store, command: dict[str, Any]) -> dict[str, Any]:
    """D's populate, computed from whatever X it reads after its stamp."""
    t_stamp = time.time()
    stamp, _ = await store.stamp_and_read(Key(NS, command["d"]), [command["d"]])
    x = await store.read(Key(NS, command["x"]))
    saw_old = x is not None and x.value == {"v": "old"}
    await asyncio.sleep(command["delay"])
    t_write = time.time()
    entry = Entry(Key(NS, command["d"]), {"from": "old" if saw_old else "new"}, (command["x"],))
    wrote = await store.write(entry, stamp=stamp)
    return {"t_stamp": t_stamp, "saw_old": saw_old, "t_write": t_write,
            "t_written": time.time(), "wrote": wrote}  # fmt: skip


async def invalidate(store: Store, command: dict[str, Any]) -> dict[str, Any]:
    """X's invalidation, with ``hold`` seconds spent inside each expand call."""
    hold = command["hold"]

    def expand(name: str) -> Iterable[str]:
        time.sleep(hold)
        return (name,)

    await asyncio.sleep(command["delay"])
    t_start = time.time()
    names = await store.invalidate(NS, [command["x"]], expand=expand)
    return {"t_start": t_start, "t_end": time.time(), "names": names}


async def serve(ctx: WorkerContext, arg: tuple[str, str]) -> None:
    """Open the store, then serve commands until the fleet closes."""
    kind, target = arg
    store: Store = PostgresStore(target, max_size=2) if kind == "postgres" else SqliteStore(target)
    await store.open()
    ctx.answer({"ready": True})
    try:
        while (command := await ctx.command()) is not None:
            handler = populate if command["op"] == "populate" else invalidate
            ctx.answer(await handler(store, command))
    finally:
        await store.close()
