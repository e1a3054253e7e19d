"""A computation overtaken by an invalidation joins the newer one instead of computing a
third time (uncoordinated, and coordinated on memory, sqlite and Postgres); a produce that
ignores its cancellation cannot hold its callers past compute_timeout, its late result is
never stored, and the error says what happened."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import fleetcache
from fleetcache.coordination.local import LocalCoordinator
from fleetcache.errors import ComputationTimeoutError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.options import LookupOptions
from fleetcache.lookup.populate import Produced
from fleetcache.stores.base import Entry, Key, Store
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.sqlite import SqliteStore
from test_caching_lookup import ReleaseGatedCoordinator
from waiting import eventually

NS = "https://realm.example/"
KEY = Key(NS, "https://realm.example/module.gts")
#: A generous bound on a test's own waits (never an assertion about speed).
BOUND = 30.0
T = TypeVar("T")


class Renders:
    """A produce function that counts its calls and holds the n-th of the first ``held``
    at ``gates[n]``; each produces the version the source had when the call began."""

    def __init__(self, held: int) -> None:
        self.version = 1
        self.calls = 0
        self.gates = [asyncio.Event() for _ in range(held)]
        self.started = [asyncio.Event() for _ in range(held)]

    async def __call__(self, key: Key) -> Produced[Any]:
        n = self.calls
        self.calls += 1
        version = self.version
        if n < len(self.gates):
            self.started[n].set()
            await self.gates[n].wait()
        return Produced(value={"version": version})


def versions(entries: list[Entry | None]) -> list[int]:
    """The version each answer was produced from."""
    return [e.value["version"] if e is not None else -1 for e in entries]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def coordinated(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[CachingLookup[Any]]:
    """A lookup with a coordinator: the local one on memory and sqlite, the fleet's on
    Postgres (its own pool, hub and lock connections, as ``fleetcache.open`` wires them)."""
    if request.param == "postgres":
        url = request.getfixturevalue("database_url")
        options: dict[str, Any] = {"compute_timeout": 0.5, "wait_timeout": 30, "max_rounds": 2}
        async with fleetcache.open(url, **options) as cache:
            assert cache.coordinator is not None
            yield cache.lookup
        return
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "c.db")
    await store.open()
    coordinator = LocalCoordinator()
    await coordinator.start()
    lookup: CachingLookup[Any] = CachingLookup(
        store,
        coordinator=coordinator,
        options=LookupOptions(compute_timeout=0.5, wait_timeout=30, max_rounds=2),
    )
    try:
        yield lookup
    finally:
        await lookup.close()
        await coordinator.close()
        await store.close()


# ------------------------------------------------------------ overtaken computations


async def test_a_refused_computation_joins_the_newer_one_instead_of_computing_again(
    store: Store,
) -> None:
    """A render A is overtaken by an invalidation while callers B and C, who came after it,
    already run a newer render: A's result is refused and A's caller joins B's render — two
    renders in all, not three — and all three get the version rendered after the change."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    renders = Renders(held=2)
    a = asyncio.create_task(lookup.get(KEY, renders))
    await renders.started[0].wait()
    renders.version = 2  # the module changes, then the cache is told
    await lookup.invalidate(NS, [KEY.name])
    b, c = (asyncio.create_task(lookup.get(KEY, renders)) for _ in range(2))
    await renders.started[1].wait()
    await eventually(lambda: lookup.stats()["coalesced"] == 1)  # C joined B
    renders.gates[0].set()  # A's render finishes; its write is refused
    await eventually(lambda: lookup.stats().get("overtaken") == 1 or renders.calls > 2)
    renders.gates[1].set()
    results = await asyncio.wait_for(asyncio.gather(a, b, c), BOUND)
    assert renders.calls == 2
    assert versions(results) == [2, 2, 2]
    assert results[0] == results[1]
    assert lookup.stats()["stale_refused"] == 1


async def test_a_refused_computation_with_a_coordinator_releases_its_lock_before_joining(
    coordinated: CachingLookup[Any],
) -> None:
    """With a coordinator, A holds the key's lock while it renders and B's newer flight
    waits for that lock: A's refused result is answered by B's render (B wins the lock once
    A released it, instead of A rendering again under the lock) — two renders, nobody
    waits out a timeout, everyone gets the new version."""
    lookup = coordinated
    renders = Renders(held=2)
    a = asyncio.create_task(lookup.get(KEY, renders))
    await renders.started[0].wait()
    renders.version = 2
    await lookup.invalidate(NS, [KEY.name])
    b, c = (asyncio.create_task(lookup.get(KEY, renders)) for _ in range(2))
    coordinator = lookup.coordinator
    assert coordinator is not None
    await eventually(lambda: coordinator.stats()["lock_lost"] >= 1)  # B waits for A's lock
    await eventually(lambda: lookup.stats()["coalesced"] == 1)  # C joined B
    renders.gates[0].set()
    await asyncio.wait_for(renders.started[1].wait(), BOUND)
    renders.gates[1].set()
    results = await asyncio.wait_for(asyncio.gather(a, b, c), BOUND)
    assert renders.calls == 2
    assert versions(results) == [2, 2, 2]
    stats = lookup.stats()
    assert coordinator.stats()["lock_won"] == 2  # A's render, then B's after A released
    assert stats["gave_up"] == coordinator.stats()["woken_timeout"] == 0
    assert (stats["stale_refused"], stats["overtaken"]) == (1, 1)


