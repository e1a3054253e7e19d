"""The closure guarantee, deterministically: a dependent D computed from X's old content
and written while ``invalidate(X)`` is between its closure scan and its commit is never
left behind — its write waits for the invalidation and is then refused.

The gate is ``expand``: the stores call it inside the invalidation's transaction, after a
closure round has scanned the entries (here: when the round finds ``x.gts``, aliased
``x``). At that moment the test starts D's write from another store object on its own
thread and event loop (sqlite, Postgres) or as a task (memory), and gives it a second to
finish. A store that computed the closure outside its transaction, or marked after it,
would let the write land there, unseen by the scan and unrefused by any mark.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fleetcache.stores.base import Entry, Key, Store
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore

T = TypeVar("T")
NS = "https://realm.example/"


class StoreThread:
    """A store opened on its own thread and event loop: a second writer that can run while
    the test's own loop (or the store's worker thread) is blocked inside ``expand``."""

    def __init__(self, make: Callable[[], Store]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store = make()
        self.run(self.store.open()).result(timeout=30)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coroutine`` on the thread's loop."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self) -> None:
        """Close the store and stop the thread."""
        self.run(self.store.close()).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


async def race_write_into_the_closure(store: Store, other: StoreThread) -> None:
    """Run the gated scenario with ``other`` (same data, another thread) as D's writer."""
    await store.write(Entry(Key(NS, "x.gts"), {"v": "old"}, alias="x"))
    # D's populate: its stamp is taken, then it reads the old x.
    stamp, _ = await store.stamp_and_read(Key(NS, "d"), ["d"])
    old_x = await store.read(Key(NS, "x"), by_alias=True)
    assert old_x is not None
    stale = Entry(Key(NS, "d"), {"from": old_x.value}, deps=("x",))
    pending: list[concurrent.futures.Future[bool]] = []
    finished_inside: list[bool] = []

    def gate(name: str) -> Iterable[str]:
        if name == "x.gts" and not pending:
            write = other.run(other.store.write(stale, stamp=stamp))
            pending.append(write)
            done, _ = concurrent.futures.wait([write], timeout=1.0)
            finished_inside.append(bool(done))
        return (name,)

    names = await store.invalidate(NS, ["x"], expand=gate)
    assert pending, "the gate never opened: the closure did not reach x.gts"
    wrote = await asyncio.wrap_future(pending[0])
    assert await store.read(Key(NS, "d")) is None, "D, computed from the old x, survived"
    assert not wrote, "D's write, computed from the old x, was accepted"
    assert finished_inside == [False], "D's write finished while the invalidation was open"
    assert names == ["x", "x.gts"]
    # The guarantee is about stale writes only: a fresh populate of D lands.
    fresh, _ = await store.stamp_and_read(Key(NS, "d"), ["d"])
    assert await store.write(Entry(Key(NS, "d"), {"from": None}, deps=("x",)), stamp=fresh)


async def test_sqlite_write_during_the_closure_waits_and_is_refused(tmp_path: Path) -> None:
    """sqlite: D's write from a second store object, started after the closure scan, waits
    for the invalidation's BEGIN IMMEDIATE transaction and is then refused."""
    path = tmp_path / "cache.sqlite3"
    store = SqliteStore(path)
    await store.open()
    other = StoreThread(lambda: SqliteStore(path))
    try:
        await race_write_into_the_closure(store, other)
    finally:
        other.close()
        await store.close()


async def test_postgres_write_during_the_closure_waits_and_is_refused(database_url: str) -> None:
    """Postgres: D's write from a second store (its own pool), started after the closure
    scan, waits for the invalidation's exclusive namespace lock and is then refused."""
    store = PostgresStore(database_url, max_size=2)
    await store.open()
    other = StoreThread(lambda: PostgresStore(database_url, max_size=2))
    try:
        await race_write_into_the_closure(store, other)
    finally:
        other.close()
        await store.close()


async def test_memory_write_during_the_closure_runs_after_it_and_is_refused() -> None:
    """Memory: a write started inside the invalidation (as a task, from expand) runs only
    once the invalidation is complete, and is refused."""
    store = MemoryStore()
    await store.write(Entry(Key(NS, "x.gts"), {"v": "old"}, alias="x"))
    stamp, _ = await store.stamp_and_read(Key(NS, "d"), ["d"])
    stale = Entry(Key(NS, "d"), {"from": "old"}, deps=("x",))
    tasks: list[asyncio.Task[bool]] = []

    def gate(name: str) -> Iterable[str]:
        if name == "x.gts" and not tasks:
            tasks.append(asyncio.get_running_loop().create_task(store.write(stale, stamp=stamp)))
        return (name,)

    await store.invalidate(NS, ["x"], expand=gate)
    assert tasks
    assert not await tasks[0]
    assert await store.read(Key(NS, "d")) is None


async def test_memory_invalidation_never_yields_to_a_writer() -> None:
    """Memory: a writer task scheduled before the invalidation starts either runs first
    (and its D is found by the closure) or after it (and is refused); never in between."""
    for write_first in (True, False):
        store = MemoryStore()
        await store.write(Entry(Key(NS, "x"), {"v": "old"}))
        stamp, _ = await store.stamp_and_read(Key(NS, "d"), ["d"])
        stale = Entry(Key(NS, "d"), {"from": "old"}, deps=("x",))
        task = asyncio.create_task(store.write(stale, stamp=stamp))
        if write_first:
            await asyncio.sleep(0)
        names = await store.invalidate(NS, ["x"])
        wrote = await task
        assert await store.read(Key(NS, "d")) is None
        assert ("d" in names) == wrote == write_first


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_write_holding_its_lock_delays_the_invalidation(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The other order: D's write committed before the invalidation took its lock is
    found by the closure scan and deleted, whatever the scope of D."""
    store: Store
    if kind == "sqlite":
        store = SqliteStore(tmp_path / "cache.sqlite3")
    else:
        store = PostgresStore(request.getfixturevalue("database_url"), max_size=2)
    await store.open()
    try:
        await store.write(Entry(Key(NS, "x"), {"v": "old"}))
        stamp, _ = await store.stamp_and_read(Key(NS, "d", "realm-auth", "u"), ["d"])
        assert await store.write(
            Entry(Key(NS, "d", "realm-auth", "u"), {"from": "old"}, deps=("x",)), stamp=stamp
        )
        names = await store.invalidate(NS, ["x"])
        assert names == ["x", "d"]
        assert await store.read(Key(NS, "d", "realm-auth", "u")) is None
    finally:
        await store.close()
