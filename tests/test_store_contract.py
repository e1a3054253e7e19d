"""The store contract (v2): every test runs against memory, sqlite and Postgres."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from fleetcache.errors import (
    ConfigurationError,
    InvalidInputError,
    NotOpenError,
    SerializationError,
    StoreError,
)
from fleetcache.stores.base import Entry, GenerationStamp, Key, Store
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.migrations import LATEST
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore
from fleetcache.stores.validation import MAX_JSON_DEPTH

NS = "https://realm.example/"
OTHER_NS = "https://other.example/"


def entry(name: str, *, ns: str = NS, scope: str = "public", user: str = "", **kw: Any) -> Entry:
    """An entry with a small default value."""
    fields: dict[str, Any] = {"value": {"name": name}, "created_at": 1000}
    fields.update(kw)
    return Entry(key=Key(ns, name, scope, user), **fields)


async def stamp(store: Store, name: str, *names: str, ns: str = NS) -> GenerationStamp:
    """A stamp for a populate of ``name`` (and ``names``)."""
    taken, _ = await store.stamp_and_read(Key(ns, name), [name, *names])
    return taken


def kind_of(store: Store) -> str:
    """Which backend ``store`` is."""
    return {MemoryStore: "memory", SqliteStore: "sqlite", PostgresStore: "postgres"}[type(store)]


MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture
async def make_store(
    store: Store, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStore]:
    """Opens more stores of the same kind as ``store`` on the same data (memory: a new
    one), with other options; closes them after the test."""
    made: list[Store] = []

    async def make(**options: Any) -> Store:
        kind = kind_of(store)
        new: Store
        if kind == "memory":
            new = MemoryStore(**options)
        elif kind == "sqlite":
            new = SqliteStore(tmp_path / "cache.sqlite3", **options)
        else:
            new = PostgresStore(request.getfixturevalue("database_url"), max_size=2, **options)
        await new.open()
        made.append(new)
        return new

    yield make
    for opened in made:
        await opened.close()


# ------------------------------------------------------------------------- reads and writes


async def test_read_missing_is_none(store: Store) -> None:
    """Reading a key that was never written returns None, with or without the alias."""
    assert await store.read(Key(NS, "nope")) is None
    assert await store.read(Key(NS, "nope"), by_alias=True) is None


async def test_write_then_read_round_trips_every_field(store: Store) -> None:
    """An upserted entry reads back with value, deps, error, created_at, alias, diagnostics."""
    written = entry(
        "a.gts",
        value={"x": [1, 2.5, {"y": "é", "z": None, "t": True}]},
        deps=("https://realm.example/b", "https://realm.example/c"),
        error={"message": "boom", "status": 500},
        created_at=123456,
        alias="a",
        diagnostics={"request_id": "r1"},
    )
    assert await store.write(written)
    assert await store.read(Key(NS, "a.gts")) == written
    assert await store.read(Key(NS, "a.gts"), by_alias=True) == written


async def test_absent_error_and_diagnostics_read_back_as_none(store: Store) -> None:
    """An entry without error, diagnostics, alias or created_at reads back with all None."""
    await store.write(entry("a", created_at=None))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert (got.error, got.diagnostics, got.alias, got.created_at) == (None, None, None, None)


@pytest.mark.parametrize("value", [{}, [], "", 0, None, False])
async def test_empty_values_are_stored(store: Store, value: Any) -> None:
    """Empty and falsy JSON values are values like any other."""
    await store.write(entry("a", value=value))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert got.value == value
    assert type(got.value) is type(value)


async def test_tuples_come_back_as_lists(store: Store) -> None:
    """A tuple inside a value is stored as a JSON array and reads back as a list."""
    await store.write(entry("a", value={"t": (1, 2)}))
    got = await store.read(Key(NS, "a"))
    assert got is not None
    assert got.value == {"t": [1, 2]}


async def test_values_are_not_shared_with_the_caller(store: Store) -> None:
    """Mutating a written or a read value changes nothing stored."""
    value: dict[str, Any] = {"list": [1]}
    await store.write(entry("a", value=value))
    value["list"].append(2)
    got = await store.read(Key(NS, "a"))
    assert got is not None
    got.value["list"].append(3)
    again = await store.read(Key(NS, "a"))
    assert again is not None
    assert again.value == {"list": [1]}


async def test_read_by_alias(store: Store) -> None:
    """With by_alias, a read of the alias finds the entry stored under its full name; a
    plain read of the alias does not."""
    await store.write(entry("a.gts", alias="a"))
    got = await store.read(Key(NS, "a"), by_alias=True)
    assert got is not None
    assert got.key == Key(NS, "a.gts")
    assert await store.read(Key(NS, "a")) is None


async def test_exact_name_wins_over_alias(store: Store) -> None:
    """When one entry is named X and another aliased X, the read returns the named one,
    whichever was written first."""
    await store.write(entry("a.gts", alias="a", created_at=2000))
    await store.write(entry("a", value={"bare": True}, created_at=1000))
    await store.write(entry("a.ts", alias="a", created_at=3000))
    got = await store.read(Key(NS, "a"), by_alias=True)
    assert got is not None
    assert got.value == {"bare": True}


async def test_alias_read_returns_the_most_recently_created(store: Store) -> None:
    """Among entries sharing an alias, the alias read returns the one created last."""
    await store.write(entry("a.ts", alias="a", created_at=2000))
    await store.write(entry("a.gts", alias="a", created_at=3000))
    await store.write(entry("a.js", alias="a", created_at=1000))
    got = await store.read(Key(NS, "a"), by_alias=True)
    assert got is not None
    assert got.key.name == "a.gts"


async def test_alias_reads_stay_within_scope_user_and_namespace(store: Store) -> None:
    """An alias is only found under its own namespace, scope and user."""
    await store.write(entry("a.gts", scope="realm-auth", user="u1", alias="a"))
    assert await store.read(Key(NS, "a", "realm-auth", "u1"), by_alias=True) is not None
    assert await store.read(Key(NS, "a", "realm-auth", "u2"), by_alias=True) is None
    assert await store.read(Key(NS, "a", "public", "u1"), by_alias=True) is None
    assert await store.read(Key(OTHER_NS, "a", "realm-auth", "u1"), by_alias=True) is None


async def test_scope_user_and_namespace_separate_entries(store: Store) -> None:
    """The same name under another scope, user or namespace is another entry."""
    await store.write(entry("a", value=1))
    await store.write(entry("a", scope="realm-auth", user="u1", value=2))
    await store.write(entry("a", ns=OTHER_NS, value=3))
    assert (await store.read(Key(NS, "a")) or entry("x")).value == 1
    assert (await store.read(Key(NS, "a", "realm-auth", "u1")) or entry("x")).value == 2
    assert await store.read(Key(NS, "a", "realm-auth", "u2")) is None
    assert (await store.read(Key(OTHER_NS, "a")) or entry("x")).value == 3


async def test_upsert_replaces_every_field(store: Store) -> None:
    """Writing the same key again replaces the entry, error, alias and deps included."""
    await store.write(entry("a", error={"message": "bad"}, alias="x", deps=("d",)))
    await store.write(entry("a", value={"ok": True}))
    got = await store.read(Key(NS, "a"))
    assert got == entry("a", value={"ok": True})
    assert await store.read(Key(NS, "x"), by_alias=True) is None
    assert await store.invalidate(NS, ["d"]) == ["d"]
    assert await store.read(Key(NS, "a")) is not None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (Key("https://r/a|b", "c"), Key("https://r/a", "b|c")),
        (Key("n", "a", "s|u", ""), Key("n", "a", "s", "|u")),
        (Key("1:a", "b"), Key("1", ":ab")),
        (Key("ns", "2:ab"), Key("ns", "2:a", "b")),
        (Key("ns", "x", "3:abc", ""), Key("ns", "x", "3:ab", "c")),
        (Key("é", "x"), Key("e", "x")),
        (Key("ns", "😀"), Key("ns", "😀", "")),
        (Key("ns", "a", "", "b"), Key("ns", "a", "b", "")),
        (Key("ns:", "a"), Key("ns", ":a")),
    ],
)
async def test_keys_that_differ_only_in_how_fields_split_never_share_a_row(
    store: Store, first: Key, second: Key
) -> None:
    """Separators, digits-colon prefixes and non-ASCII in any field never make two keys
    one: each reads back its own value, and invalidating one leaves the other."""
    await store.write(Entry(first, {"who": "first"}))
    await store.write(Entry(second, {"who": "second"}))
    assert (await store.read(first) or Entry(first, None)).value == {"who": "first"}
    assert (await store.read(second) or Entry(second, None)).value == {"who": "second"}
    if first.namespace != second.namespace or first.name != second.name:
        await store.invalidate(first.namespace, [first.name])
        assert await store.read(first) is None
        assert await store.read(second) is not None


# -------------------------------------------------------------------------- invalidation


async def test_invalidate_deletes_by_name_and_alias_across_scopes(store: Store) -> None:
    """Invalidating names removes entries named or aliased by them, for every scope and
    user, and only in that namespace."""
    await store.write(entry("a.gts", alias="a"))
    await store.write(entry("a.gts", scope="realm-auth", user="u1", alias="a"))
    await store.write(entry("a", scope="realm-auth", user="u2"))
    await store.write(entry("b"))
    await store.write(entry("a.gts", ns=OTHER_NS, alias="a"))
    names = await store.invalidate(NS, ["a"])
    assert names == ["a", "a.gts"]
    assert await store.read(Key(NS, "a.gts")) is None
    assert await store.read(Key(NS, "a.gts", "realm-auth", "u1")) is None
    assert await store.read(Key(NS, "a", "realm-auth", "u2")) is None
    assert await store.read(Key(NS, "b")) is not None
    assert await store.read(Key(OTHER_NS, "a.gts")) is not None


async def test_invalidate_follows_dependents_transitively(store: Store) -> None:
    """Dependents of dependents go too (all scopes), with their aliases; entries of other
    namespaces and unrelated entries stay; the given names come first, each once."""
    await store.write(entry("leaf.gts", alias="leaf"))
    await store.write(entry("mid.gts", alias="mid", deps=("leaf",)))
    await store.write(entry("top", scope="realm-auth", user="u", deps=("mid.gts",)))
    await store.write(entry("side", deps=("other",)))
    await store.write(entry("foreign", ns=OTHER_NS, deps=("leaf",)))
    names = await store.invalidate(NS, ["leaf.gts", "leaf.gts"])
    assert names[0] == "leaf.gts"
    assert sorted(names) == ["leaf", "leaf.gts", "mid", "mid.gts", "top"]
    for name in ("leaf.gts", "mid.gts"):
        assert await store.read(Key(NS, name)) is None
    assert await store.read(Key(NS, "top", "realm-auth", "u")) is None
    assert await store.read(Key(NS, "side")) is not None
    assert await store.read(Key(OTHER_NS, "foreign")) is not None


async def test_invalidate_expands_every_name_it_reaches(store: Store) -> None:
    """``expand`` turns each given or found name into its variants: an entry depending on
    a variant of an invalidated name goes, and every variant is marked."""

    def expand(name: str) -> Iterable[str]:
        base = name.removesuffix(".gts")
        return (base, base + ".gts")

    await store.write(entry("user", deps=("card.gts",)))
    await store.write(entry("page", deps=("user.gts",)))
    await store.write(entry("other"))
    before = await stamp(store, "x", "card.gts")
    names = await store.invalidate(NS, ["card"], expand=expand)
    assert names[0] == "card"
    assert set(names) == {"card", "card.gts", "user", "user.gts", "page", "page.gts"}
    assert await store.read(Key(NS, "user")) is None
    assert await store.read(Key(NS, "page")) is None
    assert await store.read(Key(NS, "other")) is not None
    assert not await store.write(entry("x"), stamp=before)


async def test_invalidate_nothing_is_a_no_op(store: Store) -> None:
    """Invalidating no names returns [] and refuses nothing."""
    before = await stamp(store, "a")
    assert await store.invalidate(NS, []) == []
    assert await store.write(entry("a"), stamp=before)


async def test_clear_namespace_and_all(store: Store) -> None:
    """Clearing a namespace keeps the others; clearing all leaves nothing."""
    await store.write(entry("a"))
    await store.write(entry("a", ns=OTHER_NS))
    await store.clear_namespace(NS)
    assert await store.read(Key(NS, "a")) is None
    assert await store.read(Key(OTHER_NS, "a")) is not None
    await store.clear_all()
    assert await store.read(Key(OTHER_NS, "a")) is None


async def test_a_cleared_namespace_can_be_filled_again(store: Store) -> None:
    """After a clear, stamped writes taken afterwards land, in that namespace and others."""
    await store.clear_namespace(NS)
    await store.clear_all()
    assert await store.write(entry("a"), stamp=await stamp(store, "a"))
    assert await store.write(entry("a", ns=OTHER_NS), stamp=await stamp(store, "a", ns=OTHER_NS))


# ------------------------------------------------------------------------ stamped writes


async def test_stamp_and_read_reads_like_read(store: Store) -> None:
    """stamp_and_read returns what read returns (exact, by alias), beside a stamp for the
    given names of the key's namespace."""
    await store.write(entry("a.gts", alias="a"))
    taken, got = await store.stamp_and_read(Key(NS, "a"), ["a", "a.gts", "a"], by_alias=True)
    assert got == await store.read(Key(NS, "a"), by_alias=True)
    assert taken.namespace == NS
    assert taken.names == ("a", "a.gts")
    _, missing = await store.stamp_and_read(Key(NS, "a"), ["a"])
    assert missing is None


