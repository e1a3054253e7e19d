"""Prometheus metrics and OpenTelemetry traces: the exposition text parsed back with
prometheus_client's own parser after scripted workloads (in one process and across three),
and spans captured by the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fleetcache
import metrics_worker
from fleetcache.contrib import otel, prometheus
from fleetcache.coordination.local import LocalCoordinator
from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.near import NearCache
from fleetcache.lookup.populate import Produced
from fleetcache.stores.base import Key
from fleetcache.stores.memory import MemoryStore
from fleetcache_cli.shared import Fleet
from waiting import eventually

NS = "catalog"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Live:
    """A notification connection that is always up (the near tier trusts it)."""

    connected = True
    gaps = 0


def in_threads(target: Callable[[], None], count: int) -> None:
    """Run ``target`` on ``count`` threads at once and wait for them all."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)


def samples(text: str) -> Samples:
    """Every sample of an exposition text, parsed by prometheus_client's own parser, by
    name and labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series is absent)."""
    return found.get((name, frozenset(labels.items())), 0.0)


class Gate:
    """A produce function whose computations wait until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.calls: Counter[str] = Counter()

    async def __call__(self, key: Key) -> Produced[Any]:
        self.calls[key.name] += 1
        await self.open.wait()
        if key.name.startswith("boom"):
            raise ValueError(f"cannot make {key.name}")
        if key.name.startswith("bad"):
            return Produced(value=None, error={"status": 500})
        return Produced(value={"name": key.name})


async def test_the_exposition_counts_a_scripted_workload_exactly() -> None:
    """k misses with c coalesced callers each, n store hits, m near hits, a failed and an
    error-cached computation: the scrape, parsed back, counts each get once under its
    outcome, each computation under how it ended, and labels each cache by its name."""
    k, c, n, m = 3, 2, 5, 4
    registry = CollectorRegistry()
    plain: CachingLookup[Any] = CachingLookup(MemoryStore())
    near: CachingLookup[Any] = CachingLookup(MemoryStore(), near=NearCache(Live(), max_entries=10))
    prometheus.register(plain, name="plain", registry=registry)
    prometheus.register(near, name="near", registry=registry)

    gate = Gate()
    names = [f"k{i}" for i in range(k)]
    gets = [
        asyncio.ensure_future(plain.get(Key(NS, name), gate))
        for name in names
        for _ in range(c + 1)
    ]
    await eventually(lambda: plain.stats()["coalesced"] == k * c)
    gate.open.set()
    await asyncio.gather(*gets)
    for i in range(n):
        await plain.get(Key(NS, names[i % k]), gate)
    with pytest.raises(ValueError, match="cannot make boom"):
        await plain.get(Key(NS, "boom"), gate)
    assert (await plain.get(Key(NS, "bad"), gate)).error == {"status": 500}  # type: ignore[union-attr]
    await near.get(Key(NS, "x"), gate)
    for _ in range(m):
        await near.get(Key(NS, "x"), gate)

    found = samples(generate_latest(registry).decode())
    gets_plain = {
        outcome: value(found, "fleetcache_gets_total", cache="plain", outcome=outcome)
        for outcome in ("hit", "near_hit", "miss", "coalesced", "waited", "stale", "error")
    }
    assert gets_plain == {
        "hit": n,
        "near_hit": 0,
        "miss": k + 1,  # the error entry is computed by a miss too
        "coalesced": k * c,
        "waited": 0,
        "stale": 0,
        "error": 1,
    }
    assert value(found, "fleetcache_get_duration_seconds_count", cache="plain", outcome="hit") == n
    assert (
        value(
            found, "fleetcache_get_duration_seconds_bucket", cache="plain", outcome="hit", le="+Inf"
        )
        == n
    )
    assert value(found, "fleetcache_gets_total", cache="near", outcome="near_hit") == m
    assert value(found, "fleetcache_gets_total", cache="near", outcome="miss") == 1
    assert value(found, "fleetcache_computations_total", cache="plain", outcome="ok") == k
    assert value(found, "fleetcache_computations_total", cache="plain", outcome="failed") == 1
    assert value(found, "fleetcache_computations_total", cache="plain", outcome="error_cached") == 1
    assert value(found, "fleetcache_compute_duration_seconds_count", cache="plain") == k + 2
    assert value(found, "fleetcache_near_lookups_total", cache="near", result="hit") == m
    assert value(found, "fleetcache_near_fills_total", cache="near", result="kept") == 1
    assert value(found, "fleetcache_computations_in_flight", cache="plain") == 0
    # No key name in any label.
    assert not {v for _, labels in found for _, v in labels} & {*names, "x", "boom", "bad"}


async def test_invalidations_and_in_flight_gauges_are_read_at_scrape_time() -> None:
    """Invalidated names (named and reached through deps) are counted, and a computation
    under way shows in the in-flight gauge until it ends."""
    registry = CollectorRegistry()
    lookup: CachingLookup[Any] = CachingLookup(MemoryStore())
    prometheus.register(lookup, name="inv", registry=registry)

    async def with_dep(key: Key) -> Produced[Any]:
        return Produced(value=1, deps=("base",))

    await lookup.get(Key(NS, "page"), with_dep)
    await lookup.invalidate(NS, ["base"])
    gate = Gate()
    running = asyncio.ensure_future(lookup.get(Key(NS, "slow"), gate))
    await eventually(lambda: gate.calls["slow"] == 1)
    found = samples(generate_latest(registry).decode())
    assert value(found, "fleetcache_invalidations_total", cache="inv") == 1
    assert value(found, "fleetcache_invalidated_names_total", cache="inv") == 2
    assert value(found, "fleetcache_invalidated_dependents_total", cache="inv") == 1
    assert value(found, "fleetcache_computations_in_flight", cache="inv") == 1
    gate.open.set()
    await running


async def test_a_stale_hit_is_counted_as_stale_and_its_refresh_as_started() -> None:
    """A value past its ttl but inside its stale window is served as ``stale`` (not as a
    hit) and the refresh it starts is counted, with the stale value served."""
    now = [1_000.0]
    registry = CollectorRegistry()
    lookup: CachingLookup[Any] = CachingLookup(MemoryStore(), clock=lambda: now[0])
    prometheus.register(lookup, name="aging", registry=registry)
    gate = _opened_gate()
    await lookup.get(Key(NS, "s"), gate, ttl=1, stale_ttl=60)
    now[0] += 5
    await lookup.get(Key(NS, "s"), gate, ttl=1, stale_ttl=60)
    await eventually(lambda: gate.calls["s"] == 2)
    found = samples(generate_latest(registry).decode())
    assert value(found, "fleetcache_gets_total", cache="aging", outcome="stale") == 1
    assert value(found, "fleetcache_gets_total", cache="aging", outcome="hit") == 0
    assert value(found, "fleetcache_refreshes_total", cache="aging") == 1
    assert value(found, "fleetcache_stale_served_total", cache="aging") == 1


async def test_namespaces_are_labels_only_when_asked_and_then_bounded() -> None:
    """Without ``namespaces`` no series names one; with them, gets are counted per namespace
    asked for and every other namespace's under ``_other``; more than 100 are refused."""
    gate = _opened_gate()
    plain: CachingLookup[Any] = CachingLookup(MemoryStore())
    split: CachingLookup[Any] = CachingLookup(MemoryStore())
    registry = CollectorRegistry()
    prometheus.register(plain, name="plain", registry=registry)
    prometheus.register(split, name="split", registry=registry, namespaces=["prices"])
    for lookup in (plain, split):
        for namespace in ("prices", "users", "orders"):
            await lookup.get(Key(namespace, "a"), gate)
        await lookup.get(Key("prices", "a"), gate)
    found = samples(generate_latest(registry).decode())
    namespaces = {v for _, labels in found for k, v in labels if k == "namespace"}
    assert namespaces == {"prices", "_other"}
    assert not any(("cache", "plain") in labels and any(k == "namespace" for k, _ in labels)
                   for _, labels in found)  # fmt: skip
    ns_gets = "fleetcache_namespace_gets_total"
    assert value(found, ns_gets, cache="split", namespace="prices", outcome="miss") == 1
    assert value(found, ns_gets, cache="split", namespace="prices", outcome="hit") == 1
    assert value(found, ns_gets, cache="split", namespace="_other", outcome="miss") == 2
    assert value(found, "fleetcache_gets_total", cache="split", outcome="miss") == 3
    with pytest.raises(ConfigurationError, match="at most 100 namespaces"):
        prometheus.register(
            plain, name="many", registry=registry, namespaces=[f"n{i}" for i in range(101)]
        )
    with pytest.raises(ConfigurationError, match="namespaces must be a list of str"):
        prometheus.register(plain, name="str", registry=registry, namespaces="prices")


