"""Invalidation inside the application's own transaction (``conn=``): it takes effect and
is announced when the application commits, never after a rollback, and no reader of the
fleet is handed a value computed from data older than the commit."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import fleetcache
from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.populate import Produced
from fleetcache.notifications.broadcast import INVALIDATED_CHANNEL, parse_invalidation
from fleetcache.stores import queries as q
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.postgres import PostgresStore
from waiting import eventually

pytestmark = pytest.mark.postgres

NS = "shop"
WAIT = 30.0  # generous bound on any wait; never an assertion about speed
WORKER = Path(__file__).with_name("txn_worker.py")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresStore]:
    """An open Postgres store on a clean database, with the application's tables."""
    s = PostgresStore(database_url)
    await s.open()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE txn_app_rows (id int PRIMARY KEY, version int)")
        await conn.execute("INSERT INTO txn_app_rows VALUES (1, 0)")
        await conn.execute("CREATE TABLE txn_app_marker (committed int, stop boolean)")
        await conn.execute("INSERT INTO txn_app_marker VALUES (-1, false)")
    try:
        yield s
    finally:
        await s.close()


async def _marks(url: str, name: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM fleetcache_generations WHERE name = %s", (name,)
            )
        ).fetchone()
        assert row is not None
        return int(row[0])


async def _namespace_locks_held(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
                " AND granted",
                (q.LOCK_NAMESPACE,),
            )
        ).fetchone()
        assert row is not None
        return int(row[0])


async def test_the_invalidation_takes_effect_and_is_announced_at_the_commit(
    store: PostgresStore, database_url: str
) -> None:
    """Before the application commits, the entry and its dependent are still there and
    nothing is announced; at the commit both are gone, the names are marked and the
    announcement (under another origin than the store's own) is delivered."""
    await store.write(Entry(Key(NS, "price:1"), {"version": 0}))
    await store.write(Entry(Key(NS, "page:1"), {"version": 0}, deps=("price:1",)))
    listen = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await listen.execute(f"LISTEN {INVALIDATED_CHANNEL}")
    app = await psycopg.AsyncConnection.connect(database_url)
    try:
        async with app.transaction():
            await app.execute("UPDATE txn_app_rows SET version = 1 WHERE id = 1")
            closure = await store.invalidate(NS, ["price:1"], conn=app)
            assert closure == ["price:1", "page:1"]
            assert await store.read(Key(NS, "page:1")) is not None  # not committed yet
            assert await _marks(database_url, "price:1") == 0
        assert await store.read(Key(NS, "price:1")) is None
        assert await store.read(Key(NS, "page:1")) is None
        assert await _marks(database_url, "page:1") == 1
        got = [n async for n in listen.notifies(timeout=WAIT, stop_after=1)]
        heard = parse_invalidation(got[0].payload)
        assert heard is not None
        assert heard.names == ("price:1", "page:1")
        assert heard.origin not in (None, store.origin)
    finally:
        await app.close()
        await listen.close()


async def test_a_rollback_invalidates_nothing_and_announces_nothing(
    store: PostgresStore, database_url: str
) -> None:
    """A rolled-back transaction leaves the entries, sets no mark (a write stamped before
    it is still accepted) and delivers no announcement: the first one heard afterwards is
    a sentinel sent after the rollback."""
    key = Key(NS, "price:1")
    await store.write(Entry(key, {"version": 0}))
    stamp, _ = await store.stamp_and_read(Key(NS, "other"), ["other", "price:1"])
    listen = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await listen.execute(f"LISTEN {INVALIDATED_CHANNEL}")
    app = await psycopg.AsyncConnection.connect(database_url)
    try:
        await app.execute("UPDATE txn_app_rows SET version = 1 WHERE id = 1")
        await store.invalidate(NS, ["price:1"], conn=app)
        await store.clear_namespace(NS, conn=app)  # several in one transaction
        await app.rollback()
        assert await store.read(key) == Entry(key, {"version": 0})
        assert await _marks(database_url, "price:1") == 0
        assert await _marks(database_url, "") == 0
        assert await store.write(Entry(Key(NS, "other"), {"v": 1}, deps=("price:1",)), stamp=stamp)
        await listen.execute("SELECT pg_notify(%s, 'sentinel')", (INVALIDATED_CHANNEL,))
        got = [n async for n in listen.notifies(timeout=WAIT, stop_after=1)]
        assert got[0].payload == "sentinel"
        assert await _namespace_locks_held(database_url) == 0
    finally:
        await app.close()
        await listen.close()


async def test_a_computation_that_read_the_old_row_between_invalidate_and_commit_is_refused(
    store: PostgresStore, database_url: str
) -> None:
    """The interleaving the lock does not cover: after the application's invalidate call
    and before its commit, a computation stamps (seeing the marks' transaction in
    progress), reads the application's old row (READ COMMITTED), and writes after the
    commit: its write is refused, and so is one stamped before the invalidate call that
    waited for the lock."""
    key = Key(NS, "price:1")
    early_stamp, _ = await store.stamp_and_read(key, ["price:1"])
    app = await psycopg.AsyncConnection.connect(database_url)
    other = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        await app.execute("UPDATE txn_app_rows SET version = 1 WHERE id = 1")
        await store.invalidate(NS, ["price:1"], conn=app)
        stamp, found = await store.stamp_and_read(key, ["price:1"])
        assert found is None
        row = await (await other.execute("SELECT version FROM txn_app_rows")).fetchone()
        assert row == (0,)  # the old row
        early = asyncio.create_task(store.write(Entry(key, {"version": 0}), stamp=early_stamp))
        await eventually(lambda: store.waiting_for_locks >= 1 or early.done())
        assert not early.done()  # the namespace is locked until the commit
        await app.commit()
        assert await store.write(Entry(key, {"version": 0}), stamp=stamp) is False
        assert await asyncio.wait_for(early, WAIT) is False
        assert await store.read(key) is None
    finally:
        await app.close()
        await other.close()


