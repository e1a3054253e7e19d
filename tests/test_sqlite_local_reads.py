"""Warm sqlite hits without a thread hop: the sync API reads on the calling thread, the
async API on the event loop's, each with a read-only connection of its own."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

import fleetcache
from fleetcache import Key, Produced
from fleetcache.stores.sqlite import SqliteStore

NS = "local-reads"


def test_a_sync_hit_does_not_need_the_event_loop(tmp_path: Path) -> None:
    """A warm sync hit is answered while the cache's event loop is blocked, and counted."""
    with fleetcache.open_sync(f"sqlite:///{tmp_path / 'c.db'}") as cache:
        cache.set(Key(NS, "k"), 41)
        blocked, unblock = threading.Event(), threading.Event()

        def block() -> None:
            blocked.set()
            unblock.wait(30)

        cache.call_soon(block)
        assert blocked.wait(20)
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(cache.get_value(Key(NS, "k"), _no)))
        reader.start()
        reader.join(20)
        unblock.set()
        assert got == [41]
        assert cache.stats()["lookup"]["hits"] == 1


def _no(key: Key) -> Produced[int]:
    raise AssertionError(f"{key} was computed on a hit")


async def test_an_async_read_does_not_wait_for_the_worker_thread(tmp_path: Path) -> None:
    """``SqliteStore.read`` answers while the store's worker thread is busy (it reads on
    the loop's thread); with ``read_on_loop=False`` it waits for the worker."""
    for on_loop in (True, False):
        store = SqliteStore(tmp_path / f"{on_loop}.db", read_on_loop=on_loop)
        await store.open()
        try:
            entry = fleetcache.Entry(key=Key(NS, "k"), value=1)
            assert await store.write(entry)
            unblock = threading.Event()
            assert store._executor is not None
            busy = asyncio.get_running_loop().run_in_executor(store._executor, unblock.wait, 30)
            read = asyncio.ensure_future(store.read(Key(NS, "k")))
            # Not done while the worker is blocked: 0.5 s only bounds how long we look.
            done, _ = await asyncio.wait([read], timeout=20 if on_loop else 0.5)
            unblock.set()
            await busy
            assert bool(done) is on_loop
            got = await read
            assert got is not None
            assert got.value == 1
        finally:
            await store.close()


async def test_reads_after_close_are_refused(tmp_path: Path) -> None:
    """A closed store refuses a read on the calling thread as on the worker's."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    await store.close()
    with pytest.raises(fleetcache.NotOpenError):
        store.read_here(Key(NS, "k"))
    with pytest.raises(fleetcache.NotOpenError):
        await store.read(Key(NS, "k"))


def test_ended_threads_leave_no_reader_connection_behind(tmp_path: Path) -> None:
    """Each thread reads with its own connection; those of threads that ended are closed
    when the next one is made, so short-lived threads leak no file handles."""
    with fleetcache.open_sync(f"sqlite:///{tmp_path / 'c.db'}") as cache:
        cache.set(Key(NS, "k"), 1)
        for _ in range(20):
            reader = threading.Thread(target=cache.get_value, args=(Key(NS, "k"), _no))
            reader.start()
            reader.join()
        store = cache.store
        assert isinstance(store, SqliteStore)
        assert len(store._connections) <= 2  # the last thread's, and the loop's if it read


def test_opening_waits_while_another_connection_holds_the_new_file(tmp_path: Path) -> None:
    """Opening a new file while another connection holds its write lock (another process
    creating the schema) waits for it instead of failing: sqlite refuses the switch to WAL
    at once, without its busy handler, and the first release gave up with "database is
    locked" (a demo worker did, one run in three)."""
    path = tmp_path / "held.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    failed: list[BaseException] = []

    def open_store() -> None:
        async def go() -> None:
            store = SqliteStore(path)
            await store.open()
            await store.close()

        try:
            asyncio.run(go())
        except BaseException as exc:  # recorded for the assertion below
            failed.append(exc)

    opener = threading.Thread(target=open_store)
    opener.start()
    opener.join(0.5)  # time for a first try, which meets the held lock
    assert failed == []
    holder.execute("COMMIT")
    holder.close()
    opener.join(60)
    assert not opener.is_alive()
    assert failed == []