# ---------------------------------------------------------- produce ignoring cancellation


class Stubborn:
    """A produce function that swallows the first cancellation it gets: then it waits to be
    let go and returns a value (``late``), or ends at a second cancellation (close)."""

    def __init__(self) -> None:
        self.calls = 0
        self.ignored = asyncio.Event()
        self.let_go = asyncio.Event()
        self.returned = asyncio.Event()
        self.ended = asyncio.Event()

    async def __call__(self, key: Key) -> Produced[Any]:
        self.calls += 1
        try:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.ignored.set()
            await self.let_go.wait()
            self.returned.set()
            return Produced(value="late")
        finally:
            self.ended.set()


async def test_a_produce_ignoring_cancellation_answers_its_callers_at_compute_timeout(
    store: Store,
) -> None:
    """A produce that swallows its cancellation: every caller sharing it gets
    ComputationTimeoutError naming the real compute_timeout (not a larger bound), while the
    produce is still running; its late result is never stored, and the next caller
    computes afresh."""
    lookup: CachingLookup[Any] = CachingLookup(store, options=LookupOptions(compute_timeout=0.3))
    stubborn = Stubborn()
    callers = [asyncio.create_task(lookup.get(KEY, stubborn)) for _ in range(2)]
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), BOUND)
    assert all(isinstance(r, ComputationTimeoutError) for r in results)
    assert stubborn.ignored.is_set()
    assert not stubborn.ended.is_set()  # still running: nobody waited for it
    stubborn.let_go.set()
    await asyncio.wait_for(stubborn.ended.wait(), BOUND)
    assert stubborn.returned.is_set()
    await eventually(lambda: not lookup._flights._running)
    assert await store.read(KEY) is None  # the late result went nowhere
    assert "within compute_timeout=0.3 s" in str(results[0])
    assert stubborn.calls == 1

    async def produce(k: Key) -> Produced[Any]:
        return Produced(value="fresh")

    again = await lookup.get(KEY, produce)
    assert again is not None
    assert again.value == "fresh"
    await lookup.close()


async def test_close_ends_a_produce_abandoned_at_its_compute_timeout(store: Store) -> None:
    """A produce abandoned at its compute timeout is still tracked: close() cancels it
    again (this one then ends) and waits for it within its timeout."""
    lookup: CachingLookup[Any] = CachingLookup(store, options=LookupOptions(compute_timeout=0.2))
    stubborn = Stubborn()
    with pytest.raises(ComputationTimeoutError):
        await asyncio.wait_for(lookup.get(KEY, stubborn), BOUND)
    assert not stubborn.ended.is_set()
    await lookup.close(timeout=BOUND)
    assert stubborn.ended.is_set()
    assert not stubborn.returned.is_set()


async def test_with_a_coordinator_a_produce_ignoring_cancellation_is_bounded_by_compute_timeout(
    coordinated: CachingLookup[Any],
) -> None:
    """With a coordinator (waiting budget 2 x 30 s) the computing process's callers, the
    starter and one that joined, are answered at compute_timeout, not after the waiting
    budget; the error names compute_timeout=0.5 s; the lock is free again at once."""
    lookup = coordinated
    stubborn = Stubborn()
    callers = [asyncio.create_task(lookup.get(KEY, stubborn)) for _ in range(2)]
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), BOUND)
    assert all(isinstance(r, ComputationTimeoutError) for r in results), results
    assert "within compute_timeout=0.5 s" in str(results[0])
    assert not stubborn.ended.is_set()

    async def produce(k: Key) -> Produced[Any]:
        return Produced(value="fresh")

    again = await asyncio.wait_for(lookup.get(KEY, produce), BOUND)
    assert again is not None
    assert again.value == "fresh"
    assert lookup.stats()["gave_up"] == 0
    stubborn.let_go.set()
    await asyncio.wait_for(stubborn.ended.wait(), BOUND)
    entry = await lookup.store.read(KEY)
    assert entry is not None
    assert entry.value == "fresh"  # the abandoned produce's late result went nowhere


async def test_a_caller_whose_own_bound_runs_out_is_told_what_it_waited_for(
    store: Store,
) -> None:
    """When a caller's whole bound runs out first (here the lock's release hangs), its
    ComputationTimeoutError says it gave up after waiting, and what its bound is made of —
    it does not claim that compute_timeout was the bound."""
    coordinator = ReleaseGatedCoordinator()  # its winner hangs before it releases
    await coordinator.start()
    lookup: CachingLookup[Any] = CachingLookup(
        store,
        coordinator=coordinator,
        options=LookupOptions(compute_timeout=0.2, wait_timeout=0.1, max_rounds=1),
    )

    async def produce(k: Key) -> Produced[Any]:
        return Produced(value="v")

    try:
        with pytest.raises(ComputationTimeoutError) as raised:
            await asyncio.wait_for(lookup.get(KEY, produce), BOUND)
        message = str(raised.value)
        assert message.startswith(f"gave up on key {KEY.coalesce_key} after waiting ")
        assert (
            "(max_rounds=1 x wait_timeout=0.1 s for another process's computation, then "
            "compute_timeout=0.2 s + 1 s)" in message
        )
        assert raised.value.waited is not None
        assert raised.value.seconds == 0.2
    finally:
        coordinator.gate.set()
        await lookup.close()
        await coordinator.close()
