"""Prometheus metrics for fleetcache (the ``prometheus`` extra): ``register(cache, name=...)``
adds the cache to one collector per registry, which reads the caches' counters at scrape
time; only the get, compute and wait histograms are recorded on the path. Every series
carries ``cache="<name>"`` and no key names."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    REGISTRY,
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fleetcache.contrib._parts import parts_of
from fleetcache.errors import ConfigurationError, NotOpenError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.observe import BUCKETS, MAX_NAMESPACES, OUTCOMES, Buckets, Observer
from fleetcache.stores.postgres import PostgresStore

__all__ = ["FleetcacheCollector", "register", "unregister"]

# The collector of each registry (one per registry: its metric names are registered once).
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, FleetcacheCollector] = (
    weakref.WeakKeyDictionary()
)

_LE = [str(float(bound)) for bound in BUCKETS] + ["+Inf"]

# (metric, help, label, {label value: lookup stats key}) for the counters read from stats().
_LOOKUP_COUNTERS: tuple[tuple[str, str, str | None, dict[str, str]], ...] = (
    (
        "fleetcache_computations",
        "Computations (produce calls) by how they ended.",
        "outcome",
        {
            "ok": "compute_ok",
            "missing": "missing",
            "error_cached": "errors_cached",
            "not_persisted": "not_persisted",
            "failed": "compute_failures",
            "refused_stale": "stale_refused",
            "timed_out": "compute_timeouts",
        },
    ),
    ("fleetcache_computation_restarts", "Computations run again after a refusal.", None,
     {"": "restarts"}),
    ("fleetcache_computations_overtaken", "Refused computations whose callers joined a newer one.",
     None, {"": "overtaken"}),
    ("fleetcache_gave_up", "Callers that gave up waiting for another process.", None,
     {"": "gave_up"}),
    ("fleetcache_refreshes", "Background refreshes started (early ones included).", None,
     {"": "refreshes"}),
    ("fleetcache_early_refreshes", "Refreshes started early, before the value expired.", None,
     {"": "early_refreshes"}),
    ("fleetcache_refresh_failures", "Refreshes that stored nothing.", None,
     {"": "refresh_failures"}),
    ("fleetcache_refreshes_backed_off", "Stale hits that started no refresh: the key's last "
     "one failed recently.", None, {"": "refreshes_backed_off"}),
    ("fleetcache_stale_served", "Stale values served while a refresh ran (near hits too).",
     None, {"": "stale_served"}),
    ("fleetcache_invalidations", "Invalidation calls made by this process.", None,
     {"": "invalidations"}),
    ("fleetcache_invalidated_names", "Names invalidated by this process (dependents included).",
     None, {"": "invalidated_names"}),
    ("fleetcache_invalidated_dependents", "Names this process invalidated because they "
     "depended on another.", None, {"": "invalidated_dependents"}),
    ("fleetcache_invalidations_received", "Invalidations heard from other processes.", None,
     {"": "remote_invalidations"}),
    ("fleetcache_notification_gaps", "Times invalidation notices may have been missed.", None,
     {"": "notification_gaps"}),
    ("fleetcache_purged_entries", "Entries purged past their stale window.", None,
     {"": "purged"}),
    ("fleetcache_near_fills", "Entries offered to the near tier, kept or dropped.", "result",
     {"kept": "near_fills", "dropped": "near_fills_dropped"}),
    ("fleetcache_near_evictions", "Near-tier evictions by cause.", "cause",
     {"lru": "near_evicted_lru", "invalidation": "near_evicted_invalidation",
      "gap": "near_evicted_gap"}),
)  # fmt: skip


def register(
    cache: Any,
    *,
    name: str = "default",
    registry: CollectorRegistry = REGISTRY,
    namespaces: Iterable[str] | None = None,
) -> FleetcacheCollector:
    """Export ``cache`` (a :class:`~fleetcache.Fleetcache`, a ``SyncFleetcache`` or a
    :class:`~fleetcache.lookup.caching.CachingLookup`) to ``registry`` (the default one of
    ``prometheus_client`` unless given) under the label ``cache=name``; every cache of a
    process goes into the same collector. From now on the cache records its get latencies
    by outcome, compute times and wait times (counted from this call on); everything else
    is read from its counters at each scrape. Returns the registry's collector.

    ``namespaces`` (at most 100): gets are also counted, and timed, per namespace for
    these, in ``fleetcache_namespace_gets_total`` and
    ``fleetcache_namespace_get_duration_seconds``; every other namespace's under
    ``namespace="_other"``. Without it no series names a namespace."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"a cache's metrics name must be a non-empty str, got {name!r}")
    asked = None
    if namespaces is not None:
        if isinstance(namespaces, str) or not all(isinstance(n, str) for n in namespaces):
            raise ConfigurationError(
                f"namespaces must be a list of str, got {type(namespaces).__name__}"
            )
        asked = frozenset(namespaces)
        if len(asked) > MAX_NAMESPACES:
            raise ConfigurationError(
                f"at most {MAX_NAMESPACES} namespaces get series of their own, "
                f"{len(asked)} were given"
            )
    lookup, parts = parts_of(cache)
    collector = _collectors.get(registry)
    if collector is None:
        collector = _collectors[registry] = FleetcacheCollector()
        registry.register(collector)
    collector.add(name, lookup, parts, namespaces=asked)
    return collector


