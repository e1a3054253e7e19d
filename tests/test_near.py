"""The near tier: bounded LRU, copies, coherence rules (liveness, evictions, raced fills),
alone and in front of a store through CachingLookup."""

from __future__ import annotations

import asyncio
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest

from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.near import NearCache
from fleetcache.lookup.populate import Produced
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.memory import MemoryStore

NS = "https://realm.example/"


@dataclass
class FakeLiveness:
    """A notification connection whose state the test sets."""

    connected: bool = True
    gaps: int = 0


def entry(name: str, *, alias: str | None = None, deps: tuple[str, ...] = (), **key: Any) -> Entry:
    """An entry named ``name`` in the test namespace."""
    return Entry(Key(NS, name, **key), {"name": name, "list": [1, 2]}, deps=deps, alias=alias)


def near(max_entries: int = 100, **kwargs: Any) -> tuple[NearCache, FakeLiveness]:
    """A tier and the liveness it watches."""
    liveness = FakeLiveness()
    return NearCache(liveness, max_entries=max_entries, **kwargs), liveness


def test_a_hit_is_a_copy_the_caller_cannot_change_for_the_next() -> None:
    """Mutating what a near hit returned leaves the kept entry as it was."""
    tier, _ = near()
    assert tier.put(entry("a"), epoch=tier.epoch())
    first = tier.get(Key(NS, "a"))
    assert first is not None
    first.value["list"].append(3)
    first.value["name"] = "changed"
    second = tier.get(Key(NS, "a"))
    assert second == entry("a")
    assert tier.stats()["near_hits"] == 2


def test_least_recently_used_entries_go_first_under_the_count_bound() -> None:
    """With room for three, a fourth entry evicts the least recently used one."""
    tier, _ = near(max_entries=3)
    for name in "abc":
        tier.put(entry(name), epoch=tier.epoch())
    assert tier.get(Key(NS, "a")) is not None  # a is now the most recent
    tier.put(entry("d"), epoch=tier.epoch())
    assert [tier.get(Key(NS, n)) is not None for n in "abcd"] == [True, False, True, True]
    assert len(tier) == 3
    assert tier.stats()["near_evicted_lru"] == 1


def test_the_byte_bound_evicts_until_the_kept_text_fits() -> None:
    """max_bytes bounds the size of the kept JSON text."""
    tier, _ = near(max_bytes=100)
    for i in range(10):
        tier.put(entry(f"n{i}"), epoch=tier.epoch())
    assert tier.size_bytes <= 100
    assert 0 < len(tier) < 10


def test_a_connection_drop_empties_the_tier_before_the_next_hit() -> None:
    """When the hub counts a drop, the next get finds nothing and the tier is empty; while
    disconnected nothing is served or kept."""
    tier, liveness = near()
    tier.put(entry("a"), epoch=tier.epoch())
    liveness.gaps += 1
    liveness.connected = False
    assert tier.get(Key(NS, "a")) is None
    assert len(tier) == 0
    assert not tier.put(entry("a"), epoch=tier.epoch())
    liveness.connected = True
    assert tier.put(entry("a"), epoch=tier.epoch())
    assert tier.get(Key(NS, "a")) is not None
    assert tier.stats()["near_evicted_gap"] == 1


def test_a_fill_that_raced_an_eviction_is_not_kept() -> None:
    """An eviction between a filler's epoch reading and its put drops the fill, even for
    an unrelated name (the tier cannot tell what the filler's read saw)."""
    tier, _ = near()
    epoch = tier.epoch()
    tier.evict_names(NS, ["other"])
    assert not tier.put(entry("a"), epoch=epoch)
    assert tier.get(Key(NS, "a")) is None
    assert tier.stats()["near_fills_dropped"] == 1


def test_invalidated_names_evict_their_aliases_and_dependents_transitively() -> None:
    """Evicting a name removes the entries named or aliased by it and, transitively, those
    whose deps meet them; other namespaces and unrelated entries stay."""
    tier, _ = near()
    for e in (
        entry("x.gts", alias="x"),
        entry("mid", deps=("x",)),
        entry("top", deps=("mid",)),
        entry("side", deps=("y",)),
        Entry(Key("https://other/", "mid"), 1, deps=("x",)),
    ):
        tier.put(e, epoch=tier.epoch())
    assert tier.evict_names(NS, ["x"]) == 3
    assert tier.get(Key(NS, "side")) is not None
    assert tier.get(Key("https://other/", "mid")) is not None
    assert all(tier.get(Key(NS, n)) is None for n in ("x.gts", "mid", "top"))


