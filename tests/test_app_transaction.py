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
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import fleetcache
from fleetcache.definitions.lookup import CachingDefinitionLookup
from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.populate import Produced
from fleetcache.notifications.broadcast import parse_invalidation
from fleetcache.stores import queries as q
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.payloads import INVALIDATED_CHANNEL, invalidation_payloads
from fleetcache.stores.postgres import PostgresStore, namespace_lock
from fleetcache_cli import main as cli_main
from test_definitions_lookup import PUBLIC, GraphPrerenderer, Spec, url
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


async def test_several_invalidations_in_one_transaction_commit_together(
    store: PostgresStore, database_url: str
) -> None:
    """Two namespaces invalidated and a third cleared in one transaction: nothing before
    the commit, all of it at the commit, with one announcement each."""
    for ns in ("one", "two", "three"):
        await store.write(Entry(Key(ns, "x"), 1))
    listen = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await listen.execute(f"LISTEN {INVALIDATED_CHANNEL}")
    try:
        async with await psycopg.AsyncConnection.connect(database_url) as app:
            async with app.transaction():
                assert await store.invalidate("one", ["x"], conn=app) == ["x"]
                assert await store.invalidate("two", ["x", "y"], conn=app) == ["x", "y"]
                await store.clear_namespace("three", conn=app)
                assert await store.read(Key("one", "x")) is not None
            for ns in ("one", "two", "three"):
                assert await store.read(Key(ns, "x")) is None
        got = [n async for n in listen.notifies(timeout=WAIT, stop_after=3)]
        heard = [parse_invalidation(n.payload) for n in got]
        assert [(h.kind, h.namespace) for h in heard if h is not None] == [
            ("names", "one"),
            ("names", "two"),
            ("namespace", "three"),
        ]
    finally:
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


async def test_a_repeatable_read_transaction_is_refused_in_python_and_in_sql(
    store: PostgresStore, database_url: str
) -> None:
    """Under a transaction snapshot the closure would miss an entry written after it (here
    a dependent committed between the snapshot and the invalidation): conn= raises
    ConfigurationError and fleetcache_invalidate raises, leaving no stale dependent."""
    await store.write(Entry(Key(NS, "a"), 1))
    async with await psycopg.AsyncConnection.connect(database_url) as app:
        await app.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await app.execute("SELECT 1")  # the transaction's snapshot is taken here
        await store.write(Entry(Key(NS, "b"), 1, deps=("a",)))  # committed after it
        with pytest.raises(ConfigurationError, match="READ COMMITTED"):
            await store.invalidate(NS, ["a"], conn=app)
        with pytest.raises(psycopg.errors.InvalidTransactionState, match="READ COMMITTED"):
            await app.execute("SELECT fleetcache_invalidate(%s, ARRAY['a'])", (NS,))
        await app.rollback()
    assert await store.read(Key(NS, "b")) is not None  # nothing was invalidated


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


# ------------------------------------------------------------- invalidation from SQL


async def _sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []


PAYLOAD_CASES: list[tuple[str | None, list[str] | None, str | None, int]] = [
    (None, None, None, 7000),
    (None, None, "abc", 7000),
    ("shop", None, "abc", 7000),
    ("shop", [], None, 7000),
    ("shop", ["a", "b"], "o1", 7000),
    (
        'r\u00e9alm "q" \\ \n\t\x01\x1f',
        ["\u00e9t\u00e9", 'q"uote', "back\\slash", "\u2028"],
        "o",
        7000,
    ),
    ("shop", [f"name-{i}" for i in range(40)], "origin", 120),
    ("shop", [f"\u00e9{i}" * (i % 7 + 1) for i in range(60)], None, 90),
    ("shop", ["ok", ""], "o", 7000),
    ("shop", ["ok", "x" * 200], "o", 150),
    ("s" * 200, ["a"], "o", 150),
    ("shop", ["\U0001f600" * 10, "b"], None, 70),
]


async def test_the_sql_payloads_are_byte_for_byte_the_libraries(
    store: PostgresStore, database_url: str
) -> None:
    """fleetcache_invalidation_payloads builds what invalidation_payloads builds: escapes,
    multi-byte names, chunking at the budget, and the widening to the whole namespace or
    to everything."""
    for namespace, names, origin, budget in PAYLOAD_CASES:
        rows = await _sql(
            database_url,
            "SELECT fleetcache_invalidation_payloads(%s, %s::text[], %s, %s)",
            (namespace, names, origin, budget),
        )
        expected = invalidation_payloads(namespace, names, origin=origin, budget=budget)
        assert rows[0][0] == expected, (namespace, names, origin, budget)


