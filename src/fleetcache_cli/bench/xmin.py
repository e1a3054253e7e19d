"""Does a long computation hold a transaction or a snapshot open? (issue 9, item 7)

One process computes one key for ``seconds`` as the fleet's winner, once with fleetcache
and once with the minimal design. Meanwhile the parent samples every backend of the
database in ``pg_stat_activity`` (itself excluded) every 50 ms: how many hold an xmin
(``backend_xmin IS NOT NULL``) and its ``age()``, how many are idle in a transaction and
for how long, how many hold a transaction id. Before each sample the sampler consumes one
transaction id (``pg_current_xact_id()`` in its own autocommit statement), so a pinned
xmin would show a growing age. Only samples taken while the computation runs count.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

import fleetcache
from fleetcache_cli.bench.minimal import MinimalCache

_CONSUME_XID = "SELECT pg_current_xact_id()"
_SAMPLE = """
    SELECT count(*) FILTER (WHERE backend_xmin IS NOT NULL),
           coalesce(max(age(backend_xmin)), 0),
           count(*) FILTER (WHERE state LIKE 'idle in transaction%%'),
           coalesce(max(extract(epoch FROM clock_timestamp() - xact_start))
                    FILTER (WHERE state LIKE 'idle in transaction%%'), 0),
           count(*) FILTER (WHERE backend_xid IS NOT NULL),
           count(*)
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
"""
_INTERVAL = 0.05


async def _sample_while(
    url: str, running: asyncio.Event, done: asyncio.Event
) -> list[tuple[Any, ...]]:
    samples: list[tuple[Any, ...]] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await running.wait()
        while not done.is_set():
            await conn.execute(_CONSUME_XID)
            row = await (await conn.execute(_SAMPLE)).fetchone()
            if row is not None and not done.is_set():
                samples.append(row)
            await asyncio.sleep(_INTERVAL)
    return samples


def _summary(samples: list[tuple[Any, ...]], seconds: float) -> dict[str, Any]:
    return {
        "computation_s": seconds,
        "samples": len(samples),
        "backends_max": max((int(s[5]) for s in samples), default=0),
        "xmin_holders_max": max((int(s[0]) for s in samples), default=0),
        "xmin_age_max": max((int(s[1]) for s in samples), default=0),
        "idle_in_transaction_max": max((int(s[2]) for s in samples), default=0),
        "idle_in_transaction_s_max": round(max((float(s[3]) for s in samples), default=0.0), 3),
        "xid_holders_max": max((int(s[4]) for s in samples), default=0),
    }


async def _one(url: str, namespace: str, seconds: float, design: str) -> dict[str, Any]:
    """One design's figures during one computation of ``seconds``."""
    running, done = asyncio.Event(), asyncio.Event()

    async def compute() -> dict[str, Any]:
        running.set()
        await asyncio.sleep(seconds)
        done.set()
        return {"computed": True}

    sampler = asyncio.create_task(_sample_while(url, running, done))
    try:
        if design == "fleetcache":
            async with fleetcache.open(url, pool_size=2) as cache:

                async def produce(key: fleetcache.Key) -> fleetcache.Produced[Any]:
                    return fleetcache.Produced(await compute())

                await cache.get(fleetcache.Key(namespace, "xmin"), produce)
        else:
            minimal = MinimalCache(url, pool_size=2)
            await minimal.open()
            try:
                await minimal.get((namespace, "xmin"), lambda _key: compute())
            finally:
                await minimal.close()
    finally:
        done.set()
        running.set()
        samples = await sampler
    return _summary(samples, seconds)


async def probe_xmin(url: str, namespace: str, seconds: float) -> dict[str, Any]:
    """Both designs' figures, one after the other."""
    return {
        design: await _one(url, namespace, seconds, design) for design in ("minimal", "fleetcache")
    }
