"""The store contract: every test runs against memory, sqlite and Postgres."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from fleetcache.errors import ConfigurationError, NotOpenError, SerializationError
from fleetcache.stores import Entry, Key, PostgresStore, SqliteStore, Store

NS = "https://realm.example/"
OTHER_NS = "https://other.example/"


def entry(name: str, *, ns: str = NS, scope: str = "public", user: str = "", **kw: object) -> Entry:
    """An entry with a small default value."""
    fields: dict[str, object] = {"value": {"name": name}, "created_at": 1000}
    fields.update(kw)
    return Entry(key=Key(ns, name, scope, user), **fields)  # type: ignore[arg-type]


async def test_read_missing_is_none(store: Store) -> None:
    """Reading a key that was never written returns None."""
    assert await store.read(Key(NS, "nope")) is None


async def test_write_then_read_round_trips_every_field(store: Store) -> None:
    """An upserted entry reads back with value, deps, error, created_at, alias, diagnostics."""
    written = entry(
        "a.gts",
        value={"x": [1, 2, {"y": "é"}]},
        deps=("https://realm.example/b",),
        error={"message": "boom", "status": 500},
        created_at=123456,
        alias="a",
        diagnostics={"request_id": "r1"},
    )
    assert await store.write(written)
    assert await store.read(Key(NS, "a.gts")) == written


async def test_absent_error_and_diagnostics_read_back_as_none(store: Store) -> None:
    """An entry without error or diagnostics reads back with both None."""
    await store.write(entry("a"))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert got.error is None
    assert got.diagnostics is None


async def test_empty_value_is_stored(store: Store) -> None:
    """An empty dict is a value like any other."""
    await store.write(entry("a", value={}))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert got.value == {}


async def test_read_by_alias(store: Store) -> None:
    """A read of the alias finds the entry stored under its full name."""
    await store.write(entry("a.gts", alias="a"))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert got.key.name == "a.gts"


async def test_exact_name_wins_over_alias(store: Store) -> None:
    """When one entry is named X and another aliased X, the read returns the named one."""
    await store.write(entry("a.gts", alias="a"))
    await store.write(entry("a", value={"bare": True}))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert got.value == {"bare": True}


async def test_scope_user_and_namespace_separate_entries(store: Store) -> None:
    """The same name under another scope, user or namespace is another entry."""
    await store.write(entry("a", value=1))
    await store.write(entry("a", scope="realm-auth", user="u1", value=2))
    await store.write(entry("a", ns=OTHER_NS, value=3))
    assert (await store.read(Key(NS, "a")) or entry("x")).value == 1
    assert (await store.read(Key(NS, "a", "realm-auth", "u1")) or entry("x")).value == 2
    assert await store.read(Key(NS, "a", "realm-auth", "u2")) is None
    assert (await store.read(Key(OTHER_NS, "a")) or entry("x")).value == 3


async def test_upsert_replaces(store: Store) -> None:
    """Writing the same key again replaces the entry, error included."""
    await store.write(entry("a", error={"message": "bad"}))
    await store.write(entry("a", value={"ok": True}))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert got.value == {"ok": True}
    assert got.error is None


async def test_delete_names_by_name_and_alias_across_scopes(store: Store) -> None:
    """Deleting names removes entries named or aliased by them, for every scope and user."""
    await store.write(entry("a.gts", alias="a"))
    await store.write(entry("a.gts", scope="realm-auth", user="u1", alias="a"))
    await store.write(entry("b"))
    await store.write(entry("a.gts", ns=OTHER_NS, alias="a"))
    await store.delete_names(NS, ["a"])
    assert await store.read(Key(NS, "a.gts")) is None
    assert await store.read(Key(NS, "a.gts", "realm-auth", "u1")) is None
    assert await store.read(Key(NS, "b")) is not None
    assert await store.read(Key(OTHER_NS, "a.gts")) is not None


async def test_delete_namespace_and_all(store: Store) -> None:
    """Deleting a namespace keeps the others; deleting all leaves nothing."""
    await store.write(entry("a"))
    await store.write(entry("a", ns=OTHER_NS))
    await store.delete_namespace(NS)
    assert await store.read(Key(NS, "a")) is None
    assert await store.read(Key(OTHER_NS, "a")) is not None
    await store.delete_all()
    assert await store.read(Key(OTHER_NS, "a")) is None


async def test_find_dependents(store: Store) -> None:
    """Dependents are the entries of the namespace whose deps meet the names."""
    await store.write(entry("mid", deps=("leaf",)))
    await store.write(entry("other", deps=("leaf", "x")))
    await store.write(entry("unrelated", deps=("y",)))
    await store.write(entry("foreign", ns=OTHER_NS, deps=("leaf",)))
    assert await store.find_dependents(NS, ["leaf"]) == ["mid", "other"]
    assert await store.find_dependents(NS, ["x", "y"]) == ["other", "unrelated"]
    assert await store.find_dependents(NS, []) == []


async def test_stamped_write_succeeds_when_nothing_moved(store: Store) -> None:
    """A write with an unchanged stamp is stored."""
    stamp = await store.stamp(NS, ["a"])
    assert await store.write(entry("a"), stamp=stamp)
    assert await store.read(Key(NS, "a")) is not None


@pytest.mark.parametrize("invalidation", ["name", "alias", "namespace", "all"])
async def test_stamped_write_refused_after_invalidation(store: Store, invalidation: str) -> None:
    """A write whose stamp predates an invalidation of its name, alias, namespace or the
    whole cache is refused and stores nothing."""
    stamp = await store.stamp(NS, ["a.gts", "a"])
    if invalidation == "name":
        await store.delete_names(NS, ["a.gts"])
    elif invalidation == "alias":
        await store.delete_names(NS, ["a"])
    elif invalidation == "namespace":
        await store.delete_namespace(NS)
    else:
        await store.delete_all()
    assert not await store.write(entry("a.gts", alias="a"), stamp=stamp)
    assert await store.read(Key(NS, "a.gts")) is None


async def test_stamped_write_refused_after_one_of_its_deps_was_invalidated(store: Store) -> None:
    """A write whose entry depends on a name invalidated after its stamp is refused, even
    though the entry's own names were never invalidated; stamped afterwards, it lands."""
    stamp = await store.stamp(NS, ["m"])
    await store.delete_names(NS, ["d"])
    assert not await store.write(entry("m", deps=("d",)), stamp=stamp)
    assert await store.read(Key(NS, "m")) is None
    fresh = await store.stamp(NS, ["m"])
    assert await store.write(entry("m", deps=("d",)), stamp=fresh)


