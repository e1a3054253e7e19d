"""Expiry on every store: time to live, stale-while-revalidate, early refresh (XFetch),
purging dead entries, and the small verbs (set, delete, the decorator)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

import fleetcache
from fleetcache import CachingLookup, Key, Produced
from fleetcache.errors import ConfigurationError, InvalidInputError
from fleetcache.lookup import caching
from fleetcache.lookup.decorator import cached
from fleetcache.lookup.expiry import Expiry
from fleetcache.lookup.options import LookupOptions
from fleetcache.stores.base import Store
from waiting import eventually

NS = "https://realm.example/"


class Clock:
    """A settable clock in seconds since the epoch."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Source:
    """A produce function whose data has a version; counts its computations and can hold
    them at a gate or make them fail."""

    def __init__(self) -> None:
        self.version = 1
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.started = asyncio.Event()

    async def __call__(self, key: Key) -> Produced[Any]:
        self.calls += 1
        version = self.version
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return Produced(value={"version": version})


def key(name: str = "k") -> Key:
    """A key in the test namespace."""
    return Key(NS, name)


def lookup_for(
    store: Store,
    clock: Clock,
    *,
    ttl: float | None = None,
    stale_ttl: float | None = None,
    early_refresh: float | None = None,
    rng: random.Random | None = None,
) -> CachingLookup[Any]:
    """A lookup on ``store`` with the test clock and these expiry defaults."""
    options = LookupOptions(expiry=Expiry(ttl, stale_ttl, early_refresh))
    return CachingLookup(store, options=options, clock=clock, rng=rng)


async def value(lookup: CachingLookup[Any], source: Source, **kwargs: Any) -> Any:
    """The version ``lookup`` answers for the test key."""
    got = await lookup.get_value(key(), source, **kwargs)
    return None if got is None else got["version"]


async def test_a_value_lives_for_its_ttl_then_is_computed_again(store: Store) -> None:
    """A value is a hit until its ttl has passed; then the next get computes it again."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=10)
    assert await value(lookup, source) == 1
    source.version = 2
    clock.now += 9.9
    assert await value(lookup, source) == 1
    clock.now += 0.2
    assert await value(lookup, source) == 2
    assert source.calls == 2
    entry = await store.read(key())
    assert entry is not None
    assert entry.created_at is not None
    assert entry.expires_at == entry.stale_until == entry.created_at + 10_000


async def test_per_call_ttl_overrides_and_none_never_expires(store: Store) -> None:
    """A call's ttl wins over the lookup's; ttl=None stores a value that never expires."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=10)
    await lookup.get(key("short"), source, ttl=1)
    await lookup.get(key("forever"), source, ttl=None)
    clock.now += 1_000_000
    source.version = 2
    assert (await lookup.get_value(key("short"), source))["version"] == 2
    assert (await lookup.get_value(key("forever"), source))["version"] == 1


async def test_within_the_stale_window_callers_get_the_stale_value_and_one_refresh_runs(
    store: Store,
) -> None:
    """Past expiry but within the stale window, every caller gets the old value at once,
    while exactly one refresh (held at a gate here) runs; afterwards they get the new one."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=10, stale_ttl=60)
    assert await value(lookup, source) == 1
    clock.now += 30
    source.version, source.gate, source.started = 2, asyncio.Event(), asyncio.Event()
    answers = await asyncio.wait_for(asyncio.gather(*(value(lookup, source) for _ in range(10))), 5)
    assert answers == [1] * 10  # nobody waited for the refresh
    await source.started.wait()
    assert source.calls == 2  # one refresh for ten stale hits
    source.gate.set()
    await eventually(lambda: lookup.stats()["refreshes"] == 1 and not lookup._refreshes._running)
    assert await value(lookup, source) == 2
    stats = lookup.stats()
    assert (stats["stale_served"], stats["refresh_failures"]) == (10, 0)


async def test_a_failing_refresh_keeps_the_stale_value_until_the_window_ends(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh that raises leaves the stale value served (counted, logged with the key);
    once the window has ended the next caller waits for a computation."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=10, stale_ttl=60)
    assert await value(lookup, source) == 1
    clock.now += 30
    source.fail = RuntimeError("the backend is down")
    assert await value(lookup, source) == 1
    await eventually(lambda: lookup.stats()["refresh_failures"] == 1)
    assert await value(lookup, source) == 1
    assert any(key().coalesce_key in r.getMessage() for r in caplog.records)
    clock.now += 60
    source.fail, source.version = None, 3
    assert await value(lookup, source) == 3


async def test_an_invalidation_ends_stale_serving_at_once(store: Store) -> None:
    """Invalidating a stale entry removes it: no caller is served it again; the next one
    waits for a fresh computation."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=10, stale_ttl=60)
    assert await value(lookup, source) == 1
    clock.now += 30
    source.version = 2
    await lookup.invalidate(NS, [key().name])
    assert await value(lookup, source) == 2
    assert lookup.stats()["stale_served"] == 0