async def test_stamped_write_succeeds_when_nothing_moved(store: Store) -> None:
    """A write with an unchanged stamp is stored."""
    assert await store.write(entry("a"), stamp=await stamp(store, "a"))
    assert await store.read(Key(NS, "a")) is not None


@pytest.mark.parametrize("invalidation", ["name", "alias", "namespace", "all"])
async def test_stamped_write_refused_after_invalidation(store: Store, invalidation: str) -> None:
    """A write whose stamp predates an invalidation of its name, alias, namespace or the
    whole store is refused and stores nothing."""
    before = await stamp(store, "a.gts", "a")
    if invalidation == "name":
        await store.invalidate(NS, ["a.gts"])
    elif invalidation == "alias":
        await store.invalidate(NS, ["a"])
    elif invalidation == "namespace":
        await store.clear_namespace(NS)
    else:
        await store.clear_all()
    assert not await store.write(entry("a.gts", alias="a"), stamp=before)
    assert await store.read(Key(NS, "a.gts")) is None


async def test_stamped_write_refused_when_its_alias_was_invalidated(store: Store) -> None:
    """The entry's alias guards the write even when the stamp did not name it."""
    before = await stamp(store, "a.gts")
    await store.invalidate(NS, ["a"])
    assert not await store.write(entry("a.gts", alias="a"), stamp=before)


