"""Store hits of the sync API read on the calling thread (Postgres, through the read pool
of synchronous connections): the entry the loop would read, stale hits refreshed on the
core, the near tier filled only by a read no invalidation overtook, the read pool counted
in the connection budget and closed with the cache, and behind PgBouncer."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import fleetcache
from fleetcache import Entry, Key, Produced, SyncFleetcache
from fleetcache.embedded import PgBouncer
from fleetcache.errors import CachedError, ConfigurationError
from fleetcache.stores.postgres import PostgresStore
from test_sync import eventually

pytestmark = pytest.mark.postgres

NS = "https://realm.example/"


def never(key: Key) -> Produced[Any]:
    """A produce a hit must never call."""
    raise AssertionError(f"computed {key.name} on a hit")


@contextlib.contextmanager
def loop_blocked(cache: SyncFleetcache) -> Iterator[None]:
    """The core's event loop busy (blocked) until the block ends: whatever answers
    meanwhile was answered without it."""
    blocked, release = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(20)

    cache.call_soon(block)
    assert blocked.wait(20)
    try:
        yield
    finally:
        release.set()


def on_a_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on a new thread; the test fails if it has not returned within 10 s."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(10)
    assert out, "the call did not return while the core's loop was blocked"
    return out[0]


def store_of(cache: SyncFleetcache) -> PostgresStore:
    """The cache's Postgres store."""
    store = cache.store
    assert isinstance(store, PostgresStore)
    return store


