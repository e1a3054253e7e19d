"""A bounded table (issue 18, item 3): ``max_entries``/``max_bytes`` on every store, the
least recently written evicted first with their dependents, the size kept by counts (not
counted), and no stale write ever accepted because of an eviction."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from fleetcache.errors import ConfigurationError
from fleetcache.stores import queries as q
from fleetcache.stores.base import Entry, Key, Store
from fleetcache.stores.bounds import Bounds
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore
from test_store_migrations import V2_ROWS, make_v2_postgres, make_v2_sqlite
from waiting import eventually

NS = "https://realm.example/"
MAX = 200

BoundedStore = MemoryStore | SqliteStore | PostgresStore


def make(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, **bounds: int | None
) -> BoundedStore:
    """An unopened store of ``kind`` with ``bounds``."""
    if kind == "memory":
        return MemoryStore(**bounds)
    if kind == "sqlite":
        return SqliteStore(tmp_path / "cache.sqlite3", **bounds)
    return PostgresStore(request.getfixturevalue("database_url"), max_size=4, **bounds)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def bounded(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BoundedStore]:
    """An open store of each kind bounded to ``MAX`` entries."""
    store = make(request.param, request, tmp_path, max_entries=MAX)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def real_size(store: BoundedStore) -> tuple[int, int]:
    """The entries and value bytes the store holds, counted the slow way (not its counts)."""
    if isinstance(store, MemoryStore):
        return len(store._entries), sum(len(s.value) for s in store._entries.values())
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store._path)
        try:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(length(CAST(value AS BLOB))), 0) "
                "FROM fleetcache_entries"
            ).fetchone()
        finally:
            conn.close()
        return int(row[0]), int(row[1])
    async with store.pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT count(*), coalesce(sum(octet_length(value)), 0) FROM fleetcache_entries"
        )
        found = await cursor.fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


async def settled(store: BoundedStore) -> None:
    """Wait until no background eviction runs (Postgres only evicts in the background)."""
    if isinstance(store, PostgresStore):
        await eventually(lambda: store._evicting is None or store._evicting.done())


def entry(n: int, **fields: object) -> Entry:
    """Key number ``n``, written at time ``n`` (so higher numbers are written later)."""
    return Entry(Key(NS, f"{NS}k{n}"), {"n": n}, created_at=n, **fields)  # type: ignore[arg-type]


async def test_ten_times_max_entries_keep_the_table_within_a_tenth_over(
    bounded: BoundedStore,
) -> None:
    """10 x max_entries distinct keys written in batches of a tenth: after every batch the
    table (counted row by row) holds at most 1.1 x max_entries, and at the end the counts
    the store keeps agree with the rows."""
    peak = 0
    for n in range(10 * MAX):
        assert await bounded.write(entry(n))
        if (n + 1) % (MAX // 10) == 0:
            entries, _ = await real_size(bounded)
            peak = max(peak, entries)
            assert entries <= 1.1 * MAX, f"{entries} entries after {n + 1} writes"
    assert peak >= MAX * 0.9  # it was filled, not emptied
    await settled(bounded)
    assert await bounded.table_size() == await real_size(bounded)


@pytest.mark.postgres
async def test_a_writer_that_outruns_the_eviction_waits_for_it(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres evicts in the background; a process whose writes outrun it (here the
    eviction is held) goes on writing up to twice ``check_every`` writes past the look
    that started it, and the write after that returns only once the eviction is done."""
    store = make("postgres", request, tmp_path, max_entries=MAX)
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        every = store.bounds.check_every
        for n in range(MAX):  # filled to the bound, then looked at with nothing to do
            assert await store.write(entry(n))
        await settled(store)
        gate, evicting = asyncio.Event(), asyncio.Event()
        real_evict = store.evict

        async def held_evict() -> int:
            evicting.set()
            await gate.wait()
            return await real_evict()

        monkeypatch.setattr(store, "evict", held_evict)
        n = MAX
        while not evicting.is_set():  # over the bound: the next look starts an eviction
            assert await store.write(entry(n))
            n += 1
        # Ahead of the held eviction without waiting, up to twice check_every writes past
        # the look that started it (counted by the store since then).
        while store._since_check < 2 * every - 1:
            assert await asyncio.wait_for(store.write(entry(n)), 30)
            n += 1
        blocked = asyncio.create_task(store.write(entry(n)))
        # Its row is committed, and the write still waits: for the eviction.
        await eventually(lambda: blocked.done() or store._since_check >= 2 * every)
        written, _ = await real_size(store)
        assert written == n + 1
        assert not blocked.done()
        gate.set()
        assert await asyncio.wait_for(blocked, 30)
        await settled(store)
        entries, _ = await real_size(store)
        assert entries <= MAX
    finally:
        await store.close()


