"""Schema versions: a new database gets the latest version, a version 1 or 2 database
(built from that release's DDL, ``tests/fixtures/v1_*.sql`` and ``v2_*.sql``) is upgraded
in place with its rows and marks kept, and a database newer than the code is refused
naming both versions."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import fleetcache
from fleetcache.errors import SchemaVersionError
from fleetcache.stores import queries as q
from fleetcache.stores.base import Entry, GenerationStamp, Key
from fleetcache.stores.migrations import LATEST, migrate, migrate_postgres
from fleetcache.stores.postgres import PostgresPoint, PostgresStore, key_hash
from fleetcache.stores.sqlite import SqlitePoint, SqliteStore
from fleetcache.stores.validation import encode_json

FIXTURES = Path(__file__).with_name("fixtures")
NS = "https://realm.example/"


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """In this module a database with no fleetcache schema (not the migrated copy the other
    tests get): these tests create and upgrade the schema themselves."""
    return empty_database_url


# (url, scope, user, realm, definitions, deps, error_doc, created_at, alias, diagnostics)
V1_ROWS: list[tuple[Any, ...]] = [
    (NS + "card.gts", "public", "", NS, {"kind": "card"}, [NS + "base"], None, 1000, NS + "card",
     {"ms": 12}),
    (NS + "base.gts", "public", "", NS, {"kind": "base"}, [], {"status": 500}, 2000, NS + "base",
     None),
    (NS + "card.gts", "realm-auth", "bob", NS, {"kind": "bob's"}, [], None, 3000, None, None),
    # Names a joined string would confuse, and non-ASCII: the key hash computed in SQL by
    # the upgrade must match the one the store computes.
    ("a|b", "s:1", "2:u", "ns|x", {"hostile": 1}, [], None, 4000, None, None),
    ("é😀", "public", "", "ns", {"hostile": 2}, ["d"], None, 5000, None, None),
]  # fmt: skip


def v1_statements(name: str) -> list[str]:
    """The first release's DDL from a fixture file."""
    text = (FIXTURES / name).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    return [part.strip() for part in body.split("\n;\n") if part.strip()]


def key_of(row: tuple[Any, ...]) -> Key:
    """The v2 key of a v1 row."""
    url, scope, user, realm = row[:4]
    return Key(realm, url, scope, user)


# ----------------------------------------------------------------------------- Postgres


async def make_v1_postgres(url: str) -> str:
    """A version 1 database with rows and one mark on ``card.gts``; returns a snapshot
    taken before that mark was set (a stamp the mark must refuse)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for statement in v1_statements("v1_postgres.sql"):
            await conn.execute(statement)
        for row in V1_ROWS:
            await conn.execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url,"
                " definitions, deps, error_doc, created_at, file_alias, diagnostics)"
                " VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s, %s::jsonb)",
                [
                    *row[:4],
                    json.dumps(row[4]),
                    json.dumps(row[5]),
                    None if row[6] is None else json.dumps(row[6]),
                    row[7],
                    row[8],
                    None if row[9] is None else json.dumps(row[9]),
                ],
            )
        # A JSON null written by hand must come out as SQL NULL.
        await conn.execute(
            "UPDATE modules SET diagnostics = 'null'::jsonb WHERE url = %s AND cache_scope = %s",
            (NS + "base.gts", "public"),
        )
        snapshot = await (await conn.execute("SELECT pg_current_snapshot()::text")).fetchone()
        await conn.execute(
            "INSERT INTO fleetcache_generations (kind, namespace, name, bumped_by)"
            " VALUES ('k', %s, %s, pg_current_xact_id())",
            (NS, NS + "card.gts"),
        )
    assert snapshot is not None
    return str(snapshot[0])


async def test_postgres_v1_database_is_upgraded_with_rows_and_marks_kept(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a version 1 database upgrades it to the latest version in place: every row reads
    back (hostile keys included, deps usable for invalidation, JSON null as SQL NULL), a
    version 1 mark still refuses a write stamped before it, 'modules' is left as it was,
    and one log line says fleetcache no longer uses it."""
    before_mark = await make_v1_postgres(database_url)
    store = PostgresStore(database_url, max_size=2)
    with caplog.at_level(logging.INFO, logger="fleetcache"):
        await store.open()
    try:
        notes = [r.getMessage() for r in caplog.records if "modules" in r.getMessage()]
        assert len(notes) == 1
        assert "no longer uses 'modules'" in notes[0]
        assert "5 rows were copied" in notes[0]
        card = await store.read(Key(NS, NS + "card.gts"))
        assert card == Entry(
            Key(NS, NS + "card.gts"),
            {"kind": "card"},
            (NS + "base",),
            None,
            1000,
            NS + "card",
            {"ms": 12},
        )
        base = await store.read(Key(NS, NS + "base"), by_alias=True)
        assert base is not None
        assert (base.error, base.diagnostics) == ({"status": 500}, None)
        for row in V1_ROWS:
            got = await store.read(key_of(row))
            assert got is not None, row
            assert got.value == row[4]
        # The mark of the first release: a write stamped before it is refused.
        now = time.time()
        stale = GenerationStamp(NS, (NS + "card.gts",), PostgresPoint(before_mark, now))
        assert not await store.write(Entry(Key(NS, NS + "card.gts"), {"new": 1}), stamp=stale)
        unrelated = GenerationStamp(NS, (NS + "other",), PostgresPoint(before_mark, now))
        assert await store.write(Entry(Key(NS, NS + "other"), {"new": 1}), stamp=unrelated)
        # Deps were converted: invalidating base reaches card (both scopes).
        names = await store.invalidate(NS, [NS + "base"])
        assert set(names) >= {NS + "base", NS + "base.gts", NS + "card.gts", NS + "card"}
        assert await store.read(Key(NS, NS + "card.gts")) is None
        async with store.pool.connection() as conn:
            version = await (await conn.execute("SELECT version FROM fleetcache_schema")).fetchall()
            left = await (await conn.execute("SELECT count(*) FROM modules")).fetchone()
        assert version == [(LATEST,)]
        assert left == (len(V1_ROWS),)
    finally:
        await store.close()


