"""The invalidation broadcast is sent in the invalidation's own transaction: delivered
exactly when it commits (a caller cancelled after the commit cannot lose it), never after
a rollback, on every path that invalidates, carrying the store's origin."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import fleetcache
from fleet_worker import start
from fleetcache import _pg
from fleetcache.errors import ConfigurationError, StoreError
from fleetcache.notifications.broadcast import Invalidation, parse_invalidation
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.payloads import INVALIDATED_CHANNEL
from fleetcache.stores.postgres import PostgresStore
from fleetcache_cli.shared import Fleet
from waiting import eventually

pytestmark = pytest.mark.postgres

NS = "https://realm.example/"
HUB = NS + "hub.gts"
WAIT = 20.0  # generous bound on any wait; never an assertion about speed


@pytest.fixture
async def listening(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A plain connection LISTENing on the invalidated channel."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await conn.execute(f"LISTEN {INVALIDATED_CHANNEL}")
    try:
        yield conn
    finally:
        await conn.close()


async def heard(conn: psycopg.AsyncConnection[Any], count: int) -> list[Invalidation]:
    """The next ``count`` announcements on a LISTENing connection, parsed (bounded wait)."""
    got: list[Invalidation] = []
    async for notify in conn.notifies(timeout=WAIT, stop_after=count):
        parsed = parse_invalidation(notify.payload)
        assert parsed is not None, notify.payload
        got.append(parsed)
    assert len(got) == count, got
    return got


@pytest.mark.processes
async def test_an_invalidation_cancelled_after_its_commit_still_reaches_a_peers_near_tier(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process invalidates a name with 40 dependents and is cancelled after the store's
    COMMIT went out (the store is gated there, as a request timeout would hit it): a peer
    process that served all 41 entries from its near tier serves the new versions stored
    afterwards, and this process's own near tier dropped them too."""
    keys = [Key(NS, HUB)] + [Key(NS, f"{NS}card-{i}.gts") for i in range(40)]
    cache = await fleetcache.open(database_url, coordinate=False, near=1000)
    try:
        for key in keys:
            deps = () if key.name == HUB else (HUB,)
            await cache.store.write(Entry(key, {"version": 1}, deps=deps))
            assert (await cache.get_value(key, never))["version"] == 1  # in our near tier
        with Fleet(1, name="test-member") as fleet:
            peer = await start(fleet, 0, "--url", database_url, "--near", "1000")
            for key in keys:  # fills the peer's near tier; the second read is a near hit
                for _ in range(2):
                    got = await peer.call("get", ns=NS, name=key.name, version=99)
                    assert got["value"] == {"version": 1}
            stats = (await peer.call("stats"))["stats"]["lookup"]
            assert stats["near_hits"] == len(keys)

            committed = asyncio.Event()
            original = _pg.pipelined_transaction

            @contextlib.asynccontextmanager
            async def commit_then_hang(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
                async with original(conn):
                    yield
                committed.set()  # the transaction is committed; its caller is still waiting
                await asyncio.Event().wait()

            monkeypatch.setattr(_pg, "pipelined_transaction", commit_then_hang)
            invalidating = asyncio.create_task(cache.invalidate(NS, [HUB]))
            await asyncio.wait_for(committed.wait(), WAIT)
            invalidating.cancel()  # the caller's request timed out
            with pytest.raises(asyncio.CancelledError):
                await invalidating
            monkeypatch.undo()

            assert cache.lookup.near is not None
            assert [cache.lookup.near.get(key) for key in keys] == [None] * len(keys)
            for key in keys:  # the new content, stored after the invalidation
                await cache.store.write(Entry(key, {"version": 2}))

            async def peer_versions() -> list[Any]:
                answers = [await peer.call("get", ns=NS, name=k.name, version=99) for k in keys]
                return [answer["value"]["version"] for answer in answers]

            versions: list[Any] = []
            for _ in range(int(WAIT / 0.1)):  # by condition, bounded
                versions = await peer_versions()
                if versions == [2] * len(keys):
                    break
                await asyncio.sleep(0.1)
            assert versions == [2] * len(keys), f"the peer still serves old versions: {versions}"
            assert [(await cache.get_value(k, never))["version"] for k in keys] == [2] * len(keys)
    finally:
        await cache.close()


async def never(key: Key) -> Any:
    """A produce for reads that must be hits."""
    raise AssertionError(f"computed {key.coalesce_key}")


async def test_an_invalidation_rolled_back_after_its_notify_delivers_nothing(
    database_url: str,
    listening: psycopg.AsyncConnection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An invalidation whose transaction fails after its pg_notify was issued (the next
    statement fails, so it rolls back) announces nothing, deletes and marks nothing; the
    first announcement a listener then hears is the next invalidation's."""
    store = PostgresStore(database_url, max_size=2)
    await store.open()
    try:
        await store.write(Entry(Key(NS, "a"), {"v": 1}))
        stamp, _ = await store.stamp_and_read(Key(NS, "b"), ["a", "b"])
        announce = PostgresStore._announce

        async def announce_then_fail(
            self: PostgresStore, conn: psycopg.AsyncConnection[Any], *args: Any
        ) -> None:
            await announce(self, conn, *args)
            await conn.execute("SELECT 1 / 0")  # after the NOTIFY, before the COMMIT

        monkeypatch.setattr(PostgresStore, "_announce", announce_then_fail)
        with pytest.raises(StoreError, match="division by zero"):
            await store.invalidate(NS, ["a"])
        monkeypatch.undo()
        assert await store.read(Key(NS, "a")) is not None  # nothing deleted
        # nothing marked: a write stamped before the failed invalidation is accepted
        assert await store.write(Entry(Key(NS, "b"), {"v": 1}, deps=("a",)), stamp=stamp)
        await store.invalidate(NS, ["fence"])
        (first,) = await heard(listening, 1)
        assert first == Invalidation("names", NS, ("fence",), store.origin)
    finally:
        await store.close()


async def test_every_invalidation_path_announces_with_the_stores_origin(
    database_url: str, listening: psycopg.AsyncConnection[Any]
) -> None:
    """set, delete, invalidate, clear_namespace and clear_all each announce, carrying the
    store's origin (what this process's listener skips), the closure included."""
    async with fleetcache.open(database_url, coordinate=False) as cache:
        assert isinstance(cache.store, PostgresStore)
        origin = cache.store.origin
        assert cache.listener is not None
        await cache.store.write(Entry(Key(NS, "dep.gts"), {"v": 1}, deps=("k",), alias="dep"))
        await cache.set(Key(NS, "k"), {"v": 2})
        await cache.delete(Key(NS, "k"))
        await cache.invalidate(NS, ["x"])
        await cache.clear_namespace(NS)
        await cache.clear_all()
        assert await heard(listening, 5) == [
            Invalidation("names", NS, ("k", "dep.gts", "dep"), origin),
            Invalidation("names", NS, ("k",), origin),
            Invalidation("names", NS, ("x",), origin),
            Invalidation("namespace", NS, origin=origin),
            Invalidation("all", origin=origin),
        ]
        await eventually(lambda: cache.listener is not None and cache.listener.stats()["own"] == 5)
        assert cache.listener.stats()["applied"] == 0


async def test_a_bare_store_announces_and_can_be_told_not_to(
    database_url: str, listening: psycopg.AsyncConnection[Any]
) -> None:
    """A PostgresStore announces its invalidations by itself (on the default channel, with
    the origin it was given), chunked under the payload budget for a large closure; one
    built with ``invalidated_channel=None`` announces nothing."""
    quiet = PostgresStore(database_url, max_size=1, invalidated_channel=None)
    store = PostgresStore(database_url, max_size=2, origin="node-7")
    await quiet.open()
    await store.open()
    try:
        names = [f"{NS}{'long-' * 20}{i}.gts" for i in range(300)]
        for name in names:
            await store.write(Entry(Key(NS, name), {"v": 1}, deps=(HUB,)))
        await quiet.invalidate(NS, ["silent"])
        closure = await store.invalidate(NS, [HUB])
        assert set(closure) == {HUB, *names}
        announced: list[str] = []
        got: list[Invalidation] = []
        async for notify in listening.notifies(timeout=WAIT):
            assert len(notify.payload.encode()) < 7000
            parsed = parse_invalidation(notify.payload)
            assert parsed is not None
            assert (parsed.kind, parsed.namespace, parsed.origin) == ("names", NS, "node-7")
            got.append(parsed)
            announced += parsed.names
            if len(announced) >= len(closure):
                break
        assert announced == closure  # nothing from the quiet store came first
        assert len(got) > 1
    finally:
        await store.close()
        await quiet.close()


def test_a_store_refuses_a_bad_channel_or_origin() -> None:
    """A channel Postgres cannot LISTEN on as given, or an origin a peer would refuse, is
    a ConfigurationError when the store is built."""
    for options in (
        {"invalidated_channel": ""},
        {"invalidated_channel": "x" * 64},
        {"origin": ""},
        {"origin": "o" * 65},
        {"origin": "a\x00b"},
    ):
        with pytest.raises(ConfigurationError):
            PostgresStore("dbname=x", **options)  # type: ignore[arg-type]