async def test_stamped_write_refused_after_one_of_its_deps_was_invalidated(store: Store) -> None:
    """A write whose entry depends on a name invalidated after its stamp is refused, even
    though the entry's own names were never invalidated; stamped afterwards, it lands."""
    before = await stamp(store, "m")
    await store.invalidate(NS, ["d"])
    assert not await store.write(entry("m", deps=("d",)), stamp=before)
    assert await store.read(Key(NS, "m")) is None
    assert await store.write(entry("m", deps=("d",)), stamp=await stamp(store, "m"))


async def test_stamped_write_refused_after_a_transitive_dependency_was_invalidated(
    store: Store,
) -> None:
    """Invalidating a leaf marks its stored dependents too, so a write depending only on a
    dependent (stamped before) is refused."""
    await store.write(entry("mid", deps=("leaf",)))
    before = await stamp(store, "top")
    await store.invalidate(NS, ["leaf"])
    assert not await store.write(entry("top", deps=("mid",)), stamp=before)


async def test_unrelated_invalidation_does_not_refuse(store: Store) -> None:
    """Invalidating another name or clearing another namespace leaves a stamped write free."""
    before = await stamp(store, "a")
    await store.invalidate(NS, ["b"])
    await store.invalidate(OTHER_NS, ["a"])
    await store.clear_namespace(OTHER_NS)
    assert await store.write(entry("a", deps=("c",)), stamp=before)