async def test_the_sql_namespace_lock_is_the_libraries(
    store: PostgresStore, database_url: str
) -> None:
    """fleetcache_namespace_lock(ns) is namespace_lock(ns), so SQL and Python invalidations
    and writes take the same lock."""
    for namespace in ["shop", "https://realm.example/", "\u00e9\U0001f600", "x" * 3000, "a"]:
        rows = await _sql(database_url, "SELECT fleetcache_namespace_lock(%s)", (namespace,))
        assert rows[0][0] == namespace_lock(namespace)


async def _graph(store: PostgresStore, ns: str) -> None:
    """a <- b (dep), b aliased b.alias, c depends on b.alias, d depends on c, e unrelated."""
    await store.write(Entry(Key(ns, "a"), 1))
    await store.write(Entry(Key(ns, "b"), 1, deps=("a",), alias="b.alias"))
    await store.write(Entry(Key(ns, "b", scope="private", user="u1"), 1, deps=("a",)))
    await store.write(Entry(Key(ns, "c"), 1, deps=("b.alias",)))
    await store.write(Entry(Key(ns, "d"), 1, deps=("c",)))
    await store.write(Entry(Key(ns, "e"), 1))


async def test_the_sql_function_invalidates_what_the_library_does(
    store: PostgresStore, database_url: str
) -> None:
    """On the same entries, fleetcache_invalidate reaches the same closure (given names
    first), deletes the same entries and sets the same marks as PostgresStore.invalidate,
    and announces it; fleetcache_clear_namespace clears as clear_namespace does."""
    await _graph(store, "py")
    await _graph(store, "sql")
    python = await store.invalidate("py", ["a", "a", "zz"])
    listen = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await listen.execute(f"LISTEN {INVALIDATED_CHANNEL}")
    try:
        rows = await _sql(
            database_url, "SELECT fleetcache_invalidate('sql', ARRAY['a', 'a', 'zz'])"
        )
        sql_closure = rows[0][0]
        assert sql_closure[:2] == python[:2] == ["a", "zz"]
        assert set(sql_closure) == set(python) == {"a", "zz", "b", "b.alias", "c", "d"}
        left = await _sql(
            database_url,
            "SELECT namespace, name, scope FROM fleetcache_entries ORDER BY 1, 2, 3",
        )
        assert left == [("py", "e", "public"), ("sql", "e", "public")]
        marks = await _sql(
            database_url,
            "SELECT namespace, name FROM fleetcache_generations WHERE kind = 'k' ORDER BY 1, 2",
        )
        assert [m[1] for m in marks if m[0] == "py"] == [m[1] for m in marks if m[0] == "sql"]
        got = [n async for n in listen.notifies(timeout=WAIT, stop_after=1)]
        assert got[0].payload == invalidation_payloads("sql", sql_closure)[0]
        await _sql(database_url, "SELECT fleetcache_clear_namespace('sql')")
        assert await store.read(Key("sql", "e")) is None
        assert await store.read(Key("py", "e")) is not None
        got = [n async for n in listen.notifies(timeout=WAIT, stop_after=1)]
        assert got[0].payload == invalidation_payloads("sql", None)[0]
    finally:
        await listen.close()


