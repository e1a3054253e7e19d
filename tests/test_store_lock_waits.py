"""A blocked write never starves reads: a write (or an invalidation) that finds its
namespace locked by an invalidation waits without a pooled connection, is woken when the
lock is released, and gives up after ``lock_wait`` with a StoreError naming the namespace."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

import psycopg
import pytest

import lock_worker
from fleetcache.errors import StoreError
from fleetcache.stores import queries as q
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.postgres import PostgresStore, namespace_lock
from fleetcache_cli.shared import Fleet
from test_store_closure import StoreThread

pytestmark = pytest.mark.postgres

NS = "https://big.example/"
OTHER = "https://other.example/"
HUB = NS + "hub.gts"
WAIT = 20.0  # generous bound on any wait; never an assertion about speed


@pytest.fixture
async def locked(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A session holding NS's lock the way an invalidation does (in a transaction, until
    the test commits it)."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def hold_lock(conn: psycopg.AsyncConnection[Any], namespace: str) -> None:
    """Take ``namespace``'s lock as an invalidation does, in an open transaction."""
    await conn.execute("BEGIN")
    await conn.execute(q.PG_LOCK_NAMESPACE, {"ns_lock": namespace_lock(namespace)})


async def reads_meanwhile(store: PostgresStore, count: int, *pending: asyncio.Task[Any]) -> None:
    """Read an entry of OTHER ``count`` times while every task of ``pending`` is still
    waiting (bounded)."""
    async with asyncio.timeout(WAIT):
        for _ in range(count):
            assert await store.read(Key(OTHER, "o")) is not None
            assert not any(task.done() for task in pending), "a waiter finished early"


async def test_writes_waiting_for_a_locked_namespace_hold_no_connection(
    database_url: str, locked: psycopg.AsyncConnection[Any]
) -> None:
    """With a pool of one connection, three writes to a namespace an invalidation holds
    wait while reads of another namespace on the same pool are answered; once the lock is
    released and announced (``lock_released``), every write lands."""
    store = PostgresStore(database_url, max_size=1, pool_timeout=WAIT)
    await store.open()
    try:
        await store.write(Entry(Key(OTHER, "o"), {"v": 1}))
        await hold_lock(locked, NS)
        writes = [
            asyncio.create_task(store.write(Entry(Key(NS, f"w{i}"), {"v": i}))) for i in range(3)
        ]
        await asyncio.sleep(0)  # let them try, fail and start waiting
        await reads_meanwhile(store, 50, *writes)
        await locked.execute("COMMIT")
        store.lock_released(NS)
        assert await asyncio.wait_for(asyncio.gather(*writes), WAIT) == [True] * 3
        assert [await store.read(Key(NS, f"w{i}")) is not None for i in range(3)] == [True] * 3
    finally:
        await store.close()


async def test_invalidations_of_a_locked_namespace_take_turns_and_leave_the_pool_to_reads(
    database_url: str, locked: psycopg.AsyncConnection[Any]
) -> None:
    """With a pool of two, five invalidations and a clear of a namespace another
    invalidation holds wait without starving reads of another namespace, at most one of
    them waiting on the lock (holding a connection) at any moment; once it commits they
    all run."""
    store = PostgresStore(
        database_url, max_size=2, pool_timeout=WAIT, application_name="turns-test"
    )
    await store.open()
    admin = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        await store.write(Entry(Key(OTHER, "o"), {"v": 1}))
        await store.write(Entry(Key(NS, "n0"), {"v": 1}))
        await hold_lock(locked, NS)
        pending = [asyncio.create_task(store.invalidate(NS, [f"n{i}"])) for i in range(5)]
        pending.append(asyncio.create_task(store.clear_namespace(NS)))
        await asyncio.sleep(0)
        waiting_on_the_lock = []
        for _ in range(20):
            await reads_meanwhile(store, 5, *pending)
            row = await (
                await admin.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'turns-test' AND wait_event_type = 'Lock'"
                )
            ).fetchone()
            assert row is not None
            waiting_on_the_lock.append(row[0])
        assert max(waiting_on_the_lock) <= 1, waiting_on_the_lock
        await locked.execute("COMMIT")
        await asyncio.wait_for(asyncio.gather(*pending), WAIT)
        assert await store.read(Key(NS, "n0")) is None
    finally:
        await admin.close()
        await store.close()