async def test_a_fresh_stamp_writes_again_after_each_invalidation(store: Store) -> None:
    """Each relevant invalidation moves the stamp; a fresh stamp then writes again."""
    first = await stamp(store, "a")
    await store.invalidate(NS, ["a"])
    second = await stamp(store, "a")
    assert second != first
    assert not await store.write(entry("a"), stamp=first)
    assert await store.write(entry("a"), stamp=second)


async def test_a_stamp_older_than_half_the_retention_is_refused(
    store: Store, make_store: MakeStore
) -> None:
    """A write whose stamp is older than the maximum stamp age is refused though nothing
    was invalidated; a fresh stamp writes."""
    import asyncio

    short = await make_store(mark_retention=0.4)
    old = await stamp(short, "a")
    await asyncio.sleep(0.5)
    assert not await short.write(entry("a"), stamp=old)
    assert await short.read(Key(NS, "a")) is None
    assert await short.write(entry("a"), stamp=await stamp(short, "a"))


async def test_a_stamp_of_another_namespace_or_store_kind_is_refused(store: Store) -> None:
    """A stamp guards only writes of its own namespace, made by the same kind of store."""
    other = await stamp(store, "a", ns=OTHER_NS)
    with pytest.raises(InvalidInputError, match="cannot guard"):
        await store.write(entry("a"), stamp=other)
    foreign = GenerationStamp(NS, ("a",), object())
    with pytest.raises(InvalidInputError, match="not made by"):
        await store.write(entry("a"), stamp=foreign)
    assert await store.read(Key(NS, "a")) is None