def test_alias_reads_respect_scope_and_user() -> None:
    """A read by alias finds the entry aliased by its name within its scope and user only."""
    tier, _ = near()
    tier.put(entry("x.gts", alias="x", scope="realm-auth", user="@bob"), epoch=tier.epoch())
    assert tier.get(Key(NS, "x", "realm-auth", "@bob"), by_alias=True) is not None
    assert tier.get(Key(NS, "x", "realm-auth", "@eve"), by_alias=True) is None
    assert tier.get(Key(NS, "x", "realm-auth", "@bob")) is None  # not asked by alias


def test_namespace_and_global_clears() -> None:
    """Clearing a namespace evicts only it; clearing everything empties the tier."""
    tier, _ = near()
    tier.put(entry("a"), epoch=tier.epoch())
    tier.put(Entry(Key("https://other/", "b"), 1), epoch=tier.epoch())
    assert tier.evict_namespace(NS) == 1
    assert tier.get(Key("https://other/", "b")) is not None
    assert tier.clear() == 1
    assert len(tier) == 0


def test_bad_bounds_are_refused() -> None:
    """A tier of no entries or no bytes is a configuration error."""
    with pytest.raises(ConfigurationError):
        near(max_entries=0)
    with pytest.raises(ConfigurationError):
        near(max_bytes=0)


@pytest.mark.slow
def test_the_bound_holds_under_100000_distinct_keys() -> None:
    """100,000 distinct keys through a tier of 1,000 entries: it keeps 1,000, its indexes
    shrink with it, and the memory it holds stays bounded (printed: run with -s)."""
    tier, _ = near(max_entries=1000)
    tracemalloc.start()
    try:
        for i in range(100_000):
            tier.put(
                entry(f"https://realm.example/m{i}.gts", alias=f"m{i}", deps=("base",)),
                epoch=tier.epoch(),
            )
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tier) == 1000
    assert len(tier._by_name) == len(tier._by_alias) == 1000
    assert len(tier._by_dep[NS, "base"]) == 1000
    print(f"near tier of 1,000 entries after 100,000 fills: {held / 1e6:.2f} MB traced")
    assert held < 20e6


class CountingStore(MemoryStore):
    """A memory store that counts reads and can hold one read at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    async def read(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        self.reads += 1
        found = await super().read(key, by_alias=by_alias)
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return found


async def produce(key: Key) -> Produced[Any]:
    """A value naming its key."""
    return Produced(value={"name": key.name}, deps=("base",))


async def test_a_lookup_serves_repeated_hits_from_the_near_tier() -> None:
    """After the first get, hits come from memory: the store is not read again."""
    store = CountingStore()
    tier, _ = near()
    lookup: CachingLookup[Any] = CachingLookup(store, near=tier)
    first = await lookup.get(Key(NS, "a"), produce)
    reads = store.reads
    for _ in range(10):
        assert await lookup.get(Key(NS, "a"), produce) == first
    assert store.reads == reads
    assert lookup.stats()["near_hits"] == 10


async def test_local_and_remote_invalidations_evict_from_the_near_tier() -> None:
    """This process's invalidation and a peer's broadcast (replayed on the lookup) both
    evict, dependents included, so the next get reads the store."""
    store = CountingStore()
    tier, _ = near()
    lookup: CachingLookup[Any] = CachingLookup(store, near=tier)
    for name in ("base", "a", "b"):
        await lookup.get(Key(NS, name), produce)
    await lookup.invalidate(NS, ["base"])
    assert len(tier) == 0  # base, and a and b through their deps
    await lookup.get(Key(NS, "a"), produce)
    lookup.on_names_invalidated(NS, ["a"])  # as the listener replays a peer's broadcast
    assert tier.get(Key(NS, "a")) is None
    lookup.on_notifications_lost()
    assert len(tier) == 0


async def test_a_fill_racing_an_invalidation_leaves_nothing_stale() -> None:
    """A get whose store read saw the old entry, with the invalidation heard before the
    fill: the old entry is returned to that get (it began first) but never kept."""
    store = CountingStore()
    tier, _ = near()
    lookup: CachingLookup[Any] = CachingLookup(store, near=tier)
    await store.write(Entry(Key(NS, "a"), {"v": "old"}))
    store.gate = asyncio.Event()
    reading = asyncio.create_task(lookup.get(Key(NS, "a"), produce))
    await store.reading.wait()
    await store.invalidate(NS, ["a"])  # a peer's invalidation...
    lookup.on_names_invalidated(NS, ["a"])  # ...and its broadcast, heard mid-read
    store.gate.set()
    got = await reading
    assert got is not None
    assert got.value == {"v": "old"}
    assert tier.get(Key(NS, "a")) is None
    assert tier.stats()["near_fills_dropped"] == 1