def unregister(name: str, *, registry: CollectorRegistry = REGISTRY) -> None:
    """Stop exporting the cache registered as ``name`` (its histograms stop recording)."""
    collector = _collectors.get(registry)
    if collector is None or name not in collector.caches:
        raise ConfigurationError(f"no cache named {name!r} is registered in this registry")
    collector.remove(name)


class FleetcacheCollector(Collector):
    """The caches of one registry, by name; reads their counters at each scrape."""

    def __init__(self) -> None:
        # name -> (lookup, parts). Written by register/unregister, read by collect (a
        # scrape may run on the exporter's thread: it copies the dict first).
        self.caches: dict[str, tuple[CachingLookup[Any], Any]] = {}

    def add(
        self,
        name: str,
        lookup: CachingLookup[Any],
        parts: Any,
        *,
        namespaces: frozenset[str] | None = None,
    ) -> None:
        """Export ``lookup`` as ``name`` and turn on its histograms (per namespace too,
        for ``namespaces``)."""
        if name in self.caches:
            raise ConfigurationError(f"a cache named {name!r} is already registered here")
        observer = lookup.observer
        if observer is None:
            observer = lookup.observer = Observer()
        observer.histograms = True
        observer.namespaces = namespaces
        self.caches = {**self.caches, name: (lookup, parts)}

    def remove(self, name: str) -> None:
        """Stop exporting ``name``."""
        caches = dict(self.caches)
        lookup, _ = caches.pop(name)
        self.caches = caches
        if lookup.observer is not None:
            lookup.observer.histograms = False
            lookup.observer.namespaces = None

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the series depend on the caches added later."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every series of every cache registered here."""
        caches = self.caches
        gets = CounterMetricFamily(
            "fleetcache_gets", "Gets by how they were answered.", labels=["cache", "outcome"]
        )
        latency = HistogramMetricFamily(
            "fleetcache_get_duration_seconds",
            "Get latency by how the get was answered.",
            labels=["cache", "outcome"],
        )
        ns_gets = CounterMetricFamily(
            "fleetcache_namespace_gets",
            "Gets by namespace (only those asked for) and outcome.",
            labels=["cache", "namespace", "outcome"],
        )
        ns_latency = HistogramMetricFamily(
            "fleetcache_namespace_get_duration_seconds",
            "Get latency by namespace (only those asked for) and outcome.",
            labels=["cache", "namespace", "outcome"],
        )
        compute = HistogramMetricFamily(
            "fleetcache_compute_duration_seconds", "Time of each produce call.", labels=["cache"]
        )
        wait = HistogramMetricFamily(
            "fleetcache_wait_duration_seconds",
            "Time of each wait for another process's computation.",
            labels=["cache"],
        )
        counters = {
            metric: CounterMetricFamily(
                metric, doc, labels=["cache"] if label is None else ["cache", label]
            )
            for metric, doc, label, _ in _LOOKUP_COUNTERS
        }
        locks = CounterMetricFamily(
            "fleetcache_locks", "Fleet-wide lock tries by result.", labels=["cache", "result"]
        )
        waits = CounterMetricFamily(
            "fleetcache_waits", "Waits for another process by how they ended.",
            labels=["cache", "woken_by"],
        )  # fmt: skip
        notifies = CounterMetricFamily(
            "fleetcache_notifies", "NOTIFYs for filled keys, sent or failed.",
            labels=["cache", "result"],
        )  # fmt: skip
        near_hits = CounterMetricFamily(
            "fleetcache_near_lookups", "Near-tier lookups by result.", labels=["cache", "result"]
        )
        in_flight = GaugeMetricFamily(
            "fleetcache_computations_in_flight", "produce calls running now.", labels=["cache"]
        )
        parked = GaugeMetricFamily(
            "fleetcache_waiters", "Callers parked on another process's lock now.",
            labels=["cache"],
        )  # fmt: skip
        pool = GaugeMetricFamily(
            "fleetcache_pool_connections", "Pooled connections by state.",
            labels=["cache", "state"],
        )  # fmt: skip
        backends = GaugeMetricFamily(
            "fleetcache_backends", "Database connections held now, by what holds them.",
            labels=["cache", "held_by"],
        )  # fmt: skip
        listening = GaugeMetricFamily(
            "fleetcache_listen_connected", "1 while the LISTEN connection is up.",
            labels=["cache"],
        )  # fmt: skip
        near_entries = GaugeMetricFamily(
            "fleetcache_near_entries", "Entries in the near tier.", labels=["cache"]
        )
        near_bytes = GaugeMetricFamily(
            "fleetcache_near_bytes", "Size of the near tier's entries.", labels=["cache"]
        )
        for name, (lookup, parts) in caches.items():
            observer = lookup.observer
            if observer is not None:
                for outcome in OUTCOMES:
                    buckets = observer.counts(outcome)
                    count = buckets.count
                    gets.add_metric([name, outcome], count)
                    latency.add_metric([name, outcome], *_histogram(buckets))
                for namespace, row in list(observer.by_namespace.items()):
                    for outcome in OUTCOMES:
                        labels = [name, namespace, outcome]
                        ns_gets.add_metric(labels, row[outcome].count)
                        ns_latency.add_metric(labels, *_histogram(row[outcome]))
                compute.add_metric([name], *_histogram(observer.compute))
                wait.add_metric([name], *_histogram(observer.wait))
            stats = lookup.stats()
            for metric, _, label, keys in _LOOKUP_COUNTERS:
                for label_value, key in keys.items():
                    if key in stats:
                        labels = [name] if label is None else [name, label_value]
                        counters[metric].add_metric(labels, stats[key])
            if "near_hits" in stats:
                near_hits.add_metric([name, "hit"], stats["near_hits"])
                near_hits.add_metric([name, "miss"], stats["near_misses"])
                near_entries.add_metric([name], stats["near_entries"])
                near_bytes.add_metric([name], stats["near_bytes"])
            in_flight.add_metric([name], lookup.computations_in_flight())
            coordinator = lookup.coordinator
            if coordinator is not None:
                coordination = coordinator.stats()
                locks.add_metric([name, "won"], coordination.get("lock_won", 0))
                locks.add_metric([name, "lost"], coordination.get("lock_lost", 0))
                for key, times in coordination.items():
                    if key.startswith("woken_"):
                        waits.add_metric([name, key.removeprefix("woken_")], times)
                notifies.add_metric([name, "sent"], coordination.get("notifies", 0))
                notifies.add_metric([name, "failed"], coordination.get("notify_failures", 0))
                lock_connections = getattr(coordinator, "lock_connections", None)
                if callable(lock_connections):
                    backends.add_metric([name, "locks"], lock_connections())
                waiting = getattr(coordinator, "waiters", None)
                if callable(waiting):
                    parked.add_metric([name], waiting())
            store = getattr(parts, "store", None)
            store_pool = _pool_stats(store)
            if store_pool is not None:
                size = store_pool.get("pool_size", 0)
                idle = store_pool.get("pool_available", 0)
                pool.add_metric([name, "in_use"], size - idle)
                pool.add_metric([name, "idle"], idle)
                backends.add_metric([name, "pool"], size)
                read_pool = store.read_pool_stats() if isinstance(store, PostgresStore) else None
                if read_pool is not None:  # the sync API's reads on its callers' threads
                    backends.add_metric([name, "read_pool"], read_pool["size"])
            hub = getattr(parts, "hub", None)
            if hub is not None:
                listening.add_metric([name], 1 if hub.connected else 0)
                backends.add_metric([name, "listen"], 1 if hub.connected else 0)
        families = itertools.chain(
            (gets, latency, ns_gets, ns_latency, compute, wait),
            counters.values(),
            (locks, waits, notifies, near_hits, in_flight, parked, pool, backends, listening),
            (near_entries, near_bytes),
        )
        # A series a cache does not have (no near tier, no coordinator) is left out.
        yield from (family for family in families if family.samples)


def _histogram(buckets: Buckets) -> tuple[list[tuple[str, float]], float]:
    """Prometheus' cumulative buckets and the sum, from a bucketed array."""
    return list(zip(_LE, itertools.accumulate(buckets.counts), strict=True)), buckets.sum


def _pool_stats(store: Any) -> dict[str, int] | None:
    """The psycopg pool's ``get_stats()`` of a Postgres store, None for other stores (or
    a store not open)."""
    if not isinstance(store, PostgresStore):
        return None
    try:
        pool = store.pool
    except NotOpenError:
        return None
    return pool.get_stats()
