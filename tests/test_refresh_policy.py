"""How a refresh stores and when it runs, on every store: with the expiry of the call that
started it, yielding to a newer computation when overtaken, and backing off per key after
failures (with a clock the test controls)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fleetcache import CachingLookup, Key, Produced
from fleetcache.lookup.backoff import Backoff
from fleetcache.lookup.expiry import Expiry
from fleetcache.lookup.options import LookupOptions
from fleetcache.stores.base import Store
from waiting import eventually

NS = "https://realm.example/"
KEY = Key(NS, "k")


class Clock:
    """A settable clock in seconds since the epoch, on a whole second (so quarter-second
    steps add up exactly)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class Source:
    """A produce function whose data has a version; counts its calls, can hold them at
    ``gate`` (read when a call begins) and make them fail."""

    def __init__(self) -> None:
        self.version = 1
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.started = asyncio.Event()

    async def __call__(self, key: Key) -> Produced[Any]:
        self.calls += 1
        version, gate = self.version, self.gate
        self.started.set()
        if gate is not None:
            await gate.wait()
        if self.fail is not None:
            raise self.fail
        return Produced(value={"version": version})


async def version(lookup: CachingLookup[Any], source: Source, **options: Any) -> Any:
    """The version ``lookup`` answers for the test key."""
    got = await lookup.get_value(KEY, source, **options)
    return None if got is None else got["version"]


async def refreshed(lookup: CachingLookup[Any]) -> None:
    """Wait until no refresh is under way."""
    await eventually(lambda: not lookup._refreshes._running)


async def test_a_refresh_stores_its_value_with_the_expiry_of_the_call_that_started_it(
    store: Store,
) -> None:
    """A key written with ttl=1, read in its stale window by a call asking ttl=30: the one
    refresh stores the new value for 30 s (not the old entry's 1 s), so reads over the next
    seconds are fresh hits and no second refresh runs."""
    clock, source = Clock(), Source()
    lookup: CachingLookup[Any] = CachingLookup(store, clock=clock)
    assert await version(lookup, source, ttl=1, stale_ttl=60) == 1
    clock.now += 2
    source.version = 2
    assert await version(lookup, source, ttl=30, stale_ttl=60) == 1  # stale: refresh starts
    await refreshed(lookup)
    entry = await store.read(KEY)
    assert entry is not None
    assert entry.created_at is not None
    assert (entry.expires_at, entry.stale_until) == (
        entry.created_at + 30_000,
        entry.created_at + 90_000,
    )
    source.version = 3
    for _ in range(10):
        clock.now += 2
        assert await version(lookup, source, ttl=30, stale_ttl=60) == 2
    await refreshed(lookup)
    stats = lookup.stats()
    assert (stats["refreshes"], stats["stale_served"], source.calls) == (1, 1, 2)


async def test_a_refresh_overtaken_while_a_newer_computation_runs_yields_to_it(
    store: Store,
) -> None:
    """A refresh under way when its key is invalidated, while a caller who came after the
    invalidation computes it anew: the refresh's result is refused and it stops (nobody
    waits for it) instead of computing a third time; that is not a failed refresh."""
    clock, source = Clock(), Source()
    lookup: CachingLookup[Any] = CachingLookup(
        store, options=LookupOptions(expiry=Expiry(10, 60)), clock=clock
    )
    assert await version(lookup, source) == 1
    clock.now += 30
    refresh_gate, miss_gate = asyncio.Event(), asyncio.Event()
    source.version, source.gate, source.started = 2, refresh_gate, asyncio.Event()
    assert await version(lookup, source) == 1  # stale: the refresh starts, held
    await source.started.wait()
    source.version, source.gate = 3, miss_gate
    await lookup.invalidate(NS, [KEY.name])
    miss = asyncio.create_task(version(lookup, source))
    await eventually(lambda: source.calls == 3)  # the newer computation, held
    refresh_gate.set()  # the refresh's write is refused
    await eventually(lambda: lookup.stats().get("overtaken") == 1 or source.calls > 3)
    miss_gate.set()
    assert await asyncio.wait_for(miss, 30) == 3
    await refreshed(lookup)
    assert source.calls == 3
    stats = lookup.stats()
    assert (stats["stale_refused"], stats["refresh_failures"]) == (1, 0)


async def test_a_failing_refresh_backs_off_per_key_and_a_success_resets_it(store: Store) -> None:
    """A refresh that always fails, under stale hits every 0.25 s for 20 s: this process
    refreshes at 0, 1, 3, 7 and 15 s (1 s doubling), not on each of the 80 hits; the other
    hits are counted as backed off. Once a refresh succeeds, the next failure waits 1 s
    again."""
    clock, source = Clock(), Source()
    lookup: CachingLookup[Any] = CachingLookup(
        store, options=LookupOptions(expiry=Expiry(10, 600)), clock=clock
    )
    assert await version(lookup, source) == 1
    source.fail = RuntimeError("the backend is down")
    start = clock.now + 30
    for i in range(80):
        clock.now = start + i * 0.25
        assert await version(lookup, source) == 1
        await refreshed(lookup)
    assert source.calls == 1 + 5
    stats = lookup.stats()
    assert (stats["refresh_failures"], stats["refreshes_backed_off"]) == (5, 75)
    clock.now = start + 31  # 16 s after the last failure
    source.fail, source.version = None, 2
    assert await version(lookup, source) == 1
    await refreshed(lookup)
    assert await version(lookup, source) == 2
    clock.now += 20  # stale again
    source.fail = RuntimeError("down again")
    assert await version(lookup, source) == 2
    await refreshed(lookup)
    clock.now += 1  # one second, as after a first failure
    assert await version(lookup, source) == 2
    await refreshed(lookup)
    assert source.calls == 1 + 5 + 1 + 2
    assert lookup.stats()["refresh_failures"] == 7


def test_backoff_doubles_to_its_cap_and_remembers_a_bounded_number_of_keys() -> None:
    """Backoff: 1 s, doubling to the cap; a success forgets the key; at most max_keys keys
    are remembered (the oldest failure goes first); a clock that goes back unblocks."""
    clock = Clock()
    backoff: Backoff[str] = Backoff(clock, first=1.0, cap=8.0, max_keys=3)
    assert [backoff.failed("a") for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.blocked("a")
    clock.now += 7.5
    assert backoff.blocked("a")
    clock.now += 0.5
    assert not backoff.blocked("a")
    backoff.succeeded("a")
    assert backoff.failed("a") == 1.0
    for name in ("b", "c", "d"):
        backoff.failed(name)
    assert len(backoff) == 3
    assert not backoff.blocked("a")  # the oldest failure was forgotten
    assert backoff.blocked("d")
    clock.now -= 3600
    assert not backoff.blocked("d")