async def test_unrelated_invalidation_does_not_refuse(store: Store) -> None:
    """Invalidating another name or namespace leaves a stamped write free to persist."""
    stamp = await store.stamp(NS, ["a"])
    await store.delete_names(NS, ["b"])
    await store.delete_namespace(OTHER_NS)
    assert await store.write(entry("a"), stamp=stamp)


async def test_stamp_moves_with_each_bump(store: Store) -> None:
    """Each relevant invalidation moves the stamp; a fresh stamp then writes again."""
    first = await store.stamp(NS, ["a"])
    await store.delete_names(NS, ["a"])
    second = await store.stamp(NS, ["a"])
    assert second != first
    assert await store.write(entry("a"), stamp=second)


async def test_non_json_value_raises_and_stores_nothing(store: Store) -> None:
    """A value that is not JSON-serialisable raises SerializationError and stores nothing."""
    with pytest.raises(SerializationError, match="not JSON-serialisable"):
        await store.write(entry("a", value={"when": object()}))
    with pytest.raises(SerializationError):
        await store.write(entry("a", value=float("nan")))
    assert await store.read(Key(NS, "a")) is None


async def test_open_and_close_are_idempotent(store: Store) -> None:
    """Opening an open store and closing twice are harmless."""
    await store.open()
    await store.write(entry("a"))
    await store.close()
    await store.close()
    await store.open()


async def test_sqlite_used_before_open_raises(tmp_path: Path) -> None:
    """A sqlite store used before open() says so."""
    with pytest.raises(NotOpenError):
        await SqliteStore(tmp_path / "x.db").read(Key(NS, "a"))