async def test_a_namespace_locked_past_lock_wait_is_a_store_error_naming_it(
    database_url: str, locked: psycopg.AsyncConnection[Any]
) -> None:
    """A write or an invalidation that finds its namespace locked for longer than
    ``lock_wait`` gives up with a StoreError naming the operation, the namespace and the
    bound; nothing was written or invalidated, and other namespaces were never held up."""
    store = PostgresStore(database_url, max_size=1, lock_wait=0.5)
    await store.open()
    try:
        await hold_lock(locked, NS)
        with pytest.raises(StoreError, match=r"namespace 'https://big.example/' stayed locked"):
            await store.write(Entry(Key(NS, "w"), {"v": 1}))
        with pytest.raises(StoreError, match=r"invalidating names .* for 0.5 s"):
            await store.invalidate(NS, ["w"])
        assert await store.write(Entry(Key(OTHER, "o"), {"v": 1}))
        await locked.execute("COMMIT")
        assert await store.read(Key(NS, "w")) is None
    finally:
        await store.close()


@pytest.mark.processes
async def test_reads_of_another_namespace_are_answered_while_an_invalidation_holds_the_lock(
    database_url: str,
) -> None:
    """Process B (a pool of two) starts six writes to a namespace whose large invalidation
    here holds its lock (gated inside its transaction, after its first closure round): B's
    reads of an unrelated namespace are answered 300 times while none of the six writes has
    finished; once the invalidation commits, every write lands."""
    store = PostgresStore(database_url, max_size=4)
    await store.open()
    holder = StoreThread(lambda: PostgresStore(database_url, max_size=1))
    holding, release = threading.Event(), threading.Event()

    def gate(name: str) -> Iterable[str]:
        # Called for names the first round found: the lock is held by then.
        if name != HUB and not holding.is_set():
            holding.set()
            release.wait(timeout=2 * WAIT)
        return (name,)

    try:
        for i in range(200):
            await store.write(Entry(Key(NS, f"{NS}card-{i}.gts"), {"i": i}, deps=(HUB,)))
        names = [f"{OTHER}o{i}" for i in range(20)]
        for name in names:
            await store.write(Entry(Key(OTHER, name), {"v": 1}))
        invalidation = holder.run(holder.store.invalidate(NS, [HUB], expand=gate))
        try:
            assert await asyncio.to_thread(holding.wait, WAIT), "the gate never closed"
            with Fleet(1, name="test-member") as fleet:
                b = fleet.serve(0, lock_worker.serve, (database_url, 2))
                assert (await b.receive())["ready"]
                await b.call("load", write_ns=NS, writers=6, read_ns=OTHER, names=names, readers=2)
                counts: dict[str, Any] = {}
                async with asyncio.timeout(WAIT):
                    while not (counts.get("reads", 0) >= 300 and counts["writes_started"] == 6):
                        await asyncio.sleep(0.05)
                        counts = await b.call("counts")
                        assert counts["errors"] == []
                        assert counts["writes_done"] == 0, "a write landed inside the lock"
                release.set()
                closure = await asyncio.wrap_future(invalidation)
                assert len(closure) == 201
                async with asyncio.timeout(WAIT):
                    while counts["writes_done"] < 6:
                        await asyncio.sleep(0.05)
                        counts = await b.call("counts")
                assert counts["errors"] == []
        finally:
            release.set()
        assert [await store.read(Key(NS, f"{NS}w{i}")) is not None for i in range(6)] == [True] * 6
        assert await store.read(Key(NS, f"{NS}card-0.gts")) is None
    finally:
        holder.close()
        await store.close()