# ---------------------------------------------------------------------------- bad input

_DEEP: Any = "bottom"
for _ in range(MAX_JSON_DEPTH + 1):
    _DEEP = [_DEEP]
_BIG = "n" * (1024 * 1024)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        pytest.param(entry("a\x00"), InvalidInputError, id="nul-in-name"),
        pytest.param(entry("a", ns="n\x00s"), InvalidInputError, id="nul-in-namespace"),
        pytest.param(entry("a", scope="p\x00"), InvalidInputError, id="nul-in-scope"),
        pytest.param(entry("a", user="u\x00"), InvalidInputError, id="nul-in-user"),
        pytest.param(entry("a", alias="x\x00"), InvalidInputError, id="nul-in-alias"),
        pytest.param(entry("a", deps=("d\x00",)), InvalidInputError, id="nul-in-dep"),
        pytest.param(entry("a", value={"v": "x\x00"}), InvalidInputError, id="nul-in-value"),
        pytest.param(entry("a", value={"k\x00": 1}), InvalidInputError, id="nul-in-dict-key"),
        pytest.param(entry("a", error={"m": "\x00"}), InvalidInputError, id="nul-in-error"),
        pytest.param(entry("a\ud800"), InvalidInputError, id="surrogate-in-name"),
        pytest.param(entry("a", user="\udfff"), InvalidInputError, id="surrogate-in-user"),
        pytest.param(entry("a", value=["\ud800"]), InvalidInputError, id="surrogate-in-value"),
        pytest.param(entry("a", value={"\udc00": 1}), InvalidInputError, id="surrogate-in-key"),
        pytest.param(
            entry("a", diagnostics={"d": "\ud83d"}), InvalidInputError, id="surrogate-in-diag"
        ),
        pytest.param(entry("a", value=_DEEP), InvalidInputError, id="too-deep"),
        pytest.param(entry("a", ns=_BIG), InvalidInputError, id="1mb-namespace"),
        pytest.param(entry(_BIG), InvalidInputError, id="1mb-name"),
        pytest.param(entry("a", deps=(_BIG,)), InvalidInputError, id="1mb-dep"),
        pytest.param(entry(""), InvalidInputError, id="empty-name"),
        pytest.param(entry("a", value={1, 2}), SerializationError, id="set"),
        pytest.param(entry("a", value=float("nan")), SerializationError, id="nan"),
        pytest.param(entry("a", value={"x": float("inf")}), SerializationError, id="inf"),
        pytest.param(entry("a", value={1: "x"}), SerializationError, id="int-dict-key"),
        pytest.param(entry("a", value={"when": object()}), SerializationError, id="object"),
        pytest.param(entry("a", value=b"bytes"), SerializationError, id="bytes"),
    ],
)
async def test_bad_entries_are_refused_before_anything_is_written(
    store: Store, bad: Entry, error: type[Exception]
) -> None:
    """A key or value a store cannot hold raises a typed error, with or without a stamp,
    stores nothing, and leaves the store working."""
    good_key = Key(NS, "a")
    before, _ = await store.stamp_and_read(good_key, ["a"])
    with pytest.raises(error):
        await store.write(bad)
    if bad.key.namespace == NS:
        with pytest.raises(error):
            await store.write(bad, stamp=before)
    assert await store.read(good_key) is None
    assert await store.write(entry("a"), stamp=before)
    assert await store.read(good_key) is not None