def backends(database_url: str) -> int:
    """The server's backends on the test database, but this query's own."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_hit_read_on_the_calling_thread_is_the_entry_the_loop_reads(database_url: str) -> None:
    """With the core's loop blocked, get, get_value and peek answer on the calling thread
    with exactly the entry the store's read on the loop returns: the value's key order and
    number forms, deps, alias (by alias too), an error entry (get_value raises it)."""
    value = {"z": 1, "a": {"y": [1.0, 2, "x"], "b": None}, "m": 10**20, "f": 0.1}
    with fleetcache.open_sync(database_url) as cache:
        cache.get(Key(NS, "v"), lambda key: Produced(value, deps=["d"]), alias="v-alias")
        cache.get(Key(NS, "e"), lambda key: Produced(None, error={"z": "E", "a": [1]}))
        read = store_of(cache).read
        loop_read = {
            "v": cache.call(read, Key(NS, "v")),
            "e": cache.call(read, Key(NS, "e")),
            "alias": cache.call(read, Key(NS, "v-alias"), by_alias=True),
        }
        before = cache.stats()["lookup"]

        def reads() -> dict[str, Any]:
            with pytest.raises(CachedError) as error:
                cache.get_value(Key(NS, "e"), never)
            return {
                "v": cache.get(Key(NS, "v"), never),
                "e": cache.get(Key(NS, "e"), never),
                "alias": cache.peek(Key(NS, "v-alias"), by_alias=True),
                "peek": cache.peek(Key(NS, "v")),
                "value": cache.get_value(Key(NS, "v"), never),
                "error": error.value.error,
            }

        with loop_blocked(cache):
            got = on_a_thread(reads)
        after = cache.stats()["lookup"]
    assert loop_read["v"] is not None
    assert got["v"] == got["peek"] == got["alias"] == loop_read["v"] == loop_read["alias"]
    assert got["v"].deps == ("d",)
    assert got["v"].alias == "v-alias"
    assert json.dumps(got["value"]) == json.dumps(value)  # key order and number forms
    assert got["e"] == loop_read["e"]
    assert got["error"] == {"z": "E", "a": [1]}
    assert list(got["error"]) == ["z", "a"]
    assert after["hits"] - before["hits"] == 4  # get_value x2 and get x2; peeks count none
    assert after["misses"] == before["misses"]


def test_a_stale_hit_is_served_on_the_calling_thread_and_refreshed_on_the_core(
    database_url: str,
) -> None:
    """A stale entry is answered at once on the calling thread (the loop blocked), and its
    one refresh runs on the core once the loop is free; a dead entry is left to the core,
    which computes it (on the caller's thread)."""
    now = int(time.time() * 1000)
    with fleetcache.open_sync(database_url) as cache:
        write = store_of(cache).write
        aged = {"created_at": now - 10_000, "expires_at": now - 5_000}
        stale = Entry(Key(NS, "s"), "old", **aged, stale_until=now + 600_000)
        dead = Entry(Key(NS, "d"), "old", **aged, stale_until=now - 5_000)
        assert cache.call(write, stale)
        assert cache.call(write, dead)
        refreshed = threading.Event()

        def produce(key: Key) -> Produced[str]:
            refreshed.set()
            return Produced("new")

        with loop_blocked(cache):
            assert on_a_thread(lambda: cache.get_value(Key(NS, "s"), produce)) == "old"
            assert not refreshed.is_set()
        assert refreshed.wait(20)
        eventually(lambda: value_of(cache.peek(Key(NS, "s"))) == "new")
        ran_on: list[int] = []

        def compute(key: Key) -> Produced[str]:
            ran_on.append(threading.get_ident())
            return Produced("computed")

        assert cache.get_value(Key(NS, "d"), compute) == "computed"
        assert ran_on == [threading.get_ident()]
        stats = cache.stats()["lookup"]
    assert stats["stale_served"] == 1
    assert stats["refreshes"] == 1
    assert stats["misses"] == 1  # the dead entry, counted once (by the core)


def test_many_threads_read_at_once_within_the_read_pool(database_url: str) -> None:
    """16 threads reading 8 warm keys 30 times each all get their key's value, and the read
    pool never holds more than its read_pool_size connections; nothing is computed again."""
    with fleetcache.open_sync(database_url, pool_size=2, read_pool_size=3) as cache:
        keys = [Key(NS, f"k{i}") for i in range(8)]
        for key in keys:
            cache.get(key, lambda key: Produced({"name": key.name}))
        sizes: list[int] = []
        wrong: list[Any] = []

        def reader(offset: int) -> None:
            for i in range(30):
                key = keys[(offset + i) % len(keys)]
                got = cache.get_value(key, never)
                if got != {"name": key.name}:
                    wrong.append((key.name, got))
                sizes.append(cache.stats()["connections"]["read_pool"]["size"])

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = cache.stats()
    assert wrong == []
    assert 1 <= max(sizes) <= 3
    assert stats["connections"]["read_pool"]["max_size"] == 3
    assert stats["lookup"]["computations"] == 8


@pytest.mark.parametrize("verb", ["get", "peek(near=True)"])
def test_a_near_fill_overtaken_by_an_invalidation_is_dropped(database_url: str, verb: str) -> None:
    """A store read on the calling thread that returns the old entry, while an invalidation
    of its key (a set on the core) commits and is applied here before the read fills the
    near tier, does not put the old entry there: the tier keeps the set's new value."""
    with fleetcache.open_sync(database_url, near=100) as cache:
        key = Key(NS, "raced")
        cache.set(key, "old")
        near = cache.lookup.near
        assert near is not None
        near.clear()
        store = store_of(cache)
        original = store.read_here
        raced: list[Entry | None] = []

        def read_then_invalidate(key: Key, by_alias: bool = False) -> Entry | None:
            entry = original(key, by_alias)
            if not raced:  # the first read: the invalidation lands before its fill
                raced.append(entry)
                cache.set(key, "new")  # an invalidation, then the new value (kept near)
            return entry

        store.read_here = read_then_invalidate  # type: ignore[method-assign]
        try:
            read = (
                (lambda: cache.get_value(key, never))
                if verb == "get"
                else (lambda: value_of(cache.peek(key, near=True)))
            )
            assert read() == "old"  # read before the invalidation committed: linearizable
            assert raced[0] is not None
            assert value_of(near.get(key)) == "new"  # the old entry did not replace it
            assert read() == "new"
            near.clear()
            assert read() == "new"  # read from the store, and kept: no invalidation raced it
            assert value_of(near.get(key)) == "new"
        finally:
            del store.read_here


def value_of(entry: Entry | None) -> Any:
    """The entry's value (None when missing)."""
    return None if entry is None else entry.value


def test_the_read_pool_is_counted_and_closed_with_the_cache(database_url: str) -> None:
    """The read pool holds no connection at open and one after a hit (stats and the
    server agree: 1 session + the pool + the read pool); its size defaults to pool_size;
    read_pool_size=0 opens none; close() closes it."""
    cache = fleetcache.open_sync(database_url, pool_size=3)
    try:
        connections = cache.stats()["connections"]
        assert connections["read_pool"]["size"] == 0
        assert connections["read_pool"]["max_size"] == 3
        cache.get(Key(NS, "k"), lambda key: Produced(1))
        assert cache.get_value(Key(NS, "k"), never) == 1

        def agree() -> bool:
            held = cache.stats()["connections"]
            mine = 1 + held["pool"]["size"] + held["read_pool"]["size"]
            return held["read_pool"]["size"] == 1 and backends(database_url) == mine

        eventually(agree)
    finally:
        cache.close()
    assert store_of(cache).read_pool is None
    eventually(lambda: backends(database_url) == 0)
    with fleetcache.open_sync(database_url, read_pool_size=0) as without:
        without.get(Key(NS, "k"), never)
        assert not without.reads_here
        assert "read_pool" not in without.stats()["connections"]
        assert store_of(without).read_pool is None


def test_reads_through_pgbouncer_go_where_the_pool_goes_unprepared(
    pgbouncer: PgBouncer, database_url: str
) -> None:
    """With url a transaction pooler and session_url the server, the read pool connects
    to the pooler without server-side prepared statements: 8 threads read 10 warm keys 3
    times each (psycopg would prepare after 5 runs) without an error."""
    pooled = pgbouncer.conninfo_for(str(conninfo_to_dict(database_url)["dbname"]))
    with fleetcache.open_sync(pooled, session_url=database_url, pool_size=2) as cache:
        keys = [Key(NS, f"p{i}") for i in range(10)]
        for key in keys:
            cache.get(key, lambda key: Produced(key.name))
        wrong: list[Any] = []

        def reader() -> None:
            for _ in range(3):
                for key in keys:
                    if cache.get_value(key, never) != key.name:
                        wrong.append(key)

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        read_pool = store_of(cache).read_pool
        assert read_pool is not None
        with read_pool.connection() as conn:
            assert conn.prepare_threshold is None
            assert conn.info.port == pgbouncer.port
    assert wrong == []


def test_a_read_pool_connection_lost_is_replaced_without_failing_the_read(
    database_url: str,
) -> None:
    """The read pool's connection terminated on the server (a restart does that to every
    idle one) costs the next hit nothing: it is read again on a fresh connection."""
    with fleetcache.open_sync(database_url) as cache:
        key = Key(NS, "k")
        cache.get(key, lambda key: Produced("v"))
        assert cache.get_value(key, never) == "v"
        read_pool = store_of(cache).read_pool
        assert read_pool is not None
        with read_pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert cache.get_value(key, never) == "v"
        with read_pool.connection() as conn:
            assert conn.info.backend_pid != pid


@pytest.mark.parametrize("size", [-1, 1.5, True, "2"])
def test_read_pool_size_is_checked_before_anything_opens(database_url: str, size: Any) -> None:
    """A read_pool_size that is not a whole number >= 0 is refused at once."""
    with pytest.raises(ConfigurationError, match="read_pool_size"):
        fleetcache.open_sync(database_url, read_pool_size=size)
