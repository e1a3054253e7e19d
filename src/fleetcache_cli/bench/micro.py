"""One-process micro-benchmarks, in the parent process, timed with ``perf_counter``.

* **warm hit vs raw SELECT**, with 50 and with 20,000 rows in the namespace: fleetcache's
  ``get`` on a cached key against the very statement it runs (the primary-key read of
  ``fleetcache_entries``), sent raw with psycopg on a connection of the same pool; the
  minimal design's hit beside them. The two sides alternate (ABAB, then BABA) so drift
  on a noisy machine hits both alike; medians.
* **uncontended miss**: a fresh key whose computation returns at once, fleetcache
  coordinated vs uncoordinated, and the minimal design; with the statements each sends
  per miss (counted by :class:`~fleetcache_cli.bench.probes.StatementCounter`).
* **near hit**: ``get`` served by the near tier (p50 and p99).
* **metrics overhead**: a warm hit and a near hit with the Prometheus collector registered
  (no tracer) beside the same without (interleaved, medians).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import fleetcache
from fleetcache.stores import queries
from fleetcache.stores.codecs import JSON_VALUES
from fleetcache.stores.postgres import key_hash
from fleetcache.stores.validation import encode_entry
from fleetcache_cli.bench.minimal import MinimalCache
from fleetcache_cli.bench.probes import StatementCounter
from fleetcache_cli.shared import percentile

Timed = Callable[[], Awaitable[float]]

_COPY_ENTRIES = (
    "COPY fleetcache_entries (key_hash, namespace, name, scope, user_id, value, codec, deps)"
    " FROM STDIN"
)
_COPY_MINIMAL = "COPY bench_minimal_entries (namespace, name, value) FROM STDIN"


async def _interleaved(first: Timed, second: Timed, iterations: int) -> tuple[list[float], ...]:
    """Time ``first`` and ``second`` alternately, swapping which goes first each round,
    after a warm-up of a tenth of the iterations (at least 10)."""
    a: list[float] = []
    b: list[float] = []
    warm_up = max(10, iterations // 10)
    for i in range(warm_up + iterations):
        if i % 2:
            tb, ta = await second(), await first()
        else:
            ta, tb = await first(), await second()
        if i >= warm_up:
            a.append(ta)
            b.append(tb)
    return a, b


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)


async def fill_entries(url: str, namespace: str, rows: int, value: Any, *, minimal: bool) -> None:
    """Entries ``row-0`` ... in ``namespace``, each holding ``value`` (and the same in the
    minimal design's table when ``minimal``), written with COPY: seconds, not minutes."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        async with conn.cursor() as cursor, cursor.copy(_COPY_ENTRIES) as copy:
            for i in range(rows):
                key = fleetcache.Key(namespace, f"row-{i}")
                # Encoded as the store encodes it, so a hit decodes what a write would hold.
                encoded = encode_entry(fleetcache.Entry(key, value), JSON_VALUES)
                row: tuple[Any, ...] = (
                    key_hash(key),
                    namespace,
                    key.name,
                    "public",
                    "",
                    encoded.value,
                    encoded.codec,
                    [],
                )
                await copy.write_row(row)
        if minimal:
            async with conn.cursor() as cursor, cursor.copy(_COPY_MINIMAL) as copy:
                for i in range(rows):
                    await copy.write_row((namespace, f"row-{i}", Jsonb(value)))
        # What autovacuum would soon do after a bulk load: fresh statistics, so no plan
        # (a prepared statement's included) is left believing the table is tiny.
        await conn.execute("ANALYZE fleetcache_entries")
        if minimal:
            await conn.execute("ANALYZE bench_minimal_entries")


async def _produce(key: fleetcache.Key) -> fleetcache.Produced[Any]:
    return fleetcache.Produced({"key": key.name})


async def _minimal_value(key: tuple[str, str]) -> Any:
    return {"key": key[1]}


async def warm_hits(
    cache: fleetcache.Fleetcache,
    minimal: MinimalCache,
    *,
    url: str,
    namespace: str,
    rows: int,
    n: int,
) -> dict[str, Any]:
    """Warm hit vs raw SELECT (and the minimal design's hit) with ``rows`` in the namespace."""
    key = fleetcache.Key(namespace, f"row-{rows // 2}")
    await fill_entries(url, namespace, rows, {"key": key.name}, minimal=True)
    params = {
        "key_hash": key_hash(key),
        "ns": key.namespace,
        "name": key.name,
        "scope": key.scope,
        "user": key.user,
    }
    pool = cache.store.pool  # type: ignore[attr-defined]

    async def hit() -> float:
        started = time.perf_counter()
        await cache.get(key, _produce)
        return time.perf_counter() - started

    async def raw() -> float:
        started = time.perf_counter()
        async with pool.connection() as conn:
            # As the store sends it: results in binary format.
            await (await conn.execute(queries.PG_READ, params, binary=True)).fetchone()
        return time.perf_counter() - started

    async def minimal_hit() -> float:
        started = time.perf_counter()
        await minimal.get((namespace, key.name), _minimal_value)
        return time.perf_counter() - started

    hits, raws = await _interleaved(hit, raw, n)
    minimal_hits, raws_again = await _interleaved(minimal_hit, raw, n)
    hit_p50, raw_p50 = percentile(hits, 50), percentile(raws, 50)
    minimal_p50 = percentile(minimal_hits, 50)
    assert hit_p50 is not None
    assert raw_p50 is not None
    assert minimal_p50 is not None
    return {
        "rows_in_namespace": rows,
        "iterations": n,
        "fleetcache_ms_p50": _ms(hit_p50),
        "raw_select_ms_p50": _ms(raw_p50),
        "minimal_ms_p50": _ms(minimal_p50),
        "raw_select_ms_p50_beside_minimal": _ms(percentile(raws_again, 50)),
        "ratio": round(hit_p50 / raw_p50, 3),
        "minimal_ratio": round(minimal_p50 / (percentile(raws_again, 50) or raw_p50), 3),
    }


async def uncontended_misses(
    coordinated: fleetcache.Fleetcache,
    plain: fleetcache.Fleetcache,
    minimal: MinimalCache,
    namespace: str,
    n: int,
) -> dict[str, Any]:
    """Fresh keys computed at once: latency and statements per miss of each."""
    numbers = itertools.count()
    counter = StatementCounter()
    counter.install()

    def fleet_miss(cache: fleetcache.Fleetcache, tag: str) -> Timed:
        async def timed() -> float:
            key = fleetcache.Key(f"{namespace}:{tag}", f"miss-{next(numbers)}")
            started = time.perf_counter()
            await cache.get(key, _produce)
            return time.perf_counter() - started

        return timed

    async def minimal_miss() -> float:
        key = (f"{namespace}:m", f"miss-{next(numbers)}")
        started = time.perf_counter()
        await minimal.get(key, _minimal_value)
        return time.perf_counter() - started

    try:
        coord, unco = await _interleaved(fleet_miss(coordinated, "c"), fleet_miss(plain, "u"), n)
        mini, coord_again = await _interleaved(minimal_miss, fleet_miss(coordinated, "c"), n)
        statements: dict[str, Any] = {}
        for name, timed in (
            ("fleetcache", fleet_miss(coordinated, "c")),
            ("fleetcache_uncoordinated", fleet_miss(plain, "u")),
            ("minimal", minimal_miss),
        ):
            counter.reset()
            counter.enabled = True
            count = max(10, n // 10)
            for _ in range(count):
                await timed()
            counter.enabled = False
            # The LISTEN connection's liveness probe is not part of a miss.
            seen = {k: v for k, v in counter.by_label.items() if k != "SELECT 1"}
            statements[name] = {
                "per_miss": round(sum(seen.values()) / count, 2),
                "by_statement": {k: round(v / count, 2) for k, v in sorted(seen.items())},
            }
    finally:
        counter.uninstall()
    medians = [percentile(xs, 50) or 0.0 for xs in (coord, unco, mini, coord_again)]
    return {
        "iterations": n,
        "coordinated_ms_p50": _ms(medians[0]),
        "uncoordinated_ms_p50": _ms(medians[1]),
        "extra_ms": _ms(medians[0] - medians[1]),
        "minimal_ms_p50": _ms(medians[2]),
        "coordinated_ms_p50_beside_minimal": _ms(medians[3]),
        "statements": statements,
    }


async def near_hits(url: str, namespace: str, n: int) -> dict[str, Any]:
    """``get`` served from the near tier, in one process."""
    async with fleetcache.open(url, pool_size=2, near=1000) as cache:
        key = fleetcache.Key(namespace, "near")
        await cache.get(key, _produce)
        await cache.get(key, _produce)  # the first read of a stored row fills the tier
        timings = []
        for _ in range(max(10, n // 10) + n):
            started = time.perf_counter()
            await cache.get(key, _produce)
            timings.append(time.perf_counter() - started)
        timings = timings[-n:]
        stats = cache.stats()["lookup"]
    return {
        "iterations": n,
        "near_hit_ms_p50": _ms(percentile(timings, 50)),
        "near_hit_ms_p99": _ms(percentile(timings, 99)),
        "near_hits": stats.get("near_hits", 0),
    }


async def metrics_overhead(url: str, namespace: str, n: int) -> dict[str, Any]:
    """A warm hit and a near hit with metrics on (the Prometheus collector registered, no
    tracer) and off, timed alternately on one cache with one pooled connection (its
    observer removed for the "off" calls), so both sides read through the same connection
    and the same code: medians."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 - an optional extra

    from fleetcache.contrib import prometheus  # noqa: PLC0415 - an optional extra

    registry = CollectorRegistry()
    key = fleetcache.Key(namespace, "observed")
    result: dict[str, Any] = {"iterations": n}
    for tier, near in (("warm_hit", None), ("near_hit", 1000)):
        async with fleetcache.open(url, pool_size=1, pool_min_size=1, near=near) as cache:
            prometheus.register(cache, name=f"bench-{tier}", registry=registry)
            observer = cache.lookup.observer
            await cache.get(key, _produce)
            await cache.get(key, _produce)  # stored, then (near tier) kept in memory
            offs, ons = await _interleaved(
                _toggled(cache, key, None), _toggled(cache, key, observer), n
            )
            cache.lookup.observer = observer
            off_p50, on_p50 = percentile(offs, 50) or 0.0, percentile(ons, 50) or 0.0
            result[tier] = {
                "off_ms_p50": _ms(off_p50),
                "on_ms_p50": _ms(on_p50),
                "extra_ms": round((on_p50 - off_p50) * 1000, 5),
                "overhead_pct": round((on_p50 / off_p50 - 1) * 100, 2) if off_p50 else None,
                "gets_counted": observer.latency["hit" if near is None else "near_hit"].count
                if observer is not None
                else 0,
            }
    return result


def _toggled(cache: fleetcache.Fleetcache, key: fleetcache.Key, observer: Any) -> Timed:
    """A timed hit of ``key`` with the lookup's observer set to ``observer`` first."""

    async def hit() -> float:
        cache.lookup.observer = observer
        started = time.perf_counter()
        await cache.get(key, _produce)
        return time.perf_counter() - started

    return hit


async def micro_benchmarks(url: str, run_id: str, iterations: int) -> dict[str, Any]:
    """Every micro-benchmark; namespaces ``bench:<run id>:micro...`` (deleted after)."""
    base = f"bench:{run_id}:micro"
    minimal = MinimalCache(url, pool_size=2)
    await minimal.open()
    try:
        async with (
            fleetcache.open(url, pool_size=2) as coordinated,
            fleetcache.open(url, pool_size=2, coordinate=False) as plain,
        ):
            result: dict[str, Any] = {}
            for rows in (50, 20_000):
                result[f"warm_hit_{rows}"] = await warm_hits(
                    coordinated,
                    minimal,
                    url=url,
                    namespace=f"{base}:hit{rows}",
                    rows=rows,
                    n=iterations,
                )
            result["uncontended_miss"] = await uncontended_misses(
                coordinated, plain, minimal, f"{base}:miss", max(20, iterations // 4)
            )
            result["near_hit"] = await near_hits(url, f"{base}:near", 5 * iterations)
            result["metrics"] = await metrics_overhead(url, f"{base}:metrics", 5 * iterations)
            return result
    finally:
        await minimal.close()
        await _clean(url, base)


async def _clean(url: str, base: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        pattern = base + "%"
        await conn.execute("DELETE FROM fleetcache_entries WHERE namespace LIKE %s", [pattern])
        await conn.execute("DELETE FROM bench_minimal_entries WHERE namespace LIKE %s", [pattern])