async def test_sqlite_file_is_shared_between_store_objects(tmp_path: Path) -> None:
    """Two store objects on one sqlite file see each other's rows and invalidations."""
    first, second = SqliteStore(tmp_path / "c.db"), SqliteStore(tmp_path / "c.db")
    await first.open()
    await second.open()
    try:
        stamp = await first.stamp(NS, ["a"])
        await second.write(entry("a"))
        assert await first.read(Key(NS, "a")) is not None
        await second.delete_names(NS, ["a"])
        assert not await first.write(entry("a"), stamp=stamp)
    finally:
        await first.close()
        await second.close()


async def test_postgres_needs_exactly_one_of_conninfo_or_pool() -> None:
    """The Postgres store refuses neither or both of conninfo and pool."""
    with pytest.raises(ConfigurationError):
        PostgresStore()


async def test_postgres_injected_pool_is_not_closed(database_url: str) -> None:
    """Closing a store built on the caller's pool leaves that pool open."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[object]] = AsyncConnectionPool(
        database_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await pool.open()
    try:
        store = PostgresStore(pool=pool)
        await store.open()
        await store.write(entry("a"))
        await store.close()
        assert not pool.closed
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM modules")).fetchone()
        assert row == (1,)
    finally:
        await pool.close()


async def test_postgres_schema_is_idempotent_and_versioned(database_url: str) -> None:
    """Opening twice keeps the schema; absent error/diagnostics are SQL NULL, not JSON null."""
    for _ in range(2):
        store = PostgresStore(database_url)
        await store.open()
        await store.write(entry("a"))
        await store.close()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        version = await (await conn.execute("SELECT version FROM fleetcache_schema")).fetchall()
        nulls = await (
            await conn.execute(
                "SELECT error_doc IS NULL, diagnostics IS NULL FROM modules WHERE url = 'a'"
            )
        ).fetchone()
    assert version == [(1,)]
    assert nulls == (True, True)


async def test_postgres_driver_errors_are_translated(database_url: str) -> None:
    """A failing statement surfaces as StoreError, never as a psycopg exception."""
    from fleetcache.errors import StoreError

    store = PostgresStore(database_url)
    await store.open()
    try:
        async with store.pool.connection() as conn:
            await conn.execute("DROP TABLE modules")
        with pytest.raises(StoreError, match="reading"):
            await store.read(Key(NS, "a"))
    finally:
        await store.close()


async def test_postgres_newer_schema_is_refused_without_leaking_the_pool(database_url: str) -> None:
    """A database holding a newer schema version is refused with SchemaVersionError, and
    the pool the store opened for it is closed again."""
    from fleetcache.errors import SchemaVersionError

    first = PostgresStore(database_url)
    await first.open()
    await first.close()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await admin.execute("UPDATE fleetcache_schema SET version = 99")
        store = PostgresStore(database_url, min_size=2)
        with pytest.raises(SchemaVersionError, match="version is 99"):
            await store.open()
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
    assert others == 0


async def test_postgres_invalidation_retries_after_a_deadlock(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalidation that Postgres aborts as a deadlock (two invalidations reaching the
    same rows in opposite orders) is tried again, and succeeds."""
    from contextlib import asynccontextmanager

    from fleetcache.errors import StoreError

    store = PostgresStore(database_url)
    await store.open()
    try:
        await store.write(entry("a"))
        real = store._transaction
        aborted: list[str] = []

        @asynccontextmanager
        async def first_deadlocks(what: str, session: object | None = None):  # type: ignore[no-untyped-def]
            if not aborted:
                aborted.append(what)
                raise StoreError(f"{what} failed") from psycopg.errors.DeadlockDetected()
            async with real(what, session) as conn:
                yield conn

        monkeypatch.setattr(store, "_transaction", first_deadlocks)
        await store.delete_names(NS, ["a"])
        assert aborted == [f"invalidating names in {NS!r}"]
        assert await store.read(Key(NS, "a")) is None
    finally:
        await store.close()
