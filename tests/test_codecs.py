"""Value codecs: JSON (the default), pickle (opt-in: a process unpickles only when it opted
in), zlib above a size; every row is decoded by its own codec's name, so rows of either
codec, compressed or not, are read side by side."""

from __future__ import annotations

import datetime
import pickle
import re
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import fleetcache
from fleetcache import Key, Produced, ValueCodec
from fleetcache.errors import ConfigurationError, SerializationError, StoreError
from fleetcache.stores.base import Entry, Store
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore

NS = "https://realm.example/"
PICKLE = ValueCodec("pickle")
JSON = ValueCodec()
#: Values JSON cannot carry as they are (a tuple, a set, a Decimal, a datetime, bytes, a
#: dict with int keys): pickle gives each back equal and of its own type.
PYTHON_VALUES: list[Any] = [
    (1, "two", 3.0),
    {1, 2, 3},
    Decimal("1.10"),
    datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    b"\x00\xff",
    {1: "int key", (2, 3): "tuple key"},
]


class Unpicklable:
    """A value pickle refuses."""

    def __getstate__(self) -> Any:
        raise pickle.PicklingError("no")


def make_store(kind: str, where: str, values: ValueCodec) -> Store:
    """An unopened store of ``kind`` at ``where`` (a sqlite path or a Postgres URL)."""
    if kind == "sqlite":
        return SqliteStore(Path(where), values=values)
    return PostgresStore(where, max_size=2, values=values)


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """A shared place of each kind for several stores: (kind, path or URL)."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "shared.db")
    return "postgres", str(request.getfixturevalue("database_url"))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def pickle_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open store of each kind whose codec is pickle."""
    kind: str = request.param
    store: Store = (
        MemoryStore(values=PICKLE)
        if kind == "memory"
        else make_store(
            kind,
            str(tmp_path / "c.db") if kind == "sqlite" else request.getfixturevalue("database_url"),
            PICKLE,
        )
    )
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def read_row(kind: str, where: str) -> tuple[bytes, str]:
    """The one entry row's value bytes and codec name, as the database holds them."""
    if kind == "sqlite":
        conn = sqlite3.connect(where)
        try:
            row = conn.execute("SELECT value, codec FROM fleetcache_entries").fetchone()
        finally:
            conn.close()
        return bytes(row[0]), row[1]
    async with await psycopg.AsyncConnection.connect(where) as conn:
        cursor = await conn.execute("SELECT value, codec FROM fleetcache_entries")
        found = await cursor.fetchone()
    assert found is not None
    return bytes(found[0]), found[1]


async def test_pickle_gives_python_values_back_exactly(pickle_store: Store) -> None:
    """With the pickle codec every store gives back each value equal and of its own type,
    and no read shares a mutable value with the store or another read."""
    for i, value in enumerate(PYTHON_VALUES):
        await pickle_store.write(Entry(Key(NS, f"v{i}"), value))
        read = await pickle_store.read(Key(NS, f"v{i}"))
        assert read is not None
        assert read.value == value
        assert type(read.value) is type(value)
    await pickle_store.write(Entry(Key(NS, "m"), {"list": [1]}))
    first = await pickle_store.read(Key(NS, "m"))
    assert first is not None
    first.value["list"].append(2)
    again = await pickle_store.read(Key(NS, "m"))
    assert again is not None
    assert again.value == {"list": [1]}


async def test_a_value_pickle_refuses_is_a_serialization_error_from_pickles_own(
    pickle_store: Store,
) -> None:
    """A value pickle refuses raises SerializationError naming the key, caused by pickle's
    own error, and nothing is written."""
    with pytest.raises(SerializationError, match="cannot be pickled") as info:
        await pickle_store.write(Entry(Key(NS, "u"), Unpicklable()))
    assert isinstance(info.value.__cause__, pickle.PickleError)
    assert Key(NS, "u").coalesce_key in str(info.value)
    assert await pickle_store.read(Key(NS, "u")) is None


async def test_rows_decode_by_their_own_codec_mid_migration(where: tuple[str, str]) -> None:
    """A fleet moving from json to pickle: a pickle process reads the json rows; a json
    process refuses a pickle row with StoreError naming the key (it never unpickles); with
    unpickle=True a json process reads both, and still writes json."""
    kind, place = where
    old = make_store(kind, place, JSON)
    new = make_store(kind, place, PICKLE)
    migrating = make_store(kind, place, ValueCodec(unpickle=True))
    for store in (old, new, migrating):
        await store.open()
    try:
        await old.write(Entry(Key(NS, "from-json"), {"b": 1, "a": [1.0]}))
        await new.write(Entry(Key(NS, "from-pickle"), (1, 2)))
        read = await new.read(Key(NS, "from-json"))
        assert read is not None
        assert read.value == {"b": 1, "a": [1.0]}
        with pytest.raises(StoreError, match="does not unpickle") as info:
            await old.read(Key(NS, "from-pickle"))
        assert Key(NS, "from-pickle").coalesce_key in str(info.value)
        both = [await migrating.read(Key(NS, name)) for name in ("from-json", "from-pickle")]
        assert [entry.value for entry in both if entry is not None] == [
            {"b": 1, "a": [1.0]},
            (1, 2),
        ]
        await migrating.write(Entry(Key(NS, "from-json"), {"c": 2}))
        assert await old.read(Key(NS, "from-json")) == Entry(Key(NS, "from-json"), {"c": 2})
    finally:
        for store in (old, new, migrating):
            await store.close()