@pytest.mark.parametrize(
    "name", ["x\x00", "\ud800", "n" * (1024 * 1024)], ids=["nul", "surrogate", "1mb"]
)
async def test_bad_keys_are_refused_by_every_method(store: Store, name: str) -> None:
    """Reads, stamps, invalidations and clears refuse a key field they could not hold,
    with InvalidInputError, before any I/O."""
    await store.write(entry("a"))
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.read(Key(NS, name)),
        lambda: store.read(Key(name, "a"), by_alias=True),
        lambda: store.read(Key(NS, "a", name)),
        lambda: store.stamp_and_read(Key(NS, name), [name]),
        lambda: store.stamp_and_read(Key(NS, "a"), ["a", name]),
        lambda: store.invalidate(NS, ["a", name]),
        lambda: store.invalidate(name, ["a"]),
        lambda: store.clear_namespace(name),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError):
            await call()
    assert await store.read(Key(NS, "a")) is not None


async def test_a_failing_expand_rolls_the_invalidation_back(store: Store) -> None:
    """An exception raised inside the invalidation's transaction (here by ``expand``, after
    the locks and a first closure round) changes nothing, leaves no transaction open, and
    the store goes on writing and invalidating."""
    await store.write(entry("leaf"))
    await store.write(entry("mid", deps=("leaf",)))
    before = await stamp(store, "x", "leaf")
    calls: list[str] = []

    def failing(name: str) -> Iterable[str]:
        calls.append(name)
        if name == "mid":
            raise RuntimeError("expand broke")
        return (name,)

    with pytest.raises(RuntimeError, match="expand broke"):
        await store.invalidate(NS, ["leaf"], expand=failing)
    assert "mid" in calls  # it failed inside the closure, not before it
    assert await store.read(Key(NS, "leaf")) is not None
    assert await store.read(Key(NS, "mid")) is not None
    assert await store.write(entry("x", deps=("leaf",)), stamp=before)
    await assert_no_transaction_left(store)
    assert sorted(await store.invalidate(NS, ["leaf"])) == ["leaf", "mid", "x"]