async def test_a_refresh_overtaken_by_an_invalidation_never_lands_its_old_result(
    store: Store,
) -> None:
    """A refresh that began before an invalidation is refused by the store like any
    computation: it runs again, and what is stored was computed after the invalidation."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=10, stale_ttl=60)
    assert await value(lookup, source) == 1
    clock.now += 30
    source.version, source.gate, source.started = 2, asyncio.Event(), asyncio.Event()
    assert await value(lookup, source) == 1  # stale, and the refresh starts
    await source.started.wait()
    source.version = 3
    await store.invalidate(NS, [key().name])  # another process's invalidation
    source.gate.set()
    await eventually(lambda: not lookup._refreshes._running)
    entry = await store.read(key())
    assert entry is not None
    assert entry.value == {"version": 3}
    assert lookup.stats()["stale_refused"] == 1


async def test_early_refresh_refreshes_a_hot_key_once_before_it_expires(store: Store) -> None:
    """With early_refresh (XFetch) and a fixed seed, hits shortly before expiry start one
    refresh while the value is still fresh; nobody waits and nothing expires."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=10, early_refresh=1.0, rng=random.Random(4645))

    async def slow(k: Key) -> Produced[Any]:
        clock.now += 2.0  # the computation "takes" two seconds of the test clock
        return await source(k)

    assert await lookup.get_value(key(), slow) == {"version": 1}
    entry = await store.read(key())
    assert entry is not None
    assert entry.compute_ms is not None
    entry_expiry = entry.expires_at
    source.version = 2
    early = 0
    while lookup.stats()["early_refreshes"] == 0:
        clock.now += 0.25
        assert clock.now * 1000 < entry_expiry, "expired before any early refresh"
        assert (await lookup.get_value(key(), source))["version"] == 1
        early += 1
    await eventually(lambda: not lookup._refreshes._running)
    for _ in range(20):
        assert (await lookup.get_value(key(), source))["version"] == 2
    assert lookup.stats()["refreshes"] == lookup.stats()["early_refreshes"] == 1
    assert source.calls == 2


