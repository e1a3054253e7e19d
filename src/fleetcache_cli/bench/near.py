"""The read-heavy scenario (issue 12): the near tier off vs on.

P processes x C tasks read K warm keys, picked with a Zipf-like skew (weight of the i-th
hottest key 1 / (i + 1)^1.1), for a fixed time; worker 0 also invalidates a few of the hot
keys per second. Each key has a version in the bench's table ``bench_near_versions``: the
invalidator bumps it (and commits) before it calls ``invalidate``, and a computation stores
the version it read. So after the n-th invalidation of a key returned, every fresh answer
has version >= n.

**Stale read**: a read that began after the n-th invalidation of its key returned (at the
invalidator) *and* after this process had applied it (a peer: its listener's call of
``on_names_invalidated``; the invalidator: its own ``invalidate`` returning, which evicts
here first), yet returned a version < n. Each process checks that for its own reads as it
goes (it knows how many invalidations of each key it has applied, so a read returning an
older version is a candidate) and reports the candidates; the parent keeps those that
also began after the invalidation returned.

**Staleness window**: for every peer, the time from the invalidation's commit (when the
invalidator's store call returned: its transaction, which sends the broadcast, committed)
to the moment the peer applied the broadcast (evicted its copies).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

import fleetcache
from fleetcache_cli.shared import WorkerContext, percentile

CREATE_TABLE = """
    CREATE TABLE IF NOT EXISTS bench_near_versions (
        namespace text NOT NULL, name text NOT NULL, version integer NOT NULL,
        PRIMARY KEY (namespace, name))
"""
FILL_VERSIONS = """
    INSERT INTO bench_near_versions (namespace, name, version)
    SELECT %(ns)s, 'row-' || i, 0 FROM generate_series(0, %(keys)s - 1) AS i
"""
_BUMP = """
    UPDATE bench_near_versions SET version = version + 1
    WHERE namespace = %(ns)s AND name = %(name)s RETURNING version
"""
_VERSION = "SELECT version FROM bench_near_versions WHERE namespace = %(ns)s AND name = %(name)s"
#: How many of the hottest keys the invalidator picks from.
HOT_KEYS = 20


@dataclass(frozen=True, slots=True)
class NearSpec:
    """One worker's part of a near-scenario run."""

    url: str
    near: int | None
    pool_size: int
    tasks: int
    keys: int
    seconds: float
    namespace: str
    seed: str
    invalidations: tuple[int, ...]  # key indexes, in order; only the invalidator uses them
    invalidation_interval: float
    invalidator: bool


def invalidation_plan(seed: str, keys: int, count: int) -> tuple[int, ...]:
    """Which keys the invalidator invalidates, in order: hot ones (a stale copy of a hot
    key is the one most likely to be read)."""
    rng = random.Random(f"{seed}:invalidations")
    return tuple(rng.randrange(min(HOT_KEYS, keys)) for _ in range(count))


