"""Schema versions: a new database gets the latest version, a version 1 database (built from the
first release's DDL, ``tests/fixtures/v1_*.sql``) is upgraded in place with its rows and
marks kept, and a database newer than the code is refused naming both versions."""

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

from fleetcache.errors import SchemaVersionError
from fleetcache.stores import Entry, GenerationStamp, Key, PostgresStore, SqliteStore
from fleetcache.stores.migrations import LATEST, migrate
from fleetcache.stores.postgres import PostgresPoint
from fleetcache.stores.sqlite import SqlitePoint

FIXTURES = Path(__file__).with_name("fixtures")
NS = "https://realm.example/"

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
    """migrate() (for deploy time) upgrades a version 1 database and says (1, 2); run
    again it says (2, 2); on a new database (0, 2)."""
    await make_v1_postgres(database_url)
    assert await migrate(database_url) == (1, LATEST)
    assert await migrate(database_url) == (LATEST, LATEST)


async def test_postgres_migrate_creates_a_new_schema(database_url: str) -> None:
    """On an empty database migrate() creates the latest schema: (0, 2)."""
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
    """migrate() on sqlite: (1, 2) for a version 1 file (path or sqlite:/// URL), then
    (2, 2); (0, 2) for a new file."""
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
    conn.execute("UPDATE fleetcache_schema SET version = 7")
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(SchemaVersionError) as info:
        await store.open()
    assert (info.value.found, info.value.known) == (7, LATEST)
    assert "version 7" in str(info.value)
    with pytest.raises(SchemaVersionError):
        await migrate(path)
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        assert conn.execute("SELECT version FROM fleetcache_schema").fetchone() == (7,)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
