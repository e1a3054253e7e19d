"""The coordinated path of CachingLookup / CachingDefinitionLookup on a real Postgres,
with each lookup owning its own pool, hub and coordinator (as separate processes would)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetcache.coordination.local import LocalCoordinator
from fleetcache.definitions import (
    CachingDefinitionLookup,
    HttpPrerenderer,
    ModuleSpec,
    Realm,
    SimulatedPrerenderServer,
)
from fleetcache.errors import CoordinationGaveUpError
from fleetcache.factory import Fleetcache, coalesce_flag_enabled, open_cache
from fleetcache.lookup import MISSING, CachingLookup, Missing, Produced
from fleetcache.stores import Key, SqliteStore

REALM = Realm("https://realm.example/", "public", "owner")
MODULE = REALM.url + "card.gts"


@pytest.fixture
async def server() -> AsyncIterator[SimulatedPrerenderServer]:
    """A simulated prerender server with one module and some latency."""
    async with SimulatedPrerenderServer({MODULE: ModuleSpec(["Card"])}, latency=0.3) as s:
        yield s


async def definitions_over(
    cache: Fleetcache, server: SimulatedPrerenderServer
) -> tuple[CachingDefinitionLookup, HttpPrerenderer]:
    """A definitions lookup over ``cache`` with the test realm registered."""
    prerenderer = HttpPrerenderer(server.base_url, auth="test-token")
    lookup = CachingDefinitionLookup.over(cache.lookup, prerenderer)
    lookup.register_realm(REALM)
    return lookup, prerenderer


async def test_two_coordinated_lookups_render_a_module_once(
    database_url: str, server: SimulatedPrerenderServer
) -> None:
    """Two lookups, each with its own coordinator, asking for one module at once: exactly
    one prerender in total, and both get the row."""
    first = await open_cache(database_url, coordinate=True)
    second = await open_cache(database_url, coordinate=True)
    try:
        lookup_a, pre_a = await definitions_over(first, server)
        lookup_b, pre_b = await definitions_over(second, server)
        a, b = await asyncio.gather(
            lookup_a.get_cached_definitions(MODULE), lookup_b.get_cached_definitions(MODULE)
        )
        assert a is not None
        assert b is not None
        assert a.definitions == b.definitions
        assert server.render_counts() == {MODULE: 1}
        stats = [first.lookup.stats(), second.lookup.stats()]
        assert sorted(s["lock_won"] for s in stats) == [0, 1]
        await pre_a.aclose()
        await pre_b.aclose()
    finally:
        await first.close()
        await second.close()


async def test_without_a_coordinator_it_still_works(
    database_url: str, server: SimulatedPrerenderServer
) -> None:
    """With coordination off the lookup renders and caches as before, taking no lock."""
    cache = await open_cache(database_url, coordinate=False)
    try:
        assert cache.coordinator is None
        lookup, pre = await definitions_over(cache, server)
        assert await lookup.get_cached_definitions(MODULE) is not None
        assert await lookup.get_cached_definitions(MODULE) is not None
        assert server.render_counts() == {MODULE: 1}
        assert cache.lookup.stats()["lock_won"] == 0
        await pre.aclose()
    finally:
        await cache.close()


async def test_a_cache_hit_never_touches_the_lock(
    database_url: str, server: SimulatedPrerenderServer
) -> None:
    """A fresh coordinated lookup reading an already-cached module neither renders nor
    tries the lock."""
    warm = await open_cache(database_url, coordinate=True)
    cold = await open_cache(database_url, coordinate=True)
    try:
        lookup, pre = await definitions_over(warm, server)
        await lookup.get_cached_definitions(MODULE)
        other, other_pre = await definitions_over(cold, server)
        assert await other.get_cached_definitions(MODULE) is not None
        assert server.render_counts() == {MODULE: 1}
        assert cold.coordinator is not None
        coordinator_stats = cold.coordinator.stats()
        assert coordinator_stats["lock_won"] == coordinator_stats["lock_lost"] == 0
        assert cold.lookup.stats()["hits"] == 1
        await pre.aclose()
        await other_pre.aclose()
    finally:
        await warm.close()
        await cold.close()


async def test_pool_of_two_with_five_distinct_winners(database_url: str) -> None:
    """With a pool of 2 connections, 5 concurrent coordinated misses on distinct keys all
    complete: a winner computes and persists on its one locked connection."""
    cache = await open_cache(database_url, coordinate=True, pool_size=2)
    try:

        async def produce(name: str) -> Produced:
            await asyncio.sleep(0.2)
            return Produced(value={"name": name})

        results = await asyncio.wait_for(
            asyncio.gather(*(cache.lookup.get(Key("ns", f"k{i}"), produce) for i in range(5))),
            60,
        )
        assert [r.value["name"] for r in results if r is not None] == [f"k{i}" for i in range(5)]
        assert cache.lookup.stats()["lock_won"] == 5
    finally:
        await cache.close()


async def test_gives_up_with_a_clear_error_after_the_last_round(tmp_path: Path) -> None:
    """A key whose holder never finishes makes a waiter give up after max_rounds with an
    error naming the key, the rounds and the wait."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    coordinator = LocalCoordinator()
    holder = CachingLookup(store, coordinator=coordinator)
    waiter = CachingLookup(store, coordinator=coordinator, max_rounds=2, wait_timeout=0.2)
    release = asyncio.Event()

    async def forever(name: str) -> Produced:
        await release.wait()
        return Produced(value={})

    try:
        holding = asyncio.create_task(holder.get(Key("ns", "stuck"), forever))
        await asyncio.sleep(0.05)
        with pytest.raises(CoordinationGaveUpError, match=r"'ns\|stuck\|public\|' after 2 rounds"):
            await waiter.get(Key("ns", "stuck"), forever)
        release.set()
        assert await holding is not None
    finally:
        await holder.close()
        await waiter.close()
        await coordinator.close()
        await store.close()