async def test_compression_above_the_threshold_and_rows_read_either_way(
    where: tuple[str, str],
) -> None:
    """With compress_above, a larger value is stored zlib-compressed (codec 'json+zlib',
    fewer bytes) and a smaller one as it is; a store that does not compress reads the
    compressed row, and a compressing one reads plain rows: each row by its own codec."""
    kind, place = where
    compressing = make_store(kind, place, ValueCodec(compress_above=100))
    plain = make_store(kind, place, JSON)
    big = {"rows": ["the same text, again and again"] * 50, "z": 1, "a": -0.0}
    for store in (compressing, plain):
        await store.open()
    try:
        await compressing.write(Entry(Key(NS, "big"), big))
        data, codec = await read_row(kind, place)
        assert codec == "json+zlib"
        assert len(data) < len(fleetcache.ValueCodec().dumps(big)) / 4
        for store in (compressing, plain):
            read = await store.read(Key(NS, "big"))
            assert read is not None
            assert read.value == big
            assert list(read.value) == ["rows", "z", "a"]  # key order kept
        await plain.write(Entry(Key(NS, "big"), big))
        assert (await read_row(kind, place))[1] == "json"
        read = await compressing.read(Key(NS, "big"))
        assert read is not None
        assert read.value == big
        await compressing.write(Entry(Key(NS, "big"), {"small": 1}))
        assert await read_row(kind, place) == (b'{"small":1}', "json")
    finally:
        for store in (compressing, plain):
            await store.close()


async def test_pickle_and_zlib_together(tmp_path: Path) -> None:
    """pickle with compression stores 'pickle+zlib' and reads it back exactly."""
    store = SqliteStore(tmp_path / "c.db", values=ValueCodec("pickle", compress_above=10))
    await store.open()
    try:
        value = [(i, "x" * 20) for i in range(50)]
        await store.write(Entry(Key(NS, "pz"), value))
        assert (await read_row("sqlite", str(tmp_path / "c.db")))[1] == "pickle+zlib"
        read = await store.read(Key(NS, "pz"))
        assert read is not None
        assert read.value == value
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("codec", "data", "says"),
    [
        ("msgpack", b"\x81", "has codec 'msgpack', which this release cannot decode"),
        ("json+lz4", b"{}", "has codec 'json+lz4', which this release cannot decode"),
        ("json+zlib", b"not zlib", "is not 'json+zlib' data"),
        ("pickle", b"\x80\x04not a pickle", "is not 'pickle' data"),
    ],
)
async def test_unknown_or_broken_rows_are_store_errors(
    tmp_path: Path, codec: str, data: bytes, says: str
) -> None:
    """A row of an unknown codec (a newer writer's) or whose bytes do not decode is a
    StoreError naming the key and the codec, for a process that unpickles too."""
    path = tmp_path / "c.db"
    store = SqliteStore(path, values=PICKLE)
    await store.open()
    try:
        await store.write(Entry(Key(NS, "x"), 1))
        conn = sqlite3.connect(path)
        conn.execute("UPDATE fleetcache_entries SET codec = ?, value = ?", (codec, data))
        conn.commit()
        conn.close()
        with pytest.raises(StoreError, match=re.escape(says)) as info:
            await store.read(Key(NS, "x"))
        assert Key(NS, "x").coalesce_key in str(info.value)
    finally:
        await store.close()


@pytest.mark.parametrize(
    "options",
    [
        {"serializer": "yaml"},
        {"compress_above": -1},
        {"compress_above": True},
        {"compress_above": 1.5},
        {"unpickle": "yes"},
    ],
)
def test_bad_codec_options_are_configuration_errors(options: dict[str, Any]) -> None:
    """A serializer other than json or pickle, a compression threshold that is not a
    non-negative int, or an unpickle that is not a bool is refused when made."""
    with pytest.raises(ConfigurationError):
        ValueCodec(**options)


async def test_open_with_pickle_values_through_the_near_tier(database_url: str) -> None:
    """fleetcache.open(values=ValueCodec("pickle"), near=...): a computed Python value comes
    back exactly on the miss, on a near hit and on a store hit, and each near hit is a
    fresh copy."""
    value = {"when": datetime.datetime(2026, 5, 1, tzinfo=datetime.UTC), "pair": (1, 2)}

    async def produce(key: Key) -> Produced[Any]:
        return Produced({**value, "rows": [1]})

    async with fleetcache.open(database_url, values=PICKLE, near=10) as cache:
        missed = await cache.get_value(Key(NS, "p"), produce)
        near_hit = await cache.get_value(Key(NS, "p"), produce)
        assert missed == near_hit == {**value, "rows": [1]}
        assert type(near_hit["pair"]) is tuple
        near_hit["rows"].append(2)
        assert (await cache.get_value(Key(NS, "p"), produce))["rows"] == [1]
        assert cache.lookup.stats()["near_hits"] == 2
    async with fleetcache.open(database_url, values=PICKLE) as fresh:
        assert await fresh.get_value(Key(NS, "p"), produce) == {**value, "rows": [1]}
        assert fresh.lookup.stats()["hits"] == 1


async def test_open_refuses_values_that_are_not_a_value_codec() -> None:
    """fleetcache.open(values="pickle") is a ConfigurationError (a ValueCodec is needed)."""
    with pytest.raises(ConfigurationError, match="ValueCodec"):
        await fleetcache.open("memory://", values="pickle")  # type: ignore[arg-type]
