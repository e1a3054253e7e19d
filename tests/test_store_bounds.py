"""Nothing grows without bound: marks are pruned once older than the retention (with the
stale-write guarantee intact), and the memory store costs O(1) per operation."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetcache.stores.base import Entry, Key, Store
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore

NS = "https://realm.example/"
NAMES = 100_000
BATCH = 1_000
RETENTION = 2.0


async def mark_count(store: Store) -> int:
    """How many marks the store keeps now."""
    if isinstance(store, MemoryStore):
        return store.mark_count
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store._path)
        try:
            return int(conn.execute("SELECT count(*) FROM fleetcache_generations").fetchone()[0])
        finally:
            conn.close()
    assert isinstance(store, PostgresStore)
    async with store.pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) FROM fleetcache_generations")).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
async def test_marks_of_100000_invalidated_names_are_pruned_after_the_retention(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """100,000 names invalidated leave 100,000 marks; once they are older than the
    retention, the next few invalidations prune them all, and a write stamped before an
    invalidation of its dependency is still refused."""
    store: Store
    if kind == "memory":
        store = MemoryStore(mark_retention=RETENTION)
    elif kind == "sqlite":
        store = SqliteStore(tmp_path / "cache.sqlite3", mark_retention=RETENTION)
    else:
        url = request.getfixturevalue("database_url")
        store = PostgresStore(url, max_size=2, mark_retention=RETENTION)
    await store.open()
    try:
        started = time.monotonic()
        for first in range(0, NAMES, BATCH):
            names = [f"{NS}module-{n}.gts" for n in range(first, first + BATCH)]
            assert len(await store.invalidate(NS, names)) == BATCH
        took = time.monotonic() - started
        peak = await mark_count(store)
        # Marks younger than the retention are kept (they may still refuse a write).
        assert peak >= NAMES * min(1.0, RETENTION / max(took, 1e-9)) * 0.5
        await asyncio.sleep(RETENTION + 0.2)
        for _ in range(NAMES // 10_000 + 2):
            await store.invalidate(NS, ["tick"])
        left = await mark_count(store)
        print(f"{kind}: {NAMES} names invalidated in {took:.1f} s; {peak} marks, then {left}")
        assert left <= 5
        # The guarantee still holds after pruning.
        stamp, _ = await store.stamp_and_read(Key(NS, "d"), ["d"])
        await store.invalidate(NS, ["x"])
        assert not await store.write(Entry(Key(NS, "d"), 1, deps=("x",)), stamp=stamp)
        fresh, _ = await store.stamp_and_read(Key(NS, "d"), ["d"])
        assert await store.write(Entry(Key(NS, "d"), 1, deps=("x",)), stamp=fresh)
    finally:
        await store.close()


async def test_marks_stay_bounded_under_a_steady_stream_of_invalidations() -> None:
    """With invalidations arriving steadily for many retention periods, the marks kept
    never exceed what one retention period produces (memory store, simulated clock)."""
    now = [0.0]
    store = MemoryStore(mark_retention=10.0, clock=lambda: now[0])
    counts = []
    for step in range(10_000):
        now[0] = step * 0.01  # 100 invalidations per second, 1000 seconds
        await store.invalidate(NS, [f"m{step}", f"m{step}.gts"])
        counts.append(store.mark_count)
    assert max(counts) <= 2_100  # 2 marks x 100 per second x 10 s, and a step


class ScanCounting(dict[Any, Any]):
    """A dict that counts the times it is walked whole (a scan) and looked into by key."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.scans = self.lookups = 0

    def __iter__(self) -> Iterator[Any]:
        self.scans += 1
        return super().__iter__()

    def keys(self) -> Any:
        self.scans += 1
        return super().keys()

    def values(self) -> Any:
        self.scans += 1
        return super().values()

    def items(self) -> Any:
        self.scans += 1
        return super().items()

    def get(self, key: Any, default: Any = None) -> Any:
        self.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.lookups += 1
        return super().__getitem__(key)


async def test_memory_store_costs_o1_per_operation() -> None:
    """2,000 keys sharing a namespace, each written with an alias, read by alias, then
    invalidated: no operation walks the whole table or a whole index (the first release's
    alias read scanned every entry: 25 s for 20,000 keys)."""
    store = MemoryStore()
    # The entries and every index (by alias, name, namespace, dependency) are watched; the
    # marks (an OrderedDict, read oldest first) are bounded by the test above.
    tables = {name: ScanCounting() for name, value in vars(store).items() if type(value) is dict}
    assert {"_entries", "_by_alias", "_by_ns_name", "_by_dep"} <= tables.keys()
    vars(store).update(tables)
    keys = [Key(NS, f"{NS}m{i}.gts") for i in range(2_000)]
    for key in keys:
        await store.write(Entry(key, {"v": 1}, deps=(f"{NS}dep",), alias=key.name[:-4]))
    for key in keys:
        assert await store.read(Key(NS, key.name[:-4]), by_alias=True) is not None
    for key in keys[:-1]:
        await store.invalidate(NS, [key.name])
    assert len(await store.invalidate(NS, [f"{NS}dep"])) == 3
    assert {name: table.scans for name, table in tables.items()} == dict.fromkeys(tables, 0)
    assert all(table.lookups >= len(keys) for name, table in tables.items() if name != "_by_ns")