async def test_coalesce_flag_parsing() -> None:
    """PRERENDER_COALESCE_ACROSS_PROCESSES=true turns coordination on; default off."""
    assert coalesce_flag_enabled({"PRERENDER_COALESCE_ACROSS_PROCESSES": "true"})
    assert not coalesce_flag_enabled({})
    assert not coalesce_flag_enabled({"PRERENDER_COALESCE_ACROSS_PROCESSES": "false"})


async def test_flag_is_ignored_for_sqlite_with_one_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On sqlite the flag builds no coordinator and says so once."""
    monkeypatch.setenv("PRERENDER_COALESCE_ACROSS_PROCESSES", "true")
    monkeypatch.setattr("fleetcache.factory._flag_ignored_logged", False)
    caplog.set_level("INFO", logger="fleetcache.factory")
    for _ in range(2):
        cache = await open_cache(f"sqlite:///{tmp_path / 'c.db'}")
        assert cache.coordinator is None
        await cache.close()
    assert sum("is ignored" in r.getMessage() for r in caplog.records) == 1


async def test_open_refuses_an_unknown_url() -> None:
    """An unsupported URL scheme is a clear configuration error."""
    from fleetcache.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="unsupported cache URL"):
        await open_cache("redis://localhost")


async def test_memory_url_opens_a_memory_cache() -> None:
    """memory:// gives a working cache without any server."""
    async with await open_cache("memory://") as cache:

        async def produce(name: str) -> Produced:
            return Produced(value=1)

        assert (await cache.lookup.get(Key("ns", "a"), produce)) is not None


async def test_bare_and_extension_requests_take_turns_on_one_lock(tmp_path: Path) -> None:
    """Concurrent coordinated requests for "x" (trying candidates) and "x.gts" share the
    alias family's lock, so x.gts is produced once and both get its row."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    coordinator = LocalCoordinator()
    lookup = CachingLookup(store, coordinator=coordinator)
    calls: list[str] = []

    async def produce(name: str) -> Produced:
        calls.append(name)
        await asyncio.sleep(0.2)
        return Produced(value={"name": name})

    try:
        bare, explicit = await asyncio.gather(
            lookup.get(Key("ns", "x"), produce, candidates=["x.gts", "x"], alias="x"),
            lookup.get(Key("ns", "x.gts"), produce, alias="x"),
        )
        assert calls == ["x.gts"]
        assert bare == explicit
    finally:
        await lookup.close()
        await coordinator.close()
        await store.close()


async def test_many_waiters_for_a_missing_key_all_get_none(tmp_path: Path) -> None:
    """Six coordinated lookups (as six processes would) asking for a key that does not
    exist all answer None: rounds ended by a NOTIFY that stored nothing do not use up
    max_rounds, so none of them gives up with a coordination error."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    coordinator = LocalCoordinator()
    lookups = [CachingLookup(store, coordinator=coordinator) for _ in range(6)]

    async def missing(name: str) -> Missing:
        await asyncio.sleep(0.05)
        return MISSING

    try:
        results = await asyncio.gather(
            *(lookup.get(Key("ns", "gone"), missing) for lookup in lookups)
        )
        assert results == [None] * 6
        assert sum(lookup.stats()["gave_up"] for lookup in lookups) == 0
    finally:
        for lookup in lookups:
            await lookup.close()
        await coordinator.close()
        await store.close()