async def test_dead_entries_are_purged_in_passing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries past their stale window (and a margin) are deleted in the background after
    a computation, so expired keys nobody asks for again do not accumulate."""
    # No purge while the entries are made: one still running when "d" asks would be joined,
    # and it judges by the clock of its own start.
    monkeypatch.setattr(caching, "PURGE_INTERVAL", 3600.0)
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock, ttl=1)
    for name in ("a", "b", "c"):
        await lookup.get(key(name), source)
    monkeypatch.setattr(caching, "PURGE_INTERVAL", 0.0)
    clock.now += 3600
    await lookup.get(key("d"), source)
    await eventually(lambda: lookup.stats()["purged"] == 3)
    assert await store.read(key("a")) is None
    assert await store.read(key("d")) is not None


async def test_expiry_options_that_make_no_sense_are_refused(store: Store) -> None:
    """Negative or zero ttls, a stale window or early refresh without a ttl are refused."""
    for options in (
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": 1, "stale_ttl": -1},
        {"stale_ttl": 5},
        {"early_refresh": 1.0},
        {"ttl": 1, "early_refresh": 0},
    ):
        with pytest.raises(ConfigurationError):
            Expiry(**options)
    lookup: CachingLookup[Any] = CachingLookup(store)
    with pytest.raises(ConfigurationError):
        await lookup.get(key(), Source(), ttl=-5)


async def test_set_stores_now_and_a_computation_that_began_before_cannot_overwrite_it(
    store: Store,
) -> None:
    """set() invalidates the key first, so a computation of the old value under way is
    refused; its caller gets a result computed after, and the stored value is the set
    one until it expires; delete() invalidates it."""
    clock, source = Clock(), Source()
    lookup = lookup_for(store, clock)
    source.gate = asyncio.Event()
    pending = asyncio.create_task(lookup.get_value(key(), source))
    await source.started.wait()
    await lookup.set(key(), {"version": "set"}, ttl=100)
    source.gate.set()
    await pending
    stored = await store.read(key())
    assert stored is not None
    assert stored.value in ({"version": "set"}, {"version": 1})
    assert lookup.stats()["stale_refused"] == 1
    await lookup.set(key(), {"version": "again"}, ttl=100)
    assert await lookup.get_value(key(), source) == {"version": "again"}
    clock.now += 101
    assert await lookup.get_value(key(), source) == {"version": 1}
    assert await lookup.delete(key()) == [key().name]
    assert await store.read(key()) is None


async def test_the_decorator_builds_keys_from_arguments_and_offers_the_small_verbs(
    store: Store,
) -> None:
    """Positional and keyword calls with defaults share an entry; invalidate, refresh and
    peek address the same entry; the function runs once per distinct arguments."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    calls: list[tuple[str, str]] = []

    @cached(lookup, namespace="prices", ttl=60)
    async def price(symbol: str, currency: str = "EUR") -> dict[str, Any]:
        calls.append((symbol, currency))
        return {"symbol": symbol, "currency": currency, "n": len(calls)}

    first = await price("ACME")
    assert await price(symbol="ACME") == first
    assert await price("ACME", "EUR") == first
    assert await price("ACME", currency="USD") != first
    assert calls == [("ACME", "EUR"), ("ACME", "USD")]
    assert price.key_for("ACME") == Key("prices", '{"currency":"EUR","symbol":"ACME"}')
    assert await price.peek("ACME") == first
    assert await price.peek("NOPE") is None
    refreshed = await price.refresh("ACME")
    assert refreshed["n"] == 3
    assert await price("ACME") == refreshed
    assert await price.invalidate("ACME") == [price.key_for("ACME").name]
    assert await price.peek("ACME") is None
    assert (await price("ACME"))["n"] == 4


async def test_the_decorator_refuses_what_cannot_form_a_key(store: Store) -> None:
    """An argument that is not JSON is refused naming the argument; a key function fixes
    it; a sync function cannot be decorated."""
    lookup: CachingLookup[Any] = CachingLookup(store)

    @cached(lookup)
    async def area(shape: object, scale: int = 1) -> int:
        return scale

    with pytest.raises(InvalidInputError, match="argument 'shape'"):
        await area({1, 2})
    with pytest.raises(InvalidInputError, match="area"):
        await area(1, 2, 3)  # type: ignore[call-arg]

    @cached(lookup, key=lambda shape, scale=1: f"{type(shape).__name__}:{scale}")
    async def keyed(shape: object, scale: int = 1) -> int:
        return scale

    assert await keyed({1, 2}, 3) == 3
    assert keyed.key_for({1}, 3).name == "set:3"
    assert keyed.namespace.endswith("keyed")

    def sync(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="async"):
        cached(lookup)(sync)  # type: ignore[arg-type]


async def test_the_front_door_offers_cached_set_and_delete() -> None:
    """fleetcache.open(...) gives cache.cached, cache.set and cache.delete, with the
    expiry defaults given when opening."""
    async with fleetcache.open("memory://", ttl=60, stale_ttl=30) as cache:

        @cache.cached(namespace="squares")
        async def square(x: int) -> int:
            return x * x

        assert await square(4) == 16
        entry = await cache.peek(square.key_for(4))
        assert entry is not None
        assert entry.expires_at is not None
        assert entry.stale_until == entry.expires_at + 30_000
        await cache.set(Key("ns", "a"), [1, 2])
        assert await cache.get_value(Key("ns", "a"), lambda k: asyncio.sleep(0)) == [1, 2]
        assert await cache.delete(Key("ns", "a")) == ["a"]
