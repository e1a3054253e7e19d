"""The invalidation broadcast between real OS processes on one Postgres database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from fleet import Worker, fleet
from fleetcache.factory import Fleetcache, open_cache
from fleetcache.lookup import Produced
from fleetcache.notifications.broadcast import INVALIDATED_CHANNEL, encode_module_payloads
from fleetcache.stores import Key

pytestmark = pytest.mark.processes

NS = "https://realm.example/"


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll ``condition`` until true; return the seconds it took (fail after ``timeout``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def cache(database_url: str) -> AsyncIterator[Fleetcache]:
    """Process A's cache: store, hub and invalidation listener, no coordination."""
    opened = await open_cache(database_url, coordinate=False)
    try:
        yield opened
    finally:
        await opened.close()


async def test_another_process_invalidating_moves_our_generations(
    cache: Fleetcache, database_url: str
) -> None:
    """Process B invalidates a module, clears a realm, clears all: process A's
    generations for each move within seconds."""
    lookup = cache.lookup
    async with fleet() as workers:
        other = await Worker.start("--url", database_url)
        workers.append(other)
        await other.call("invalidate", ns=NS, names=["mod.gts"])
        await wait_until(lambda: lookup.generation(NS, "mod.gts") == 1)
        assert lookup.generation(NS) == 0
        await other.call("clear_namespace", ns=NS)
        await wait_until(lambda: lookup.generation(NS) == 1)
        assert lookup.generation() == 0
        await other.call("clear_all")
        await wait_until(lambda: lookup.generation() == 1)


async def test_broadcast_discards_our_computation_before_the_store_must_refuse(
    cache: Fleetcache, database_url: str
) -> None:
    """With the broadcast heard in time, A discards its doomed result itself."""
    started = asyncio.Event()

    async def slow(name: str) -> Produced:
        started.set()
        await asyncio.sleep(1.0)
        return Produced(value={"stale": True})

    async with fleet() as workers:
        other = await Worker.start("--url", database_url)
        workers.append(other)
        pending = asyncio.create_task(cache.lookup.get(Key(NS, "mod"), slow))
        await started.wait()
        await other.call("invalidate", ns=NS, names=["mod"])
        await wait_until(lambda: cache.lookup.generation(NS, "mod") == 1)
        assert await pending is None
    stats = cache.lookup.stats()
    assert stats["stale_discarded"] == 1
    assert stats["stale_refused"] == 0
    assert await cache.store.read(Key(NS, "mod")) is None


async def test_malformed_payloads_change_nothing(cache: Fleetcache, database_url: str) -> None:
    """Hand-sent malformed payloads are rejected; the valid one after them still applies."""
    bad = ["not json", "[123]", '""', "[]", '{"k":"module","r":"x"}', '{"k":"realm"}', '{"k":1}']
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for payload in bad:
            await conn.execute("SELECT pg_notify(%s, %s)", (INVALIDATED_CHANNEL, payload))
        good = encode_module_payloads(NS, ["sentinel"])[0]
        await conn.execute("SELECT pg_notify(%s, %s)", (INVALIDATED_CHANNEL, good))
    await wait_until(lambda: cache.lookup.generation(NS, "sentinel") == 1)
    assert cache.lookup.generation() == 0
    assert cache.lookup.generation(NS) == 0
    assert cache.lookup.generation("x") == 0
    assert cache.listener is not None
    assert cache.listener.stats()["rejected"] == len(bad)


async def test_terminated_listen_connection_reconnects_and_hears_again(
    cache: Fleetcache, database_url: str
) -> None:
    """pg_terminate_backend on A's LISTEN connection: the hub reconnects, the gap bumps the
    global generation, and a later invalidation from process B still arrives."""
    assert cache.hub is not None
    hub = cache.hub
    pid = hub.backend_pid
    assert pid is not None
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    took = await wait_until(lambda: hub.reconnects >= 1 and cache.lookup.generation() >= 1)
    print(f"reconnected and bumped the global generation {took * 1000:.0f} ms after the kill")
    assert hub.backend_pid not in (None, pid)
    async with fleet() as workers:
        other = await Worker.start("--url", database_url)
        workers.append(other)
        await other.call("invalidate", ns=NS, names=["after"])
        await wait_until(lambda: cache.lookup.generation(NS, "after") == 1)


async def test_our_own_broadcast_does_not_split_a_fresh_computation(cache: Fleetcache) -> None:
    """A computation started after this process's own invalidation is not dropped when the
    broadcast's echo comes back, so a later caller joins it instead of computing again."""
    calls: list[str] = []

    async def slow(name: str) -> Produced:
        calls.append(name)
        await asyncio.sleep(0.5)
        return Produced(value={"fresh": True})

    await cache.lookup.invalidate(NS, ["mod"])
    first = asyncio.create_task(cache.lookup.get(Key(NS, "mod"), slow))
    assert cache.listener is not None
    listener = cache.listener
    await wait_until(lambda: listener.stats()["echoes"] == 1)
    second = await cache.lookup.get(Key(NS, "mod"), slow)
    assert await first == second
    assert calls == ["mod"]