async def test_a_cache_not_registered_records_nothing_and_names_are_unique() -> None:
    """Without a collector or a tracer a lookup has no observer (nothing is recorded on
    its path); a second cache under a name already taken in a registry is refused, and
    unregistering stops the histograms."""
    lookup: CachingLookup[Any] = CachingLookup(MemoryStore())
    await lookup.get(Key(NS, "a"), _opened_gate())
    assert lookup.observer is None
    registry = CollectorRegistry()
    prometheus.register(lookup, name="one", registry=registry)
    with pytest.raises(ConfigurationError, match="'one' is already registered"):
        prometheus.register(CachingLookup(MemoryStore()), name="one", registry=registry)
    prometheus.unregister("one", registry=registry)
    assert lookup.observer is not None
    assert lookup.observer.histograms is False
    assert "fleetcache_gets_total" not in generate_latest(registry).decode()


def _opened_gate() -> Gate:
    gate = Gate()
    gate.open.set()
    return gate


# --------------------------------------------------------------------------- traces


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider of the SDK whose spans land in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    """The finished spans called ``name``."""
    return [span for span in finished if span.name == name]


async def test_a_computing_get_has_a_span_with_a_compute_child_and_no_key_in_clear(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A miss gets a span (outcome, namespace, hashed key) whose child times the
    computation; coalesced callers get spans of their own; hits get none."""
    provider, exporter = spans
    lookup: CachingLookup[Any] = CachingLookup(MemoryStore())
    otel.instrument(lookup, tracer_provider=provider)
    gate = Gate()
    key = Key(NS, "secret-name")
    gets = [asyncio.ensure_future(lookup.get(key, gate)) for _ in range(3)]
    await eventually(lambda: lookup.stats()["coalesced"] == 2)
    gate.open.set()
    await asyncio.gather(*gets)
    await lookup.get(key, gate)  # a hit: no span

    finished = exporter.get_finished_spans()
    gets_spans = by_name(finished, "fleetcache.get")
    assert sorted(str(s.attributes["fleetcache.outcome"]) for s in gets_spans) == [  # type: ignore[index]
        "coalesced",
        "coalesced",
        "miss",
    ]
    (miss,) = [s for s in gets_spans if s.attributes["fleetcache.outcome"] == "miss"]  # type: ignore[index]
    (compute,) = by_name(finished, "fleetcache.compute")
    assert compute.parent is not None
    assert miss.context is not None
    assert compute.parent.span_id == miss.context.span_id
    expected = hashlib.sha256(key.coalesce_key.encode()).hexdigest()[:16]
    assert miss.attributes == {  # type: ignore[comparison-overlap]
        "fleetcache.namespace": NS,
        "fleetcache.key_hash": expected,
        "fleetcache.outcome": "miss",
    }
    text = repr([dict(s.attributes or {}) for s in finished])
    assert "secret-name" not in text


async def test_a_get_that_waits_for_another_holder_has_a_wait_child(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A get that loses the key's lock waits for its holder: its span says ``waited`` and
    has a wait child saying how the wait ended; meanwhile the waiter is parked (gauge)."""
    provider, exporter = spans
    registry = CollectorRegistry()
    store = MemoryStore()
    coordinator = LocalCoordinator()
    await coordinator.start()
    holder: CachingLookup[Any] = CachingLookup(store, coordinator=coordinator)
    waiter: CachingLookup[Any] = CachingLookup(store, coordinator=coordinator)
    otel.instrument(waiter, tracer_provider=provider)
    prometheus.register(waiter, name="waiter", registry=registry)
    gate = Gate()
    key = Key(NS, "w")
    first = asyncio.ensure_future(holder.get(key, gate))
    await eventually(lambda: gate.calls["w"] == 1)
    second = asyncio.ensure_future(waiter.get(key, gate))
    await eventually(lambda: coordinator.waiters() == 1)
    assert (
        value(samples(generate_latest(registry).decode()), "fleetcache_waiters", cache="waiter")
        == 1
    )
    gate.open.set()
    assert (await first) == (await second)
    await coordinator.close()

    finished = exporter.get_finished_spans()
    (get,) = by_name(finished, "fleetcache.get")
    (wait,) = by_name(finished, "fleetcache.wait")
    assert get.attributes["fleetcache.outcome"] == "waited"  # type: ignore[index]
    assert wait.parent is not None
    assert get.context is not None
    assert wait.parent.span_id == get.context.span_id
    assert wait.attributes["fleetcache.woken_by"] == "notify"  # type: ignore[index]
    found = samples(generate_latest(registry).decode())
    assert value(found, "fleetcache_gets_total", cache="waiter", outcome="waited") == 1
    assert value(found, "fleetcache_wait_duration_seconds_count", cache="waiter") == 1
    assert value(found, "fleetcache_locks_total", cache="waiter", result="lost") == 1
    assert value(found, "fleetcache_waits_total", cache="waiter", woken_by="notify") == 1
    assert gate.calls["w"] == 1


async def test_a_failed_computation_ends_its_span_with_an_error(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A get whose computation raises has a span with outcome ``error`` and an error
    status, and so has its compute child."""
    provider, exporter = spans
    lookup: CachingLookup[Any] = CachingLookup(MemoryStore())
    otel.instrument(lookup, tracer_provider=provider)
    with pytest.raises(ValueError, match="cannot make boom"):
        await lookup.get(Key(NS, "boom"), _opened_gate())
    finished = exporter.get_finished_spans()
    (get,) = by_name(finished, "fleetcache.get")
    (compute,) = by_name(finished, "fleetcache.compute")
    assert get.attributes["fleetcache.outcome"] == "error"  # type: ignore[index]
    assert get.status.status_code is StatusCode.ERROR
    assert compute.status.status_code is StatusCode.ERROR


async def test_an_unobserved_lookup_inside_produce_leaves_the_outer_outcome_alone() -> None:
    """A produce function of an observed lookup that itself waits, through another
    (unobserved) lookup, for another holder's computation: the outer get is still a miss."""
    registry = CollectorRegistry()
    store = MemoryStore()
    coordinator = LocalCoordinator()
    await coordinator.start()
    holder: CachingLookup[Any] = CachingLookup(store, coordinator=coordinator)
    inner: CachingLookup[Any] = CachingLookup(store, coordinator=coordinator)
    outer: CachingLookup[Any] = CachingLookup(MemoryStore())
    prometheus.register(outer, name="outer", registry=registry)
    gate = Gate()

    async def produce(key: Key) -> Produced[Any]:
        entry = await inner.get(Key(NS, "dep"), gate)
        assert entry is not None
        return Produced(value=entry.value)

    first = asyncio.ensure_future(holder.get(Key(NS, "dep"), gate))
    await eventually(lambda: gate.calls["dep"] == 1)
    second = asyncio.ensure_future(outer.get(Key(NS, "top"), produce))
    await eventually(lambda: coordinator.waiters() == 1)
    gate.open.set()
    await asyncio.gather(first, second)
    await coordinator.close()
    found = samples(generate_latest(registry).decode())
    assert value(found, "fleetcache_gets_total", cache="outer", outcome="miss") == 1
    assert value(found, "fleetcache_gets_total", cache="outer", outcome="waited") == 0


async def test_hits_are_traced_only_when_asked(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """With ``trace_hits`` a hit gets a span too, with outcome ``hit``; uninstrumenting
    stops the spans."""
    provider, exporter = spans
    lookup: CachingLookup[Any] = CachingLookup(MemoryStore())
    gate = _opened_gate()
    await lookup.get(Key(NS, "h"), gate)
    otel.instrument(lookup, tracer_provider=provider, trace_hits=True)
    await lookup.get(Key(NS, "h"), gate)
    (hit,) = exporter.get_finished_spans()
    assert hit.attributes["fleetcache.outcome"] == "hit"  # type: ignore[index]
    otel.uninstrument(lookup)
    await lookup.get(Key(NS, "h"), gate)
    assert len(exporter.get_finished_spans()) == 1


# --------------------------------------------------------------------------- fleet


@pytest.mark.processes
async def test_three_processes_compute_each_key_once_summed_from_their_registries(
    database_url: str,
) -> None:
    """Three real processes get the same keys, two callers each, at once: summed from
    their three scrapes, each key was computed once in the fleet, every get is counted
    once, and the losers' waits and locks add up."""
    keys, callers = 6, 2
    names = [f"m{i}" for i in range(keys)]
    with Fleet(3, name="test-member") as fleet:
        workers = [fleet.serve(i, metrics_worker.serve, database_url) for i in range(3)]
        for worker in workers:
            assert (await worker.receive())["ready"]
        for worker in workers:
            worker.send("get", names=names, callers=callers, compute_ms=300)
        for worker in workers:
            assert (await worker.receive())["done"] == keys * callers
        scrapes = [samples((await worker.call("scrape"))["text"]) for worker in workers]

    def total(name: str, **labels: str) -> float:
        return sum(value(found, name, cache="fleet", **labels) for found in scrapes)

    assert total("fleetcache_computations_total", outcome="ok") == keys
    outcomes = ("hit", "near_hit", "miss", "coalesced", "waited", "stale", "error")
    assert sum(total("fleetcache_gets_total", outcome=o) for o in outcomes) == 3 * keys * callers
    assert total("fleetcache_gets_total", outcome="error") == 0
    assert total("fleetcache_compute_duration_seconds_count") == keys
    # Each process led one get per key (the others of its callers coalesced or hit).
    led = sum(total("fleetcache_gets_total", outcome=o) for o in ("miss", "waited"))
    assert led + total("fleetcache_gets_total", outcome="hit") >= 3 * keys
    assert total("fleetcache_locks_total", result="won") >= keys
    assert total("fleetcache_wait_duration_seconds_count") == sum(
        total("fleetcache_waits_total", woken_by=w)
        for w in ("notify", "timeout", "probe", "gap", "close")
    )
    assert all(value(found, "fleetcache_listen_connected", cache="fleet") == 1 for found in scrapes)
    for found in scrapes:  # the session (LISTEN and the fleet's locks), and the pool
        assert value(found, "fleetcache_backends", cache="fleet", held_by="listen") == 1
        assert value(found, "fleetcache_backends", cache="fleet", held_by="locks") == 0
        assert value(found, "fleetcache_backends", cache="fleet", held_by="pool") >= 1
    assert all(
        ("fleetcache_pool_connections", frozenset({("cache", "fleet"), ("state", "idle")})) in found
        for found in scrapes
    )


async def test_an_open_cache_can_be_registered(tmp_path: Path) -> None:
    """``register`` takes what ``fleetcache.open`` returns (and refuses what is no cache)."""
    registry = CollectorRegistry()
    async with fleetcache.open(f"sqlite:///{tmp_path}/c.db") as cache:
        prometheus.register(cache, name="sqlite", registry=registry)
        await cache.get(Key(NS, "a"), _opened_gate())
        found = samples(generate_latest(registry).decode())
        assert value(found, "fleetcache_gets_total", cache="sqlite", outcome="miss") == 1
    with pytest.raises(ConfigurationError, match="cannot instrument a str"):
        prometheus.register("nope", name="x", registry=registry)


def test_near_hits_served_on_sync_callers_threads_are_counted(database_url: str) -> None:
    """A SyncFleetcache's near hits, answered on its callers' threads, are counted under
    ``near_hit`` like the loop's (four threads, 50 hits each: 200, none lost)."""
    registry = CollectorRegistry()
    with fleetcache.open_sync(database_url, near=100) as cache:
        prometheus.register(cache, name="sync", registry=registry)
        key = Key(NS, "hot")
        cache.get_value(key, lambda key: Produced({"v": 1}))
        cache.get_value(key, lambda key: Produced({"v": 1}))  # the first read fills the tier
        before = value(
            samples(generate_latest(registry).decode()),
            "fleetcache_gets_total",
            cache="sync",
            outcome="near_hit",
        )

        def read() -> None:
            for _ in range(50):
                assert cache.get_value(key, lambda key: Produced({"v": 2})) == {"v": 1}

        in_threads(read, 4)
        found = samples(generate_latest(registry).decode())
    near = value(found, "fleetcache_gets_total", cache="sync", outcome="near_hit")
    assert near - before == 200
    count = "fleetcache_get_duration_seconds_count"
    assert value(found, count, cache="sync", outcome="near_hit") == near


@pytest.mark.postgres
def test_store_hits_read_on_sync_callers_threads_are_counted_with_the_read_pool(
    database_url: str,
) -> None:
    """A SyncFleetcache's store hits, read on its callers' threads through the read pool,
    are counted under ``hit`` (four threads, 25 hits each: 100), and the read pool's
    connections are backends ``held_by="read_pool"``."""
    registry = CollectorRegistry()
    with fleetcache.open_sync(database_url, read_pool_size=2) as cache:
        prometheus.register(cache, name="sync", registry=registry)
        key = Key(NS, "warm")
        cache.get_value(key, lambda key: Produced({"v": 1}))
        before = value(
            samples(generate_latest(registry).decode()), "fleetcache_gets_total",
            cache="sync", outcome="hit",
        )  # fmt: skip

        def read() -> None:
            for _ in range(25):
                assert cache.get_value(key, lambda key: Produced({"v": 2})) == {"v": 1}

        in_threads(read, 4)
        found = samples(generate_latest(registry).decode())
        held = cache.stats()["connections"]["read_pool"]["size"]
    assert value(found, "fleetcache_gets_total", cache="sync", outcome="hit") - before == 100
    assert value(found, "fleetcache_backends", cache="sync", held_by="read_pool") == held
    assert 1 <= held <= 2
