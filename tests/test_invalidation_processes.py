"""The invalidation broadcast and the near tier between real OS processes on one Postgres
database: what process B invalidates, process A hears, evicts and never serves again."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import fleetcache
from fleet_worker import start
from fleetcache import MISSING, Fleetcache, Key, Missing, Produced
from fleetcache.stores.payloads import INVALIDATED_CHANNEL, invalidation_payloads
from fleetcache_cli.shared import Fleet
from waiting import eventually

pytestmark = pytest.mark.processes

NS = "https://realm.example/"


@pytest.fixture
async def cache(database_url: str) -> AsyncIterator[Fleetcache]:
    """Process A's cache: store, hub, listener and a near tier, no coordination."""
    opened = await fleetcache.open(database_url, coordinate=False, near=1000)
    try:
        yield opened
    finally:
        await opened.close()


def versioned(version: int, calls: list[int] | None = None) -> Any:
    """A produce function producing ``version`` (and counting its calls)."""

    async def produce(key: Key) -> Produced[Any]:
        if calls is not None:
            calls.append(version)
        return Produced(value={"name": key.name, "version": version})

    return produce


async def never(key: Key) -> Missing:
    """A produce function for a reader that must only read what B stored."""
    return MISSING


def applied(cache: Fleetcache) -> int:
    """How many broadcasts A's listener has replayed."""
    assert cache.listener is not None
    return cache.listener.stats()["applied"]


async def test_another_process_invalidating_reaches_us(
    cache: Fleetcache, database_url: str
) -> None:
    """Process B invalidates names, clears a namespace, clears everything: A's listener
    replays each on A's lookup within seconds."""
    with Fleet(1, name="test-member") as fleet:
        other = await start(fleet, 0, "--url", database_url)
        await other.call("invalidate", ns=NS, names=["mod.gts"])
        await eventually(lambda: applied(cache) == 1)
        await other.call("clear_namespace", ns=NS)
        await eventually(lambda: applied(cache) == 2)
        await other.call("clear_all")
        await eventually(lambda: applied(cache) == 3)
    assert cache.lookup.stats()["remote_invalidations"] == 3


async def test_after_the_broadcast_arrives_our_next_read_is_fresh(
    cache: Fleetcache, database_url: str
) -> None:
    """A serves a key from its near tier; B changes it (invalidate, then its own fresh
    computation); once A has heard B's broadcast, A's next read returns B's version."""
    key = Key(NS, "mod")
    assert (await cache.get_value(key, versioned(1)))["version"] == 1
    assert (await cache.get_value(key, versioned(1)))["version"] == 1
    assert cache.lookup.stats()["near_hits"] == 1
    with Fleet(1, name="test-member") as fleet:
        other = await start(fleet, 0, "--url", database_url)
        heard = applied(cache)
        await other.call("invalidate", ns=NS, names=["mod"])
        await other.call("get", ns=NS, name="mod", version=2)
        await eventually(lambda: applied(cache) > heard)
        assert (await cache.get_value(key, versioned(3)))["version"] == 2


async def test_many_fills_racing_a_peers_invalidations_leave_nothing_stale(
    cache: Fleetcache, database_url: str
) -> None:
    """100 rounds of: B stores a key's old value; A reads it from the store (to fill its
    near tier; A never computes it), late, while B invalidates it and stores a new one;
    after A has heard B's broadcast, A's read must return B's new value, never the old one
    (counted)."""
    rng = random.Random(12)
    stale: list[int] = []
    read = cache.store.read

    async def slow_read(key: Key, *, by_alias: bool = False) -> Any:
        # A's reads come back late (a busy event loop, a GC pause): the window in which
        # B's invalidation and its broadcast land between A's read and A's fill opens wide.
        found = await read(key, by_alias=by_alias)
        await asyncio.sleep(rng.uniform(0, 0.03))
        return found

    cache.store.read = slow_read  # type: ignore[method-assign]
    with Fleet(1, name="test-member") as fleet:
        other = await start(fleet, 0, "--url", database_url)
        for version in range(1, 101):
            key = Key(NS, f"race-{version}")
            await other.call("get", ns=NS, name=key.name, version=0)  # the old value
            heard = applied(cache)
            reader = asyncio.create_task(cache.get(key, never))
            await asyncio.sleep(rng.uniform(0, 0.01))
            await other.call("invalidate", ns=NS, names=[key.name])
            await other.call("get", ns=NS, name=key.name, version=version)
            await reader
            await eventually(lambda heard=heard: applied(cache) > heard)  # type: ignore[misc]
            got = await cache.get_value(key, never)
            if got is None or got["version"] != version:
                stale.append(version)
    stats = cache.lookup.stats()
    print(
        f"near hits {stats['near_hits']}, fills {stats['near_fills']}, "
        f"dropped fills {stats['near_fills_dropped']}"
    )
    assert stale == []
    # The test means something only if fills really raced the invalidations.
    assert stats["near_fills_dropped"] >= 10, stats