async def test_a_connection_outside_a_transaction_or_in_a_failed_one_is_refused(
    store: PostgresStore, database_url: str
) -> None:
    """conn= needs an open transaction: an idle connection, a failed transaction and a
    store without transactions (memory) are each a ConfigurationError naming the fix."""
    async with await psycopg.AsyncConnection.connect(database_url) as app:
        with pytest.raises(ConfigurationError, match="not in one"):
            await store.invalidate(NS, ["a"], conn=app)
        with pytest.raises(psycopg.errors.DivisionByZero):
            await app.execute("SELECT 1/0")
        with pytest.raises(ConfigurationError, match="roll it back"):
            await store.clear_namespace(NS, conn=app)
        await app.rollback()
        async with app.transaction():
            lookup: CachingLookup[Any] = CachingLookup(MemoryStore())
            with pytest.raises(ConfigurationError, match="MemoryStore"):
                await lookup.invalidate(NS, ["a"], conn=app)


async def test_this_processs_near_tier_is_evicted_at_the_commit_and_kept_on_rollback(
    store: PostgresStore, database_url: str
) -> None:
    """The announcement of an application-transaction invalidation reaches this
    process's own listener (it carries another origin): a near copy survives a rollback
    and is gone once the commit's announcement arrives."""
    key = Key(NS, "price:1")
    version = {"v": 0}

    async def produce(_key: Key) -> Any:
        return Produced(value={"version": version["v"]})

    async with await fleetcache.open(database_url, near=100) as cache:
        assert cache.lookup.near is not None
        assert (await cache.get_value(key, produce))["version"] == 0
        version["v"] = 1
        async with await psycopg.AsyncConnection.connect(database_url) as app:
            await app.execute("SELECT 1")
            await cache.invalidate(NS, ["price:1"], conn=app)
            await app.rollback()
            assert (await cache.get_value(key, produce))["version"] == 0
            async with app.transaction():
                await cache.invalidate(NS, ["price:1"], conn=app)
            await eventually(
                lambda: (
                    cache.lookup.near is not None
                    and cache.lookup.near.get(key, count_miss=False) is None
                )
            )
            assert (await cache.get_value(key, produce))["version"] == 1


async def test_a_writer_killed_before_its_commit_invalidates_nothing_and_leaves_no_lock(
    store: PostgresStore, database_url: str
) -> None:
    """SIGKILL of a process holding an application transaction that invalidated: the
    entry stays, no mark is left, the namespace lock is released, and the next
    invalidation of the namespace goes through."""
    key = Key(NS, "price:1")
    await store.write(Entry(key, {"version": 0}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        "hold",
        database_url,
        NS,
        "price:1",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT * 2)
    assert line.strip() == b"ready"
    assert await _namespace_locks_held(database_url) == 1
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    await eventually(lambda: _held_none(database_url), WAIT)
    assert await store.read(key) == Entry(key, {"version": 0})
    assert await _marks(database_url, "price:1") == 0
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT version FROM txn_app_rows")).fetchone()
        assert row == (0,)
    assert await asyncio.wait_for(store.invalidate(NS, ["price:1"]), WAIT) == ["price:1"]


async def _held_none(url: str) -> bool:
    return await _namespace_locks_held(url) == 0


TRIALS = 30
READERS = 2


@pytest.mark.processes
async def test_randomized_commits_leave_no_stale_read_and_no_stale_entry(
    store: PostgresStore, database_url: str
) -> None:
    """A writer updates the row and invalidates in one transaction, TRIALS times at random
    moments and in random order, while READERS processes read the value computed from the
    row: no read that began after a commit returns an older version, and the entry left
    at the end is the last version (or none)."""
    readers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            "reader",
            database_url,
            NS,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(READERS)
    ]
    rng = random.Random(22)
    marker = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    app = await psycopg.AsyncConnection.connect(database_url)
    cache = await fleetcache.open(database_url)
    try:
        # Wait until the readers have filled the entry once.
        await eventually(lambda: _has_entry(store), WAIT * 2)
        for trial in range(1, TRIALS + 1):
            await asyncio.sleep(rng.uniform(0, 0.03))
            async with app.transaction():
                invalidate_first = rng.random() < 0.5
                if invalidate_first:
                    await cache.invalidate(NS, ["price:1"], conn=app)
                await asyncio.sleep(rng.uniform(0, 0.01))
                await app.execute("UPDATE txn_app_rows SET version = %s WHERE id = 1", (trial,))
                await asyncio.sleep(rng.uniform(0, 0.01))
                if not invalidate_first:
                    await cache.invalidate(NS, ["price:1"], conn=app)
            await marker.execute("UPDATE txn_app_marker SET committed = %s", (trial,))
        await asyncio.sleep(0.1)  # let the readers read after the last commit
        await marker.execute("UPDATE txn_app_marker SET stop = true")
        results = []
        for proc in readers:
            assert proc.stdout is not None
            out = await asyncio.wait_for(proc.stdout.read(), WAIT * 2)
            assert await proc.wait() == 0
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        entry = await store.read(Key(NS, "price:1"))
        print("trials", TRIALS, "readers", results, "entry", entry)
        assert sum(r["after_commit"] for r in results) > 0
        assert sum(r["stale"] for r in results) == 0, results
        assert entry is None or entry.value == {"version": TRIALS}
    finally:
        for proc in readers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await cache.close()
        await app.close()
        await marker.close()


async def _has_entry(store: PostgresStore) -> bool:
    return await store.read(Key(NS, "price:1")) is not None
