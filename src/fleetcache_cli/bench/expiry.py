"""The expiry scenario (issue 13): a few hot keys with a short TTL and a stale window.

P processes x C tasks read H hot keys (uniformly) for a fixed time, every value living
``ttl`` seconds and then served stale for ``stale_ttl`` more while one process of the fleet
refreshes it (its computation takes D ms). First a warm phase with the same load and no
expiry gives the warm-hit latency to compare with.

* **Refreshes per expiry**: every computation of the run that finished is recorded with
  its start time (one cancelled when its worker closes at the end of the run stored nothing);
  per key, computations closer together than half the TTL belong to one expiry (the next
  expiry of a refreshed value is a TTL later). Computations / expiries is exactly 1.0 when
  every expiry was refreshed once across the fleet; a duplicate refresh shows as more.
* **Caller latency during refresh windows**: the p99 of the requests that were answered
  with a stale value (that is, while a refresh was due or under way), against the warm
  phase's p99.
* **Stale values served**: how many requests got a value past its expiry (the lookup's
  ``stale_served``), and how many callers had to wait for a computation instead (a value
  past its stale window, which the stale window is there to avoid).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fleetcache
from fleetcache_cli.shared import WorkerContext, percentile


@dataclass(frozen=True, slots=True)
class ExpirySpec:
    """One worker's part of an expiry-scenario run."""

    url: str
    pool_size: int
    tasks: int
    keys: int
    compute_ms: float
    ttl: float
    stale_ttl: float
    warm_seconds: float
    seconds: float
    namespace: str
    seed: str


async def expiry_worker(ctx: WorkerContext, spec: ExpirySpec) -> dict[str, Any]:
    """Warm phase (no expiry), then the expiry phase. Returns the latencies of both
    phases, the expiry phase's stale-served latencies, and its computations ``(key,
    start)``."""
    cache = await fleetcache.open(spec.url, pool_size=spec.pool_size)
    names = [f"hot-{i}" for i in range(spec.keys)]
    computations: list[tuple[int, float]] = []

    def producer(index: int) -> Any:
        async def produce(key: fleetcache.Key) -> fleetcache.Produced[Any]:
            started = time.time()
            await asyncio.sleep(spec.compute_ms / 1000)
            # Counted once done: a refresh the worker's close() cancelled at the end of the
            # run stored nothing, and another process rightly refreshes that expiry.
            computations.append((index, started))
            return fleetcache.Produced({"key": key.name})

        return produce

    produces = [producer(i) for i in range(spec.keys)]

    async def read(
        namespace: str, until: float, task: int, expiring: bool
    ) -> tuple[list[float], list[float]]:
        rng = random.Random(f"{spec.seed}:{task}:{expiring}")
        latencies: list[float] = []
        stale: list[float] = []
        options = {"ttl": spec.ttl, "stale_ttl": spec.stale_ttl} if expiring else {"ttl": None}
        while time.time() < until:
            i = rng.randrange(spec.keys)
            started = time.perf_counter()
            entry = await cache.get(fleetcache.Key(namespace, names[i]), produces[i], **options)
            took = time.perf_counter() - started
            latencies.append(took)
            if (
                entry is not None
                and entry.expires_at is not None
                and time.time() * 1000 >= entry.expires_at
            ):
                stale.append(took)
            await asyncio.sleep(0.001)  # a reader that does something with what it read
        return latencies, stale

    try:
        warm_ns, expiry_ns = f"{spec.namespace}:warm", spec.namespace
        for i, name in enumerate(names):  # every key present before the clocks start
            await cache.get(fleetcache.Key(warm_ns, name), produces[i], ttl=None)
            await cache.get(
                fleetcache.Key(expiry_ns, name), produces[i], ttl=spec.ttl, stale_ttl=spec.stale_ttl
            )
        release_at = await ctx.ready()
        warm = await asyncio.gather(
            *(read(warm_ns, release_at + spec.warm_seconds, t, False) for t in range(spec.tasks))
        )
        before = cache.lookup.stats()
        computations.clear()
        expiry_started = time.time()
        hot = await asyncio.gather(
            *(read(expiry_ns, expiry_started + spec.seconds, t, True) for t in range(spec.tasks))
        )
        after = cache.lookup.stats()
    finally:
        await cache.close()
    return {
        "worker": ctx.index,
        "warm": [x for latencies, _ in warm for x in latencies],
        "requests": [x for latencies, _ in hot for x in latencies],
        "stale": [x for _, stale in hot for x in stale],
        "computations": computations,
        "stale_served": after["stale_served"] - before["stale_served"],
        "refresh_failures": after["refresh_failures"] - before["refresh_failures"],
        "misses": after["misses"] - before["misses"],
    }


def analyse_expiry(results: Sequence[dict[str, Any]], ttl: float) -> dict[str, Any]:
    """One expiry run's refreshes per expiry and latencies."""
    starts: dict[int, list[float]] = {}
    for result in results:
        for index, started in result["computations"]:
            starts.setdefault(index, []).append(started)
    expiries = computations = 0
    for times in starts.values():
        times.sort()
        computations += len(times)
        expiries += 1 + sum(1 for a, b in itertools.pairwise(times) if b - a >= ttl / 2)
    warm = [x for r in results for x in r["warm"]]
    stale = [x for r in results for x in r["stale"]]
    requests = [x for r in results for x in r["requests"]]

    def ms(values: Sequence[float], pct: float) -> float | None:
        value = percentile(values, pct)
        return None if value is None else round(1000 * value, 3)

    return {
        "computations": computations,
        "expiries": expiries,
        "refreshes_per_expiry": round(computations / expiries, 3) if expiries else None,
        "requests": len(requests),
        "stale_served": sum(r["stale_served"] for r in results),
        "waited_for_a_computation": sum(r["misses"] for r in results),
        "refresh_failures": sum(r["refresh_failures"] for r in results),
        "warm_hit_ms_p99": ms(warm, 99),
        "stale_ms_p50": ms(stale, 50),
        "stale_ms_p99": ms(stale, 99),
        "request_ms_p99": ms(requests, 99),
    }