async def test_expand_returning_a_bad_name_is_refused_and_rolled_back(store: Store) -> None:
    """A name ``expand`` makes up is input like any other: a NUL in it raises
    InvalidInputError and the invalidation changes nothing."""
    await store.write(entry("a"))
    with pytest.raises(InvalidInputError):
        await store.invalidate(NS, ["a"], expand=lambda name: (name, name + "\x00"))
    assert await store.read(Key(NS, "a")) is not None
    await assert_no_transaction_left(store)


async def assert_no_transaction_left(store: Store) -> None:
    """Nothing of ``store`` holds a transaction: another connection can write at once."""
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store._path, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    elif isinstance(store, PostgresStore):
        async with store.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
                )
            ).fetchone()
            assert row == (0,)
            locks = await (
                await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
            ).fetchone()
            assert locks == (0,)


# ---------------------------------------------------------------------------- lifecycle


async def test_open_and_close_are_idempotent(store: Store) -> None:
    """Opening an open store and closing twice are harmless; reopened, it works."""
    await store.open()
    await store.write(entry("a"))
    await store.close()
    await store.close()
    await store.open()
    await store.open()
    assert await store.read(Key(NS, "a")) is not None or isinstance(store, MemoryStore)


async def test_sqlite_used_before_open_raises(tmp_path: Path) -> None:
    """A sqlite store used before open() says so."""
    with pytest.raises(NotOpenError):
        await SqliteStore(tmp_path / "x.db").read(Key(NS, "a"))


async def test_postgres_used_before_open_raises(database_url: str) -> None:
    """A Postgres store used before open() says so (and its constructor made no I/O)."""
    store = PostgresStore(database_url)
    with pytest.raises(NotOpenError):
        await store.read(Key(NS, "a"))
    with pytest.raises(NotOpenError):
        _ = store.pool


async def test_sqlite_file_is_shared_between_store_objects(tmp_path: Path) -> None:
    """Two store objects on one sqlite file see each other's rows and invalidations."""
    first, second = SqliteStore(tmp_path / "c.db"), SqliteStore(tmp_path / "c.db")
    await first.open()
    await second.open()
    try:
        before = await stamp(first, "a")
        await second.write(entry("a"))
        assert await first.read(Key(NS, "a")) is not None
        await second.invalidate(NS, ["a"])
        assert not await first.write(entry("a"), stamp=before)
    finally:
        await first.close()
        await second.close()


async def test_postgres_needs_exactly_one_of_conninfo_or_pool() -> None:
    """The Postgres store refuses neither or both of conninfo and pool."""
    with pytest.raises(ConfigurationError):
        PostgresStore()


async def test_postgres_injected_pool_is_used_and_left_open(database_url: str) -> None:
    """A store built on the caller's pool creates its schema there, and closing the store
    leaves that pool open."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await pool.open()
    try:
        store = PostgresStore(pool=pool)
        await store.open()
        assert store.pool is pool
        await store.write(entry("a"))
        await store.close()
        await store.close()
        assert not pool.closed
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM fleetcache_entries")).fetchone()
        assert row == (1,)
    finally:
        await pool.close()


async def test_postgres_injected_pool_must_be_autocommit(database_url: str) -> None:
    """A pool whose connections open transactions by themselves is refused with a message
    saying what to pass, and is left open."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        database_url, min_size=1, max_size=1, open=False
    )
    await pool.open()
    try:
        with pytest.raises(ConfigurationError, match="autocommit"):
            await PostgresStore(pool=pool).open()
        assert not pool.closed
    finally:
        await pool.close()


async def test_postgres_schema_is_latest_and_absent_json_is_sql_null(
    empty_database_url: str,
) -> None:
    """Opening twice keeps one schema row (the latest version) and creates no unprefixed table;
    absent error/diagnostics are SQL NULL, not JSON null."""
    database_url = empty_database_url  # the schema is created by these opens, not given
    for _ in range(2):
        store = PostgresStore(database_url, max_size=1)
        await store.open()
        await store.write(entry("a"))
        await store.close()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        version = await (await conn.execute("SELECT version FROM fleetcache_schema")).fetchall()
        nulls = await (
            await conn.execute(
                "SELECT error IS NULL, diagnostics IS NULL FROM fleetcache_entries WHERE name = 'a'"
            )
        ).fetchone()
        tables = await (
            await conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ).fetchall()
    assert version == [(LATEST,)]
    assert nulls == (True, True)
    assert [t for (t,) in tables] == [
        "fleetcache_counts",
        "fleetcache_entries",
        "fleetcache_generations",
        "fleetcache_schema",
    ]