async def test_postgres_upgrade_happens_once_when_many_processes_open_together(
    database_url: str,
) -> None:
    """Several stores opening one version 1 database at once: one upgrades, the others
    wait for it and find the latest version; the rows are copied once."""
    await make_v1_postgres(database_url)
    stores = [PostgresStore(database_url, max_size=1) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        async with stores[0].pool.connection() as conn:
            rows = await (await conn.execute("SELECT count(*) FROM fleetcache_entries")).fetchone()
        assert rows == (len(V1_ROWS),)
    finally:
        for store in stores:
            await store.close()


async def test_postgres_migrate_reports_versions(database_url: str) -> None:
    """migrate() (for deploy time) upgrades a version 1 database and says (1, latest); run
    again it says (latest, latest)."""
    await make_v1_postgres(database_url)
    assert await migrate(database_url) == (1, LATEST)
    assert await migrate(database_url) == (LATEST, LATEST)


async def test_postgres_migrate_creates_a_new_schema(database_url: str) -> None:
    """On an empty database migrate() creates the latest schema: (0, latest)."""
    assert await migrate(database_url) == (0, LATEST)


async def test_postgres_an_applications_own_modules_table_is_left_alone(
    database_url: str,
) -> None:
    """A table named 'modules' that is the application's own is neither adopted nor
    changed: fleetcache keeps its entries in fleetcache_entries."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE modules (id serial PRIMARY KEY, title text)")
        await conn.execute("INSERT INTO modules (title) VALUES ('mine')")
    store = PostgresStore(database_url, max_size=1)
    await store.open()
    try:
        await store.write(Entry(Key(NS, "a"), 1))
        async with store.pool.connection() as conn:
            mine = await (await conn.execute("SELECT id, title FROM modules")).fetchall()
        assert mine == [(1, "mine")]
    finally:
        await store.close()


async def test_postgres_newer_schema_is_refused_naming_both_versions(database_url: str) -> None:
    """A database holding a newer schema version is refused with SchemaVersionError naming
    the version found and the version known, and the store leaves no connection open."""
    first = PostgresStore(database_url, max_size=1)
    await first.open()
    await first.close()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await admin.execute("UPDATE fleetcache_schema SET version = 99")
        store = PostgresStore(database_url, max_size=2)
        with pytest.raises(SchemaVersionError) as info:
            await store.open()
        assert (info.value.found, info.value.known) == (99, LATEST)
        assert "version 99" in str(info.value)
        assert f"up to {LATEST}" in str(info.value)
        with pytest.raises(SchemaVersionError):
            await migrate(database_url)
        others = -1
        for _ in range(500):  # a closed connection's backend exits a moment later
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            others = (await cursor.fetchone() or (-1,))[0]
            if others == 0:
                break
            await asyncio.sleep(0.01)
        version = await (await admin.execute("SELECT version FROM fleetcache_schema")).fetchone()
    assert others == 0
    assert version == (99,)


# ------------------------------------------------------------------------------- sqlite


def make_v1_sqlite(path: Path) -> None:
    """A version 1 file with rows, the clock at 5 and a mark on ``card.gts`` at 5."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in v1_statements("v1_sqlite.sql"):
            conn.execute(statement)
        for row in V1_ROWS:
            conn.execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url,"
                " definitions, deps, error_doc, created_at, file_alias, diagnostics)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    *row[:4],
                    json.dumps(row[4]),
                    json.dumps(row[5]),
                    None if row[6] is None else json.dumps(row[6]),
                    row[7],
                    row[8],
                    None if row[9] is None else json.dumps(row[9]),
                ],
            )
        conn.execute(
            "UPDATE modules SET diagnostics = 'null' WHERE url = ? AND cache_scope = 'public'",
            (NS + "base.gts",),
        )
        conn.execute("UPDATE fleetcache_clock SET seq = 5")
        conn.execute(
            "INSERT INTO fleetcache_generations (kind, namespace, name, seq) VALUES ('k', ?, ?, 5)",
            (NS, NS + "card.gts"),
        )
    finally:
        conn.close()