async def test_the_evicted_entries_are_the_least_recently_written(
    bounded: BoundedStore,
) -> None:
    """Past the bound, the entries left are the most recently written ones: every entry
    kept was written after every entry evicted (a rewrite counts as a new write)."""
    for n in range(MAX):
        await bounded.write(entry(n))
    # Key 0 rewritten now is young again: key 1 is the oldest.
    await bounded.write(Entry(Key(NS, f"{NS}k0"), {"n": 0}, created_at=MAX))
    later = range(MAX + 1, MAX + MAX // 2 + 1)
    for n in later:
        await bounded.write(entry(n))
    await settled(bounded)
    if isinstance(bounded, PostgresStore):
        await bounded.evict()
    written = [*range(MAX), *later]
    kept = [n for n in written if await bounded.read(entry(n).key)]
    evicted = [n for n in written if n not in kept]
    assert 0 in kept
    assert evicted, "nothing was evicted"
    assert max(evicted) < min(n for n in kept if n != 0)
    assert len(kept) <= MAX


async def test_an_evicted_entry_takes_its_dependents_along(bounded: BoundedStore) -> None:
    """An evicted entry's dependents (through its name or its alias, transitively) are
    evicted with it: otherwise an invalidation of what it depended on would no longer
    reach them, and they would outlive it."""
    base = Entry(Key(NS, f"{NS}base.gts"), "b", deps=(f"{NS}source",), created_at=0, alias="b")
    middle = Entry(Key(NS, f"{NS}middle"), "m", deps=("b",), created_at=10_000)
    top = Entry(Key(NS, f"{NS}top"), "t", deps=(f"{NS}middle",), created_at=10_001)
    await bounded.write(base)
    for n in range(1, MAX - 1):
        await bounded.write(entry(n))
    # The newest two, over the bound by one: base, the oldest, goes, and with it these.
    await bounded.write(middle)
    await bounded.write(top)
    await settled(bounded)
    if isinstance(bounded, PostgresStore):
        await bounded.evict()
    assert await bounded.read(base.key) is None
    assert await bounded.read(middle.key) is None
    assert await bounded.read(top.key) is None


async def test_no_stale_write_after_an_eviction_and_an_invalidation(
    bounded: BoundedStore,
) -> None:
    """A computation that read an entry before it was evicted, and whose dependency was
    invalidated after the eviction, cannot store its stale result: the eviction deleted
    the row, the invalidation marked the name all the same."""
    key = Key(NS, f"{NS}page")
    await bounded.write(Entry(key, "v1", deps=(f"{NS}source",), created_at=0))
    stamp, seen = await bounded.stamp_and_read(key, [key.name])
    assert seen is not None
    assert seen.value == "v1"
    for n in range(1, MAX + 1):  # over by one: the page (oldest) goes
        await bounded.write(entry(n))
    await settled(bounded)
    if isinstance(bounded, PostgresStore):
        await bounded.evict()
    assert await bounded.read(key) is None
    assert await bounded.invalidate(NS, [f"{NS}source"]) == [f"{NS}source"]
    stale = Entry(key, "stale", deps=(f"{NS}source",), created_at=MAX + 1)
    assert not await bounded.write(stale, stamp=stamp)
    assert await bounded.read(key) is None
    # And the page's own name invalidated after its eviction refuses it too.
    stamp, _ = await bounded.stamp_and_read(key, [key.name])
    assert await bounded.invalidate(NS, [key.name]) == [key.name]
    assert not await bounded.write(Entry(key, "stale", created_at=MAX + 2), stamp=stamp)
    assert await bounded.read(key) is None


async def test_the_counts_follow_every_kind_of_change(bounded: BoundedStore) -> None:
    """Upserts that change a value's size, invalidations, purges, namespace and full
    clears: the size the store keeps (without counting) equals the rows counted."""
    for n in range(50):
        await bounded.write(entry(n, stale_until=n))
    for n in range(0, 50, 2):
        await bounded.write(Entry(Key(NS, f"{NS}k{n}"), "x" * n, created_at=100 + n))
    assert await bounded.table_size() == await real_size(bounded)
    await bounded.invalidate(NS, [f"{NS}k1", f"{NS}k3"])
    assert await bounded.purge_expired(10) > 0
    assert await bounded.table_size() == await real_size(bounded)
    await bounded.write(Entry(Key("other", "x"), "y" * 10))
    await bounded.clear_namespace(NS)
    assert await bounded.table_size() == await real_size(bounded) == (1, 12)  # "y" * 10 as JSON
    await bounded.clear_all()
    assert await bounded.table_size() == (0, 0)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
async def test_max_bytes_keeps_the_value_bytes_within_a_tenth_over(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With max_bytes set and ten times as many value bytes written, the table's value
    bytes (counted row by row) stay at most 1.1 x max_bytes after every batch."""
    limit = 20_000
    store = make(kind, request, tmp_path, max_bytes=limit)
    await store.open()
    try:
        written = 0
        n = 0
        while written < 10 * limit:
            value = "v" * (50 + n % 100)  # JSON adds the two quotes
            await store.write(Entry(Key(NS, f"k{n}"), value, created_at=n))
            written += len(value) + 2
            n += 1
            if n % 20 == 0:
                _, nbytes = await real_size(store)
                assert nbytes <= 1.1 * limit, f"{nbytes} value bytes after {n} writes"
        await settled(store)
        assert await store.table_size() == await real_size(store)
    finally:
        await store.close()


def test_a_bound_on_bytes_is_looked_at_every_hundredth_of_it_in_mean_sized_entries() -> None:
    """How many writes pass between two looks at the table's size: 1% of max_entries; for
    max_bytes, as many entries of the mean size the last look found as make 1% of it (16
    before anything is known); with both, the sooner."""
    assert Bounds(max_entries=1_000).next_check(500, 10**9) == 10
    assert Bounds(max_bytes=20_000).check_every == 16
    assert Bounds(max_bytes=20_000).next_check(0, 0) == 16
    assert Bounds(max_bytes=20_000).next_check(100, 10_000) == 2  # 100-byte entries
    assert Bounds(max_bytes=10**9).next_check(1_000, 1_000_000) == 10_000  # 1 kB entries
    assert Bounds(max_bytes=100).next_check(10, 10_000) == 1
    assert Bounds(max_entries=1_000, max_bytes=20_000).next_check(100, 10_000) == 2
    assert Bounds(max_entries=200, max_bytes=10**9).next_check(100, 10_000) == 2


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_bounds_are_checked(bad: object) -> None:
    """A bound that is not a positive int is refused at construction, naming it."""
    with pytest.raises(ConfigurationError, match="max_entries must be a positive int"):
        MemoryStore(max_entries=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_bytes must be a positive int"):
        MemoryStore(max_bytes=bad)  # type: ignore[arg-type]


async def test_an_eviction_meeting_an_invalidation_lets_no_stale_write_in(
    database_url: str,
) -> None:
    """Postgres, interleaved by hand: an eviction holds the oldest row deleted but not
    committed; an invalidation of that name runs meanwhile (it waits for the row); the
    eviction commits, the invalidation ends without error, and a computation stamped
    before both cannot store its stale result."""
    store = PostgresStore(database_url, max_size=4, max_entries=MAX)
    await store.open()
    try:
        key = Key(NS, f"{NS}page")
        await store.write(Entry(key, "v1", created_at=0))
        for n in range(1, 10):
            await store.write(entry(n))
        stamp, _ = await store.stamp_and_read(key, [key.name])
        async with store.pool.connection() as evicting, evicting.transaction():
            cursor = await evicting.execute(q.PG_EVICT, {"limit": 1})
            assert cursor.rowcount == 1
            invalidation = asyncio.create_task(store.invalidate(NS, [key.name]))

            async def invalidation_waits_for_the_row() -> bool:
                async with store.pool.connection() as probe:
                    found = await (
                        await probe.execute(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                        )
                    ).fetchone()
                return found is not None and found[0] > 0

            await eventually(invalidation_waits_for_the_row)
            assert not invalidation.done()
        assert await invalidation == [key.name]
        assert not await store.write(Entry(key, "stale", created_at=100), stamp=stamp)
        assert await store.read(key) is None
        assert await store.table_size() == await real_size(store)
    finally:
        await store.close()


async def test_unbounded_stores_never_evict(store: Store) -> None:
    """Without a bound nothing is evicted, however many entries are written."""
    for n in range(3 * MAX):
        await store.write(entry(n))
    assert all([await store.read(entry(n).key) is not None for n in range(3 * MAX)])


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_an_upgraded_database_starts_with_its_rows_counted(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A database of an older schema, upgraded, starts its counts from its rows (counted
    once, by the upgrade), so a bound holds from the first write on."""
    store: SqliteStore | PostgresStore
    if kind == "sqlite":
        path = tmp_path / "v2.sqlite3"
        make_v2_sqlite(path)
        store = SqliteStore(path, max_entries=len(V2_ROWS) + 1)
    else:
        url = request.getfixturevalue("empty_database_url")
        await make_v2_postgres(url)
        store = PostgresStore(url, max_size=2, max_entries=len(V2_ROWS) + 1)
    await store.open()
    try:
        assert await store.table_size() == await real_size(store)
        assert (await store.table_size())[0] == len(V2_ROWS)
        for n in range(10):
            await store.write(entry(n + 10_000))
        await settled(store)
        if isinstance(store, PostgresStore):
            await store.evict()
        assert (await real_size(store))[0] <= len(V2_ROWS) + 1
        assert await store.table_size() == await real_size(store)
    finally:
        await store.close()


WORKER = Path(__file__).with_name("bounded_worker.py")


@pytest.mark.processes
async def test_two_processes_writing_at_once_keep_the_table_within_a_tenth_over(
    database_url: str,
) -> None:
    """Two OS processes, each writing 5 x max_entries distinct keys into the same bounded
    Postgres table at once: every sample of the table (count(*), taken until both have
    exited) holds at most 1.1 x max_entries, and the counts agree with the rows after."""
    limit = 500
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            database_url,
            prefix,
            str(5 * limit),
            str(limit),
            stdout=asyncio.subprocess.PIPE,
        )
        for prefix in ("a", "b")
    ]
    samples: list[int] = []
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while any(worker.returncode is None for worker in workers):
            row = await (await conn.execute("SELECT count(*) FROM fleetcache_entries")).fetchone()
            assert row is not None
            samples.append(int(row[0]))
            await asyncio.sleep(0.005)  # a sampling pace, not a wait for anything
    outputs = [await worker.communicate() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    assert [out.decode().strip() for out, _ in outputs] == [str(5 * limit)] * 2
    print(f"2 processes, max_entries={limit}: {len(samples)} samples, peak {max(samples)}")
    assert len(samples) > 10
    assert max(samples) <= 1.1 * limit, f"peak {max(samples)} of {limit}"
    assert max(samples) >= 0.9 * limit
    store = PostgresStore(database_url, max_size=1)
    await store.open()
    try:
        assert await store.table_size() == await real_size(store)
    finally:
        await store.close()


async def test_an_unlogged_table_survives_losing_its_rows_as_a_crash_leaves_it(
    database_url: str,
) -> None:
    """``unlogged=True`` makes the entries and their counts UNLOGGED (the marks stay
    logged); after both are emptied, as crash recovery empties unlogged tables, the
    counts come back with the first writes and the bound holds again."""
    store = PostgresStore(database_url, max_size=2, max_entries=MAX, unlogged=True)
    await store.open()
    try:
        async with store.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT relname::text, relpersistence::text FROM pg_class WHERE relname IN"
                " ('fleetcache_entries', 'fleetcache_counts', 'fleetcache_generations')"
                " ORDER BY 1"
            )
            kinds = await cursor.fetchall()
        assert kinds == [
            ("fleetcache_counts", "u"),
            ("fleetcache_entries", "u"),
            ("fleetcache_generations", "p"),
        ]
        for n in range(MAX):
            await store.write(entry(n))
        async with store.pool.connection() as conn:
            await conn.execute("TRUNCATE fleetcache_entries, fleetcache_counts")
        assert await store.table_size() == (0, 0)
        for n in range(3 * MAX):
            await store.write(entry(MAX + n))
        await settled(store)
        await store.evict()
        assert await store.table_size() == await real_size(store)
        assert (await real_size(store))[0] <= MAX
    finally:
        await store.close()
    again = PostgresStore(database_url, max_size=1, unlogged=True)
    await again.open()  # already unlogged: nothing to do
    await again.close()