async def test_malformed_payloads_change_nothing(cache: Fleetcache, database_url: str) -> None:
    """Hand-sent malformed payloads are rejected; the valid one after them still applies."""
    bad = ["not json", "[123]", '""', "[]", '{"k":"module","r":"x"}', '{"k":"realm"}', '{"k":1}']
    await cache.get(Key(NS, "sentinel"), versioned(1))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for payload in bad:
            await conn.execute("SELECT pg_notify(%s, %s)", (INVALIDATED_CHANNEL, payload))
        good = invalidation_payloads(NS, ["sentinel"])[0]
        await conn.execute("SELECT pg_notify(%s, %s)", (INVALIDATED_CHANNEL, good))
    await eventually(lambda: applied(cache) == 1)
    assert cache.listener is not None
    assert cache.listener.stats()["rejected"] == len(bad)
    assert cache.lookup.near is not None
    assert cache.lookup.near.get(Key(NS, "sentinel")) is None


async def test_a_terminated_listen_connection_empties_the_near_tier_and_hears_again(
    cache: Fleetcache, database_url: str
) -> None:
    """pg_terminate_backend on A's LISTEN connection: A's near tier serves nothing from the
    moment the loss is noticed, is empty before its next near hit, and after the reconnect a
    later invalidation from B still arrives."""
    assert cache.hub is not None
    assert cache.lookup.near is not None
    hub, tier = cache.hub, cache.lookup.near
    await cache.get(Key(NS, "kept"), versioned(1))
    assert len(tier) == 1
    pid = hub.backend_pid
    assert pid is not None
    killed_at = time.monotonic()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await eventually(lambda: hub.gaps >= 1)
    assert tier.get(Key(NS, "kept")) is None  # the drop was noticed: nothing from memory
    assert len(tier) == 0
    await eventually(lambda: hub.reconnects >= 1 and hub.connected)
    print(f"reconnected {(time.monotonic() - killed_at) * 1000:.0f} ms after the kill")
    assert hub.backend_pid not in (None, pid)
    with Fleet(1, name="test-member") as fleet:
        other = await start(fleet, 0, "--url", database_url)
        heard = applied(cache)
        await other.call("invalidate", ns=NS, names=["after"])
        await eventually(lambda: applied(cache) > heard)


async def test_our_own_broadcast_is_skipped_and_splits_no_computation(cache: Fleetcache) -> None:
    """This process's own broadcast comes back through LISTEN and is skipped by origin; a
    computation started after the invalidation is joined, not computed twice."""
    calls: list[int] = []

    async def slow(key: Key) -> Produced[Any]:
        calls.append(1)
        await asyncio.sleep(0.5)
        return Produced(value={"fresh": True})

    await cache.invalidate(NS, ["mod"])
    first = asyncio.create_task(cache.get(Key(NS, "mod"), slow))
    assert cache.listener is not None
    listener = cache.listener
    await eventually(lambda: listener.stats()["own"] == 1)
    second = await cache.get(Key(NS, "mod"), slow)
    assert await first == second
    assert calls == [1]
    assert listener.stats()["applied"] == 0