async def near_worker(ctx: WorkerContext, spec: NearSpec) -> dict[str, Any]:
    """Read for ``spec.seconds``; the invalidator also invalidates. Returns the reads
    done, stale-read candidates ``(key, n, start)``, applied invalidations ``(key, n,
    time)`` and (invalidator) each invalidation's ``(key, n, committed, returned)``."""
    cache = await fleetcache.open(spec.url, pool_size=spec.pool_size, near=spec.near)
    source = await psycopg.AsyncConnection.connect(spec.url, autocommit=True)
    source_lock = asyncio.Lock()  # one statement at a time on the source connection
    key_names = [f"row-{i}" for i in range(spec.keys)]
    index = {name: i for i, name in enumerate(key_names)}
    keys = [fleetcache.Key(spec.namespace, name) for name in key_names]
    applied_count: Counter[int] = Counter()  # invalidations of each key applied here
    applied: list[tuple[int, int, float]] = []
    candidates: list[tuple[int, int, float]] = []
    invalidations: list[tuple[int, int, float, float]] = []
    committed: list[float] = []

    def note_applied(names: Sequence[str]) -> None:
        now = time.time()
        for name in names:
            if name in index:
                applied_count[index[name]] += 1
                applied.append((index[name], applied_count[index[name]], now))

    hear = cache.lookup.on_names_invalidated

    def heard(namespace: str, names: Sequence[str]) -> None:
        hear(namespace, names)  # evicts first; the time noted is after the eviction
        if namespace == spec.namespace:
            note_applied(names)

    cache.lookup.on_names_invalidated = heard  # type: ignore[method-assign]
    if spec.invalidator:
        store = cache.lookup.store
        invalidate = store.invalidate

        async def invalidating(namespace: str, names: Sequence[str], **kwargs: Any) -> list[str]:
            closure = await invalidate(namespace, names, **kwargs)
            committed.append(time.time())  # right after the commit that sent the broadcast
            return closure

        store.invalidate = invalidating  # type: ignore[method-assign]

    async def produce(key: fleetcache.Key) -> fleetcache.Produced[Any]:
        async with source_lock:
            cursor = await source.execute(_VERSION, {"ns": key.namespace, "name": key.name})
            row = await cursor.fetchone()
        return fleetcache.Produced({"v": 0 if row is None else row[0]})

    weights = list(itertools.accumulate(1 / (i + 1) ** 1.1 for i in range(spec.keys)))
    reads = 0

    async def reader(task: int, until: float) -> None:
        nonlocal reads
        rng = random.Random(f"{spec.seed}:{task}")
        while time.time() < until:
            for i in rng.choices(range(spec.keys), cum_weights=weights, k=100):
                n = applied_count[i]
                started = time.time()
                entry = await cache.get(keys[i], produce)
                reads += 1
                if entry is None or entry.value["v"] < n:
                    candidates.append((i, n, started))
                # A near hit never suspends: yield, so the listener runs as in any app.
                await asyncio.sleep(0)

    async def invalidator(until: float) -> None:
        for i in spec.invalidations:
            await asyncio.sleep(spec.invalidation_interval)
            if time.time() >= until:
                return
            async with source_lock:
                cursor = await source.execute(_BUMP, {"ns": spec.namespace, "name": key_names[i]})
                row = await cursor.fetchone()
            assert row is not None
            started = time.time()
            await cache.invalidate(spec.namespace, [key_names[i]])
            returned = time.time()
            note_applied([key_names[i]])
            invalidations.append((i, row[0], committed[-1] if committed else started, returned))

    try:
        for key in keys:  # warm: every key read once here (fills the near tier when on)
            await cache.get(key, produce)
        release_at = await ctx.ready()
        until = release_at + spec.seconds
        jobs = [reader(t, until) for t in range(spec.tasks)]
        if spec.invalidator:
            jobs.append(invalidator(until))
        await asyncio.gather(*jobs)
        ended = time.time()
        stats = cache.stats()
    finally:
        await source.close()
        await cache.close()
    return {
        "worker": ctx.index,
        "reads": reads,
        "seconds": ended - release_at,
        "candidates": candidates,
        "applied": applied,
        "invalidations": invalidations,
        "near_hits": stats["lookup"].get("near_hits", 0),
        "gaps": stats["lookup"].get("notification_gaps", 0),
    }


def analyse_near(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One near run's throughput, stale reads and staleness window."""
    invalidations = [inv for r in results for inv in r["invalidations"]]
    returned = {(i, n): ret for i, n, _, ret in invalidations}
    commit = {(i, n): com for i, n, com, _ in invalidations}
    stale = 0
    for result in results:
        for i, n, started in result["candidates"]:
            # n invalidations were applied here when the read began; stale only if the
            # n-th had also returned at the invalidator by then.
            if n and started > returned.get((i, n), float("inf")):
                stale += 1
    windows = [
        at - commit[(i, n)]
        for r in results
        if r["worker"] != 0
        for i, n, at in r["applied"]
        if (i, n) in commit
    ]
    reads = sum(r["reads"] for r in results)
    seconds = max(r["seconds"] for r in results)
    return {
        "reads": reads,
        "reads_per_s": round(reads / seconds, 1) if seconds > 0 else None,
        "near_hits": sum(r["near_hits"] for r in results),
        "invalidations": len(invalidations),
        "stale_reads": stale,
        "stale_candidates": sum(len(r["candidates"]) for r in results),
        "window_ms_p50": None if not windows else round(1000 * (percentile(windows, 50) or 0), 3),
        "window_ms_p99": None if not windows else round(1000 * (percentile(windows, 99) or 0), 3),
        "windows": len(windows),
        "gaps": sum(r["gaps"] for r in results),
    }