async def test_sqlite_v1_file_is_upgraded_with_rows_and_marks_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a version 1 file upgrades it to the latest version in place: every row reads back,
    deps are usable for invalidation, a version 1 mark still refuses a write stamped
    before it (and not one stamped after), and 'modules' is left as it was."""
    path = tmp_path / "v1.sqlite3"
    make_v1_sqlite(path)
    store = SqliteStore(path)
    with caplog.at_level(logging.INFO, logger="fleetcache"):
        await store.open()
    try:
        notes = [r.getMessage() for r in caplog.records if "modules" in r.getMessage()]
        assert len(notes) == 1
        assert "5 rows were copied" in notes[0]
        card = await store.read(Key(NS, NS + "card.gts"))
        assert card == Entry(
            Key(NS, NS + "card.gts"),
            {"kind": "card"},
            (NS + "base",),
            None,
            1000,
            NS + "card",
            {"ms": 12},
        )
        base = await store.read(Key(NS, NS + "base"), by_alias=True)
        assert base is not None
        assert (base.error, base.diagnostics) == ({"status": 500}, None)
        for row in V1_ROWS:
            got = await store.read(key_of(row))
            assert got is not None, row
            assert got.value == row[4]
        now = time.time()
        card_key = Key(NS, NS + "card.gts")
        stale = GenerationStamp(NS, (NS + "card.gts",), SqlitePoint(4, now))
        fresh = GenerationStamp(NS, (NS + "card.gts",), SqlitePoint(5, now))
        assert not await store.write(Entry(card_key, {"new": 1}), stamp=stale)
        assert await store.write(
            Entry(card_key, {"new": 2}, (NS + "base",), alias=NS + "card"), stamp=fresh
        )
        names = await store.invalidate(NS, [NS + "base"])
        assert set(names) >= {NS + "base", NS + "base.gts", NS + "card.gts", NS + "card"}
        assert await store.read(card_key) is None
        assert await store.read(Key(NS, NS + "card.gts", "realm-auth", "bob")) is None
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM fleetcache_schema").fetchall() == [(LATEST,)]
        assert conn.execute("SELECT count(*) FROM modules").fetchone() == (len(V1_ROWS),)
    finally:
        conn.close()


async def test_sqlite_migrate_reports_versions(tmp_path: Path) -> None:
    """migrate() on sqlite: (1, latest) for a version 1 file (path or sqlite:/// URL), then
    (latest, latest); (0, latest) for a new file."""
    path = tmp_path / "v1.sqlite3"
    make_v1_sqlite(path)
    assert await migrate(path) == (1, LATEST)
    assert await migrate(f"sqlite:///{path}") == (LATEST, LATEST)
    assert await migrate(tmp_path / "new.sqlite3") == (0, LATEST)


async def test_sqlite_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    """A sqlite file holding a newer schema is refused with both numbers, and the store
    leaves the file unlocked and unchanged."""
    path = tmp_path / "c.sqlite3"
    first = SqliteStore(path)
    await first.open()
    await first.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE fleetcache_schema SET version = ?", (LATEST + 1,))
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(SchemaVersionError) as info:
        await store.open()
    assert (info.value.found, info.value.known) == (LATEST + 1, LATEST)
    assert f"version {LATEST + 1}" in str(info.value)
    with pytest.raises(SchemaVersionError):
        await migrate(path)
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        assert conn.execute("SELECT version FROM fleetcache_schema").fetchone() == (LATEST + 1,)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


# ------------------------------------------------------------ version 2 -> 3 (values)

# (key, value, deps, error, created_at, alias, diagnostics): documents whose keys jsonb
# reorders, numbers it rewrites, hostile and non-ASCII keys, absent error and diagnostics.
V2_ROWS: list[tuple[Any, ...]] = [
    (Key(NS, NS + "card.gts"),
     {"moduleURL": NS + "card", "type": "definition",
      "definition": {"note": "é", "name": "Card", "displayName": "Card"}},
     [NS + "base"], None, 1000, NS + "card", {"requestId": "r-1", "renderMs": 5}),
    (Key(NS, NS + "base.gts"), {}, [], {"status": 500, "message": "boom"}, 2000, NS + "base",
     None),
    (Key("ns|x", "a|b", "s:1", "2:u"), [1.5, 10**30, "x", {"b": 1, "a": 2}], [], None, 3000,
     None, None),
    (Key("ns", "é😀", "realm-auth", "bob"), "text", ["d"], None, None, None, {"z": 0, "y": 1}),
]  # fmt: skip


def _jsonb(document: Any) -> str | None:
    return None if document is None else json.dumps(document)


async def make_v2_postgres(url: str) -> dict[str, tuple[str, str | None, str | None]]:
    """A version 2 database holding :data:`V2_ROWS` as that release wrote them (jsonb);
    returns, by name, the text of value, error and diagnostics as version 2 read them."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for statement in v1_statements("v2_postgres.sql"):
            await conn.execute(statement)
        for key, value, deps, error, created_at, alias, diagnostics in V2_ROWS:
            await conn.execute(
                "INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id,"
                " value, deps, error, created_at, alias, diagnostics)"
                " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s::jsonb, %s, %s, %s::jsonb)",
                [key_hash(key), key.namespace, key.name, key.scope, key.user, json.dumps(value),
                 deps, _jsonb(error), created_at, alias, _jsonb(diagnostics)],
            )  # fmt: skip
        cursor = await conn.execute(
            "SELECT name, value::text, error::text, diagnostics::text FROM fleetcache_entries"
        )
        return {name: (value, error, diagnostics) for name, value, error, diagnostics in
                await cursor.fetchall()}  # fmt: skip


async def entries_columns(conn: psycopg.AsyncConnection[Any], schema: str) -> list[Any]:
    """Name, type, nullability and default of each column of ``schema``'s entries table."""
    cursor = await conn.execute(
        "SELECT column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'fleetcache_entries'"
        " ORDER BY ordinal_position",
        [schema],
    )
    return await cursor.fetchall()


async def test_postgres_v2_database_is_upgraded_with_values_kept(database_url: str) -> None:
    """Opening a version 2 database (values as jsonb) converts every row in place: each
    reads back as version 2 read it (jsonb's key order, equal documents), errors and
    diagnostics too (absent ones still SQL NULL), deps still reach dependents; a new write
    keeps its own key order; the table matches a new database's; the old write function is
    gone."""
    before = await make_v2_postgres(database_url)
    assert await migrate(database_url) == (2, LATEST)
    store = PostgresStore(database_url, max_size=2)
    await store.open()
    try:
        for key, value, deps, error, created_at, alias, diagnostics in V2_ROWS:
            got = await store.read(key)
            assert got == Entry(key, value, tuple(deps), error, created_at, alias, diagnostics)
            as_v2_read = [None if text is None else json.loads(text) for text in before[key.name]]
            assert [json.dumps(p) for p in (got.value, got.error, got.diagnostics)] == [
                json.dumps(p) for p in as_v2_read
            ]
        # jsonb had reordered the first row's document; this check has teeth.
        assert list(json.loads(before[NS + "card.gts"][0])) != list(V2_ROWS[0][1])
        written = Entry(Key(NS, NS + "card.gts"), V2_ROWS[0][1], (NS + "base",), alias=NS + "card")
        assert await store.write(written)
        again = await store.read(written.key)
        assert again is not None
        assert json.dumps(again.value) == json.dumps(V2_ROWS[0][1])
        names = await store.invalidate(NS, [NS + "base"])
        assert set(names) >= {NS + "base", NS + "base.gts", NS + "card.gts", NS + "card"}
        assert await store.read(written.key) is None
        async with store.pool.connection() as conn:
            await conn.execute("CREATE SCHEMA fresh")
            await conn.execute("SET search_path = fresh")
            await migrate_postgres(conn, "a new schema")
            await conn.execute("RESET search_path")
            upgraded = await entries_columns(conn, "public")
            assert upgraded == await entries_columns(conn, "fresh")
            old_function = await conn.execute(
                "SELECT count(*) FROM pg_proc WHERE proname = 'fleetcache_write_v2'"
            )
            assert await old_function.fetchone() == (0,)
    finally:
        await store.close()
    kinds = {name: kind for name, kind, *_ in upgraded}
    assert [kinds[c] for c in ("value", "codec", "error", "diagnostics", "deps")] == [
        "bytea",
        "text",
        "text",
        "text",
        "ARRAY",
    ]


def make_v2_sqlite(path: Path) -> None:
    """A version 2 file holding :data:`V2_ROWS` as that release wrote them (compact JSON
    text, deps listed in their own table)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in v1_statements("v2_sqlite.sql"):
            conn.execute(statement)
        for key, value, deps, error, created_at, alias, diagnostics in V2_ROWS:
            fields = (key.namespace, key.name, key.scope, key.user)
            conn.execute(
                "INSERT INTO fleetcache_entries (namespace, name, scope, user_id, value, deps,"
                " error, created_at, alias, diagnostics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [*fields, encode_json("v", value), json.dumps(deps),
                 None if error is None else encode_json("e", error), created_at, alias,
                 None if diagnostics is None else encode_json("d", diagnostics)],
            )  # fmt: skip
            conn.executemany(
                "INSERT INTO fleetcache_entry_deps VALUES (?, ?, ?, ?, ?)",
                [(*fields, dep) for dep in deps],
            )
    finally:
        conn.close()


async def test_sqlite_v2_file_is_upgraded_with_values_kept(tmp_path: Path) -> None:
    """Opening a version 2 file keeps every row byte for byte (version 2 already stored
    the JSON text verbatim, so even key order survives), as codec 'json' bytes; deps still
    reach dependents; a new write on the upgraded file is stored as bytes too."""
    path = tmp_path / "v2.sqlite3"
    make_v2_sqlite(path)
    assert await migrate(path) == (2, LATEST)
    store = SqliteStore(path)
    await store.open()
    try:
        for key, value, deps, error, created_at, alias, diagnostics in V2_ROWS:
            got = await store.read(key)
            assert got == Entry(key, value, tuple(deps), error, created_at, alias, diagnostics)
            assert [json.dumps(p) for p in (got.value, got.error, got.diagnostics)] == [
                json.dumps(p) for p in (value, error, diagnostics)
            ]
        assert await store.write(Entry(Key(NS, "new"), {"b": 1, "a": 2}))
        names = await store.invalidate(NS, [NS + "base"])
        assert set(names) >= {NS + "base.gts", NS + "card.gts", NS + "card"}
        assert await store.read(Key(NS, NS + "card.gts")) is None
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        kinds = conn.execute(
            "SELECT DISTINCT typeof(value), codec FROM fleetcache_entries"
        ).fetchall()
        assert kinds == [("blob", "json")]
        new = conn.execute("SELECT value FROM fleetcache_entries WHERE name = 'new'").fetchone()
        assert new == (b'{"b":1,"a":2}',)
    finally:
        conn.close()


async def test_postgres_v6_database_gets_the_try_and_read_function(database_url: str) -> None:
    """Version 7 adds ``fleetcache_try_lock_and_read_v1``: a version 6 database gets it on
    open (nothing else changes), and a coordinated miss then computes through it."""
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("DROP FUNCTION fleetcache_try_lock_and_read_v1")
        await conn.execute("UPDATE fleetcache_schema SET version = 6")
    assert await migrate(database_url) == (6, LATEST)
    async with fleetcache.open(database_url) as cache:

        async def produce(key: Key) -> fleetcache.Produced[str]:
            return fleetcache.Produced("computed")

        entry = await cache.get(Key(NS, NS + "after-upgrade"), produce)
        assert entry is not None
        assert cache.coordinator is not None
        assert cache.coordinator.stats()["lock_won"] == 1
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        found = await conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname = 'fleetcache_try_lock_and_read_v1'"
        )
        assert await found.fetchone() == (1,)


async def test_postgres_v7_database_counts_writes_with_row_triggers(database_url: str) -> None:
    """Version 8 counts inserts and updates with row triggers: a version 7 database (its
    statement triggers put back) upgrades in place with its counts kept, and from then on
    new rows, resized values, same-sized overwrites and deletes keep the counts equal to
    the rows."""
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id, value,"
            " codec, deps) VALUES ('\\x01', 'v7', 'before', 'public', '', 'abc', 'json', '{}')"
        )
        for statement in [
            "DROP TRIGGER fleetcache_count_insert ON fleetcache_entries",
            "DROP TRIGGER fleetcache_count_update ON fleetcache_entries",
            "DROP FUNCTION fleetcache_count_row_v1",
            *q._PG_COUNT_STATEMENT_TRIGGERS,
            "UPDATE fleetcache_schema SET version = 7",
        ]:
            await conn.execute(statement)
    assert await migrate(database_url) == (7, LATEST)
    store = PostgresStore(database_url, max_size=2)
    await store.open()
    try:
        assert await store.table_size() == (1, 3)  # counted by the statement trigger
        key = Key("v7", "k")
        assert await store.write(Entry(key, "x" * 10))
        assert await store.write(Entry(key, "y" * 10))  # same size: no trigger call
        assert await store.write(Entry(key, "z" * 30))
        assert await store.write(Entry(Key("v7", "k2"), [1, 2]))
        await store.invalidate("v7", ["k2"])
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            rows = await conn.execute(
                "SELECT count(*), sum(octet_length(value)) FROM fleetcache_entries"
            )
            assert await rows.fetchone() == (2, 3 + 32)
            triggers = await conn.execute(
                "SELECT tgname, (tgtype & 1) = 1 FROM pg_trigger"
                " WHERE tgrelid = 'fleetcache_entries'::regclass AND NOT tgisinternal"
                " ORDER BY tgname"
            )
            assert await triggers.fetchall() == [
                ("fleetcache_count_delete", False),
                ("fleetcache_count_insert", True),
                ("fleetcache_count_update", True),
            ]
        assert await store.table_size() == (2, 3 + 32)
    finally:
        await store.close()


async def test_postgres_v8_database_counts_on_rows_writers_do_not_share(
    database_url: str,
) -> None:
    """Version 9 spreads the counts over 1,024 rows: two backends whose pids are equal
    modulo 16 (so version 8 gave them one counter row) write at once without the second
    waiting for the first one's commit, and the counts still equal the rows."""
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for function in (q._PG_COUNT_FUNCTION, q._PG_COUNT_ROW_FUNCTION):
            # Version 8's: pid % 16.
            await conn.execute(function.replace(f"% {q.PG_COUNT_SHARDS}", "% 16"))
        await conn.execute("UPDATE fleetcache_schema SET version = 8")
    assert await migrate(database_url) == (8, LATEST)

    # Two backends that shared a counter row in version 8, and do not now.
    conns: list[psycopg.AsyncConnection[Any]] = []
    seen: dict[int, psycopg.AsyncConnection[Any]] = {}
    pair: tuple[psycopg.AsyncConnection[Any], psycopg.AsyncConnection[Any]] | None = None
    try:
        while pair is None:
            assert len(conns) < 60, "no two backends with pids equal modulo 16 only"
            conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
            conns.append(conn)
            pid = conn.info.backend_pid
            other = seen.get(pid % 16)
            if other is not None and other.info.backend_pid % 1024 != pid % 1024:
                pair = (other, conn)
            seen.setdefault(pid % 16, conn)
        first, second = pair
        insert = (
            "INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id, value,"
            " codec, deps) VALUES (%s, 'v8', %s, 'public', '', 'abcd', 'json', '{}')"
        )
        async with first.transaction():
            await first.execute(insert, (b"\x01", "first"))  # holds its counter row
            await second.execute("SET lock_timeout = '2s'")
            started = time.monotonic()
            await second.execute(insert, (b"\x02", "second"))  # would wait, then fail
            assert time.monotonic() - started < 1.5
        store = PostgresStore(database_url, max_size=1)
        await store.open()
        try:
            assert await store.table_size() == (2, 8)
        finally:
            await store.close()
    finally:
        for conn in conns:
            await conn.close()
