"""sqlite writes of the async API on the event loop's thread, never waiting there for a lock:
a busy file sends the write to the worker thread, and the WAL is checkpointed there."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path

import pytest

import fleetcache
from fleetcache import Key
from fleetcache.stores import sqlite as sqlite_store
from fleetcache.stores.sqlite import SqliteStore

NS = "loop-writes"


@pytest.mark.parametrize("on_loop", [True, False])
async def test_an_async_write_does_not_wait_for_the_worker_thread(
    tmp_path: Path, on_loop: bool
) -> None:
    """``SqliteStore.write`` commits while the store's worker thread is busy (it writes on
    the loop's thread); with ``write_on_loop=False`` it waits for the worker."""
    store = SqliteStore(tmp_path / "c.db", write_on_loop=on_loop)
    await store.open()
    try:
        unblock = threading.Event()
        assert store._executor is not None
        busy = asyncio.get_running_loop().run_in_executor(store._executor, unblock.wait, 30)
        stamp, _ = await store.stamp_and_read(Key(NS, "k"), ["k"])
        write = asyncio.ensure_future(
            store.write(fleetcache.Entry(key=Key(NS, "k"), value=1), stamp=stamp)
        )
        # Not done while the worker is blocked: 0.5 s only bounds how long we look.
        done, _ = await asyncio.wait([write], timeout=20 if on_loop else 0.5)
        unblock.set()
        await busy
        assert bool(done) is on_loop
        assert await write
        got = await store.read(Key(NS, "k"))
        assert got is not None
        assert got.value == 1
    finally:
        await store.close()


async def test_a_write_meeting_another_connections_write_lock_waits_on_the_worker(
    tmp_path: Path,
) -> None:
    """While another connection holds the file's write lock, a write is neither refused
    ("database is locked", the loop's connection has no busy timeout) nor waited for on the
    loop: it goes to the worker thread, which commits it once the lock is released."""
    path = tmp_path / "c.db"
    store = SqliteStore(path)
    await store.open()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        stamp, _ = await store.stamp_and_read(Key(NS, "k"), ["k"])
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("DELETE FROM fleetcache_entries")
        write = asyncio.ensure_future(
            store.write(fleetcache.Entry(key=Key(NS, "k"), value=1), stamp=stamp)
        )
        # The loop runs meanwhile; 0.5 s only bounds how long we look.
        done, _ = await asyncio.wait([write], timeout=0.5)
        assert not done
        assert await store.read(Key(NS, "k")) is None
        holder.execute("COMMIT")
        assert await asyncio.wait_for(write, 20)
        got = await store.read(Key(NS, "k"))
        assert got is not None
        assert got.value == 1
    finally:
        holder.close()
        await store.close()


async def test_writes_on_the_loop_are_checkpointed_by_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's connection never checkpoints (that can take a sync of the file); every
    ``CHECKPOINT_EVERY`` of its writes the worker does, so the WAL does not grow with
    the writes."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 5)
    path = tmp_path / "c.db"
    store = SqliteStore(path)
    await store.open()
    try:
        sizes = []
        for i in range(60):
            assert await store.write(fleetcache.Entry(key=Key(NS, f"k{i}"), value=i))
            await store.table_size()  # on the worker: after any checkpoint handed to it
            sizes.append(await asyncio.to_thread(os.path.getsize, f"{path}-wal"))
        # The WAL is reused from its start after each checkpoint: it stops growing.
        assert sizes[-1] == sizes[19]
    finally:
        await store.close()