async def test_the_sql_function_refuses_bad_input_and_a_rollback_undoes_it(
    store: PostgresStore, database_url: str
) -> None:
    """An empty namespace, NULL names and an over-long name are errors naming the
    problem; a rolled-back call leaves the entry and sets no mark."""
    for bad, message in [
        ("SELECT fleetcache_invalidate('', ARRAY['a'])", "non-empty"),
        ("SELECT fleetcache_invalidate('ns', NULL)", "without NULL"),
        ("SELECT fleetcache_invalidate('ns', ARRAY['a', NULL])", "without NULL"),
        ("SELECT fleetcache_invalidate('ns', ARRAY[repeat('x', 3000)])", "over 2048 bytes"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            await _sql(database_url, bad)
    await store.write(Entry(Key(NS, "a"), 1))
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("SELECT fleetcache_invalidate(%s, ARRAY['a'])", (NS,))
        await conn.rollback()
    assert await store.read(Key(NS, "a")) is not None
    assert await _marks(database_url, "a") == 0


async def test_the_trigger_ddl_quotes_the_table_and_namespace(
    store: PostgresStore, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleetcache trigger` prints DDL with the table quoted as identifiers and the
    namespace as a literal (an injection attempt stays a namespace), and --install
    creates a trigger that invalidates the rows' names in their transaction."""
    evil = "x'); DROP TABLE txn_app_rows; --"
    await _sql(database_url, 'CREATE SCHEMA "we ird"')
    await _sql(database_url, 'CREATE TABLE "we ird"."ta""ble" (id int PRIMARY KEY, v int)')
    args = [
        "trigger",
        "--table",
        'we ird.ta"ble',
        "--namespace",
        evil,
        "--names",
        "ARRAY['row:' || r.id]",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert '"we ird"."ta""ble"' in printed
    assert "'x''); DROP TABLE txn_app_rows; --'" in printed
    assert (
        await asyncio.to_thread(cli_main, [*args, "--install", "--database-url", database_url]) == 0
    )
    await store.write(Entry(Key(evil, "row:1"), 1))
    await store.write(Entry(Key(evil, "row:2"), 1))
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute('INSERT INTO "we ird"."ta""ble" VALUES (1, 0)')
        assert await store.read(Key(evil, "row:1")) is not None  # not committed yet
        await conn.commit()
    assert await store.read(Key(evil, "row:1")) is None
    assert await store.read(Key(evil, "row:2")) is not None
    await _sql(database_url, 'DELETE FROM "we ird"."ta""ble" WHERE id = 1')
    await store.write(Entry(Key(evil, "row:1"), 2))
    await _sql(database_url, 'UPDATE "we ird"."ta""ble" SET id = 2')  # no row: nothing
    assert await store.read(Key(evil, "row:1")) is not None
    assert await _sql(database_url, "SELECT count(*) FROM txn_app_rows") == [(1,)]


@pytest.mark.processes
@pytest.mark.parametrize("mode", ["function", "trigger"])
async def test_a_plain_psycopg_writer_invalidating_in_sql_leaves_no_stale_read(
    store: PostgresStore, database_url: str, mode: str
) -> None:
    """A process with no fleetcache (plain psycopg) updates the row and invalidates in the
    same transaction, through fleetcache_invalidate or a trigger installed by `fleetcache
    trigger`, TRIALS times, while READERS processes read the value computed from the row:
    no read that began after a commit returns an older version; the last one is left."""
    if mode == "trigger":
        args = [
            "trigger",
            "--install",
            "--database-url",
            database_url,
            "--table",
            "txn_app_rows",
            "--namespace",
            NS,
            "--names",
            "ARRAY['price:' || r.id]",
        ]
        assert await asyncio.to_thread(cli_main, args) == 0
    results = await _run_readers_against(
        database_url,
        store,
        [sys.executable, str(WORKER), "sql-writer", database_url, mode, NS, str(TRIALS), "22"],
    )
    entry = await store.read(Key(NS, "price:1"))
    print(mode, "trials", TRIALS, "readers", results, "entry", entry)
    assert sum(r["after_commit"] for r in results) > 0
    assert sum(r["stale"] for r in results) == 0, results
    assert entry is None or entry.value == {"version": TRIALS}


async def _run_readers_against(
    url: str, store: PostgresStore, writer: list[str]
) -> list[dict[str, int]]:
    readers = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER), "reader", url, NS, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(READERS)
    ]
    try:
        await eventually(lambda: _has_entry(store), WAIT * 2)
        proc = await asyncio.create_subprocess_exec(*writer, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT * 4)
        assert proc.returncode == 0
        assert out.strip() == b"done"
        await asyncio.sleep(0.1)  # let the readers read after the last commit
        await _sql(url, "UPDATE txn_app_marker SET stop = true")
        results = []
        for reader in readers:
            assert reader.stdout is not None
            data = await asyncio.wait_for(reader.stdout.read(), WAIT * 2)
            assert await reader.wait() == 0
            results.append(json.loads(data.decode().strip().splitlines()[-1]))
        return results
    finally:
        for reader in readers:
            if reader.returncode is None:
                reader.kill()
                await reader.wait()


# ------------------------------------------------------------- the definitions domain


async def test_a_realm_write_invalidates_its_module_in_the_same_transaction(
    store: PostgresStore, database_url: str
) -> None:
    """A realm write (its file row) and CachingDefinitionLookup.invalidate(module,
    conn=) in one transaction: a rollback leaves the module and its dependent cached (no
    render); the commit drops both, near copies included, and the next reads render the
    new version once each."""
    card, page = url(PUBLIC, "card") + ".gts", url(PUBLIC, "page") + ".gts"
    pre = GraphPrerenderer({card: Spec(), page: Spec(imports=[card])})
    await _sql(database_url, "CREATE TABLE realm_files (url text PRIMARY KEY, body text)")
    await _sql(database_url, "INSERT INTO realm_files VALUES (%s, 'v1')", (card,))
    async with await fleetcache.open(database_url, near=100) as cache:
        lookup = CachingDefinitionLookup(cache, pre)
        lookup.register_realm(PUBLIC)
        assert await lookup.get_cached_definitions(card) is not None
        assert await lookup.get_cached_definitions(page) is not None
        assert (pre.renders(card), pre.renders(page)) == (1, 1)
        async with await psycopg.AsyncConnection.connect(database_url) as app:
            await app.execute("UPDATE realm_files SET body = 'v2' WHERE url = %s", (card,))
            invalidated = await lookup.invalidate(card, conn=app)
            assert {card, page} <= set(invalidated)
            await app.rollback()
            assert await lookup.get_cached_definitions(card) is not None
            assert await lookup.get_cached_definitions(page) is not None
            assert (pre.renders(card), pre.renders(page)) == (1, 1)
            async with app.transaction():
                await app.execute("UPDATE realm_files SET body = 'v2' WHERE url = %s", (card,))
                pre.change(card, Spec(exports=["Card", "Extra"]))
                await lookup.invalidate(card, conn=app)
                assert await store.read(Key(PUBLIC.url, card)) is not None  # not yet
        assert await store.read(Key(PUBLIC.url, card)) is None
        assert await store.read(Key(PUBLIC.url, page)) is None
        near = cache.lookup.near
        assert near is not None
        await eventually(lambda: near.get(Key(PUBLIC.url, page), count_miss=False) is None)
        module = await lookup.get_cached_definitions(card)
        assert module is not None
        assert any("Extra" in key for key in module.definitions)
        assert await lookup.get_cached_definitions(page) is not None
        assert (pre.renders(card), pre.renders(page)) == (2, 2)


# ------------------------------------------------------------------------ the sync API


def test_the_sync_api_invalidates_in_a_sync_transaction(database_url: str) -> None:
    """SyncFleetcache.invalidate(..., conn=) on a psycopg.Connection: nothing before the
    commit and nothing after a rollback; at the commit the entry is gone and this
    process's near copy is dropped (the SQL function's announcement has no origin);
    expand and an async connection are refused."""
    key = Key(NS, "price:1")
    version = {"v": 0}

    def produce(_key: Key) -> Any:
        return Produced(value={"version": version["v"]})

    with (
        fleetcache.open_sync(database_url, near=100) as cache,
        psycopg.connect(database_url) as app,
    ):
        assert cache.get_value(key, produce) == {"version": 0}
        version["v"] = 1
        app.execute("SELECT 1")
        assert cache.invalidate(NS, ["price:1"], conn=app) == ["price:1"]
        app.rollback()
        assert cache.get_value(key, produce) == {"version": 0}
        with app.transaction():
            cache.invalidate(NS, ["price:1"], conn=app)
            assert cache.call(cache.store.read, key) is not None  # not committed yet
        assert cache.call(cache.store.read, key) is None
        near = cache.lookup.near
        assert near is not None
        deadline = time.monotonic() + WAIT
        while near.get(key, count_miss=False) is not None:
            assert time.monotonic() < deadline, "the near copy was never dropped"
            time.sleep(0.01)
        assert cache.get_value(key, produce) == {"version": 1}
        with app.transaction():
            cache.clear_namespace(NS, conn=app)
        assert cache.call(cache.store.read, key) is None
        with app.transaction(), pytest.raises(ConfigurationError, match="expand"):
            cache.invalidate(NS, ["a"], expand=lambda n: [n], conn=app)
        with pytest.raises(ConfigurationError, match="not in one"):
            cache.invalidate(NS, ["a"], conn=app)