async def test_sqlite_absent_json_is_sql_null(tmp_path: Path) -> None:
    """On sqlite too, absent error/diagnostics are SQL NULL, and the version is the latest."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    await store.write(entry("a"))
    await store.close()
    conn = sqlite3.connect(tmp_path / "c.db")
    try:
        assert conn.execute(
            "SELECT error IS NULL, diagnostics IS NULL FROM fleetcache_entries"
        ).fetchall() == [(1, 1)]
        assert conn.execute("SELECT version FROM fleetcache_schema").fetchall() == [(LATEST,)]
    finally:
        conn.close()


async def test_postgres_driver_errors_are_translated(database_url: str) -> None:
    """A failing statement surfaces as StoreError naming the operation and key, with the
    driver's exception as its cause, for reads, writes and invalidations alike."""
    store = PostgresStore(database_url, max_size=2)
    await store.open()
    try:
        async with store.pool.connection() as conn:
            await conn.execute("DROP TABLE fleetcache_entries")
        with pytest.raises(StoreError, match="reading") as info:
            await store.read(Key(NS, "a"))
        assert isinstance(info.value.__cause__, psycopg.Error)
        with pytest.raises(StoreError, match="stamping and reading"):
            await store.stamp_and_read(Key(NS, "a"), ["a"])
        with pytest.raises(StoreError, match="writing"):
            await store.write(entry("a"))
        with pytest.raises(StoreError, match="invalidating"):
            await store.invalidate(NS, ["a"])
        await assert_no_transaction_left(store)
    finally:
        await store.close()


async def test_sqlite_driver_errors_are_translated(tmp_path: Path) -> None:
    """On sqlite too, a failing statement surfaces as StoreError and leaves no transaction."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    try:
        conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
        conn.execute("DROP TABLE fleetcache_entry_deps")
        conn.close()
        with pytest.raises(StoreError, match="writing"):
            await store.write(entry("a"))
        with pytest.raises(StoreError, match="invalidating"):
            await store.invalidate(NS, ["a"])
        await assert_no_transaction_left(store)
    finally:
        await store.close()


async def test_sqlite_deps_rows_follow_their_entries(tmp_path: Path) -> None:
    """sqlite lists each entry's deps in a table of their own: upserts, invalidations and
    clears leave no deps row without its entry, and every entry's deps are listed."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    try:
        await store.write(entry("a.gts", alias="a", deps=("x", "y", "x")))
        await store.write(entry("a.gts", scope="realm-auth", user="u", alias="a", deps=("x",)))
        await store.write(entry("b", deps=("a",)))
        await store.write(entry("c", deps=("z",)))
        await store.write(entry("c", deps=("w",)))
        await store.write(entry("d", ns=OTHER_NS, deps=("x",)))
        await store.invalidate(NS, ["a"])
        conn = sqlite3.connect(tmp_path / "c.db")
        try:
            listed = conn.execute(
                "SELECT namespace, name, dep FROM fleetcache_entry_deps ORDER BY 1, 2, 3"
            ).fetchall()
            assert listed == [(OTHER_NS, "d", "x"), (NS, "c", "w")]
            await store.clear_namespace(OTHER_NS)
            assert conn.execute("SELECT count(*) FROM fleetcache_entry_deps").fetchone() == (1,)
            await store.clear_all()
            assert conn.execute("SELECT count(*) FROM fleetcache_entry_deps").fetchone() == (0,)
        finally:
            conn.close()
    finally:
        await store.close()
