"""Measure how long the memory store's invalidation of one shared dep blocks the event loop.

The store holds ``--dependents`` entries (each with an alias and two deps) that all depend
on one name, plus ``--unrelated`` entries that do not; invalidating the shared name reaches
every dependent (its name and alias: twice as many names) and nothing else. The memory
store never awaits inside an operation, so the call's duration is how long the loop is
blocked. Prints the median of ``--runs`` runs, and the cost per entry reached.

    PYTHONPATH=src python scripts/measure_memory_invalidation.py --dependents 53600
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from fleetcache.stores.base import Entry, Key
from fleetcache.stores.memory import MemoryStore

NS = "https://realm.example/"
HUB = NS + "hub.gts"


async def one_run(dependents: int, unrelated: int) -> tuple[float, int]:
    """Fill a store, invalidate the shared name; its duration (s) and the names reached."""
    store = MemoryStore()
    for i in range(dependents):
        deps = (HUB, f"{NS}x{i % 50}.gts")
        await store.write(
            Entry(Key(NS, f"{NS}card-{i}.gts"), {"i": i}, deps, alias=f"{NS}card-{i}")
        )
    for i in range(unrelated):
        await store.write(Entry(Key(NS, f"{NS}other-{i}.gts"), {"i": i}, (f"{NS}y{i % 50}",)))
    started = time.perf_counter()
    names = await store.invalidate(NS, [HUB])
    return time.perf_counter() - started, len(names)


def main() -> None:
    """Parse the arguments, run, print the median."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dependents", type=int, default=53_600)
    parser.add_argument("--unrelated", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [asyncio.run(one_run(args.dependents, args.unrelated)) for _ in range(args.runs)]
    median = statistics.median(seconds for seconds, _ in runs)
    print(
        f"{args.dependents} dependents (+{args.unrelated} unrelated entries): "
        f"{runs[0][1]} names invalidated, loop blocked {median * 1000:.0f} ms "
        f"(median of {args.runs}; {median / args.dependents * 1e6:.1f} us per entry reached)"
    )


if __name__ == "__main__":
    main()
