"""Values, error documents and diagnostics come back exactly as they were written: the same
keys in the same order, the same number forms (``1.0`` is not ``1``, ``-0.0`` is not
``0.0``, ``1e300`` stays a float, a large int stays exact), on every store and through
``fleetcache.open`` — from the same cache object, a fresh one, and a fresh process."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fleetcache
from fleetcache import Key, Produced
from fleetcache.errors import StoreError
from fleetcache.stores.base import Entry, Store
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore

NS = "https://realm.example/"

# Strings a store accepts (no NUL, no lone surrogate), numbers in every form JSON can carry
# for Python (ints of any size a store keeps, every finite float, -0.0 included).
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_NUMBERS = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, 100.0, 1e300, -1e-300, 5e-324, 2**63, -(2**64) - 1]),
)
JSON_DOCUMENTS = st.recursive(
    st.one_of(st.none(), st.booleans(), _NUMBERS, _TEXT),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=5),
    max_leaves=24,
)

#: The issue's example (a module's definitions, in the order the prerenderer produced them:
#: ``jsonb`` would give back type, types, moduleURL, definition{name, note, displayName}),
#: and documents whose text jsonb rewrites.
DEFINITIONS = {
    NS + "card/Card": {
        "moduleURL": NS + "card",
        "definition": {"displayName": "Card", "name": "Card", "note": "é 😀 \u2028"},
        "types": ["card", "field"],
        "type": "definition",
    }
}
DOCUMENTS: list[Any] = [
    DEFINITIONS,
    {"zeta": 1, "a": 2, "mid": {"yy": [], "x": {}}},
    [1, 1.0, -0.0, 0.0, 100.0, 1e300, 1.5e-7, 5e-324, 2**64 + 1, -(10**30), 12345678901234567890],
    {"long key first": True, "k": None, "": "empty key"},
    'a string with "quotes", \\ and \u00e9 and \U0001f600',
    -0.0,
    1e300,
]


def dumps(document: Any) -> str:
    """The text a document's keys, order and number forms show up in."""
    return json.dumps(document, ensure_ascii=False)


def entry_of(name: str, value: Any, error: Any = None, diagnostics: Any = None) -> Entry:
    """An entry of ``NS`` holding the three JSON parts, aliased ``<name>-alias``."""
    return Entry(
        Key(NS, name),
        value,
        deps=("b", "a", "b"),
        error=error,
        created_at=1,
        alias=f"{name}-alias",
        diagnostics=diagnostics,
    )


async def read_every_way(store: Store, written: Entry) -> list[Entry]:
    """The entry read back by each read a store offers: by key, by alias, and in a stamp."""
    key = written.key
    by_key = await store.read(key)
    by_alias = await store.read(Key(NS, f"{key.name}-alias"), by_alias=True)
    _, stamped = await store.stamp_and_read(key, [key.name])
    reads = [by_key, by_alias, stamped]
    assert all(read is not None for read in reads)
    return [read for read in reads if read is not None]


def assert_same_text(read: Entry, written: Entry) -> None:
    """``read`` holds what ``written`` did, down to key order and number forms."""
    assert read == written
    for part in ("value", "error", "diagnostics"):
        assert dumps(getattr(read, part)) == dumps(getattr(written, part)), part
    assert read.deps == written.deps


async def test_documents_come_back_with_their_key_order_and_number_forms(store: Store) -> None:
    """Each document (the issue's definitions, unsorted keys, every number form, escapes)
    written as value, error and diagnostics reads back with identical JSON text, by key, by
    alias and with a stamp."""
    for i, document in enumerate(DOCUMENTS):
        written = entry_of(f"doc-{i}", document, error=document, diagnostics=document)
        assert await store.write(written)
        for read in await read_every_way(store, written):
            assert_same_text(read, written)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=JSON_DOCUMENTS, error=JSON_DOCUMENTS, diagnostics=JSON_DOCUMENTS)
async def test_any_json_reads_back_as_the_same_text(
    store: Store, value: Any, error: Any, diagnostics: Any
) -> None:
    """For any JSON value, error document and diagnostics (arbitrary key orders, number
    forms and strings), write then read returns an equal entry whose parts dump to the
    identical JSON text."""
    written = entry_of("prop", value, error=error, diagnostics=diagnostics)
    assert await store.write(written)
    for read in await read_every_way(store, written):
        assert_same_text(read, written)


async def test_no_caller_shares_a_mutable_value_with_the_store(store: Store) -> None:
    """Changing the written value afterwards, or a value a read returned, changes nothing
    the next read returns."""
    value: dict[str, Any] = {"b": [1, 2], "a": {"x": 1.0}}
    diagnostics: dict[str, Any] = {"ms": [1]}
    await store.write(entry_of("m", value, diagnostics=diagnostics))
    value["b"].append(3)
    value["new"] = 1
    diagnostics["ms"].append(2)
    first = await store.read(Key(NS, "m"))
    assert first is not None
    first.value["a"]["x"] = 2.0
    assert first.diagnostics is not None
    first.diagnostics["ms"].clear()
    again = await store.read(Key(NS, "m"))
    assert again is not None
    assert dumps(again.value) == '{"b": [1, 2], "a": {"x": 1.0}}'
    assert again.diagnostics == {"ms": [1]}


async def test_postgres_keeps_the_encoded_bytes_verbatim(database_url: str) -> None:
    """On Postgres the row holds the value's compact JSON text byte for byte (codec
    ``json``), and the error and diagnostics as their text: nothing normalised."""
    store = PostgresStore(database_url, max_size=1)
    await store.open()
    try:
        await store.write(
            entry_of("v", DOCUMENTS[2], error={"z": 1, "a": -0.0}, diagnostics=[1e300])
        )
        async with store.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT value, codec, error, diagnostics FROM fleetcache_entries"
            )
            row = await cursor.fetchone()
    finally:
        await store.close()
    compact = json.dumps(DOCUMENTS[2], separators=(",", ":"), ensure_ascii=False)
    assert row == (compact.encode(), "json", '{"z":1,"a":-0.0}', "[1e+300]")


def _set_codec_sqlite(path: Path, codec: str, value: bytes) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("UPDATE fleetcache_entries SET codec = ?, value = ?", (codec, value))
        conn.commit()
    finally:
        conn.close()


async def _set_codec_postgres(url: str, codec: str, value: bytes) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("UPDATE fleetcache_entries SET codec = %s, value = %s", (codec, value))


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_value_that_cannot_be_decoded_is_a_store_error_naming_key_and_codec(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A row whose codec this release does not know (a newer writer's), a pickle row in a
    process that does not unpickle, or bytes that do not decode make the read raise
    StoreError naming the key and the codec — never a wrong value, never an untyped
    error."""
    store: SqliteStore | PostgresStore
    if kind == "sqlite":
        store = SqliteStore(tmp_path / "c.db")
    else:
        url = request.getfixturevalue("database_url")
        store = PostgresStore(url, max_size=1)
    await store.open()
    try:
        await store.write(entry_of("x", {"a": 1}))
        for codec, data, says in (
            ("msgpack", b"\x81", "has codec 'msgpack'"),
            ("pickle+zlib", b"\x80\x04K\x01.", "has codec 'pickle+zlib', and this process does"),
            ("json", b'{"a": ', "is not 'json' data"),
            ("json", b"\xff\xfe\x00", "is not 'json' data"),
        ):
            if kind == "sqlite":
                _set_codec_sqlite(tmp_path / "c.db", codec, data)
            else:
                await _set_codec_postgres(url, codec, data)
            with pytest.raises(StoreError) as info:
                await store.read(Key(NS, "x"))
            assert says in str(info.value)
            assert Key(NS, "x").coalesce_key in str(info.value)
    finally:
        await store.close()


# ------------------------------------------------------------ end to end: fleetcache.open

PRODUCED: Produced[Any] = Produced(
    value={"zeta": [1.0, -0.0, 1e300, 2**70], **DEFINITIONS, "alpha": "é"},
    deps=("z-dep", "a-dep"),
    diagnostics={"requestId": "r-1", "renderMs": 5.0, "b": 1, "a": 2},
)
FAILED: Produced[Any] = Produced(
    value={}, error={"status": 500, "message": "boom", "additionalErrors": None}
)

# A fresh process: open the cache, read both keys (computing is an error: they must hit),
# print the three JSON parts of each as the one line of output.
_HIT_IN_A_FRESH_PROCESS = """
import asyncio, json, sys
import fleetcache

async def refuse(key):
    raise AssertionError(f"{key} was computed again: not a hit")

async def main(url, namespace):
    async with fleetcache.open(url) as cache:
        parts = []
        for name in ("ok", "failed"):
            entry = await cache.get(fleetcache.Key(namespace, name), refuse)
            parts.append([entry.value, entry.error, entry.diagnostics])
        print(json.dumps(parts, ensure_ascii=False))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def parts_text(entries: list[Any]) -> str:
    """The JSON parts of entries as the fresh process prints them."""
    return json.dumps([[e.value, e.error, e.diagnostics] for e in entries], ensure_ascii=False)


async def hit_in_a_fresh_process(url: str) -> str:
    """What a new OS process reads for both keys, as JSON text."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HIT_IN_A_FRESH_PROCESS,
        url,
        NS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


@pytest.mark.processes
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_hit_returns_what_the_miss_returned_through_open(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Through fleetcache.open: a miss, a later hit on the same cache object, a hit on a
    fresh cache object and a hit in a fresh OS process all give the same JSON text for
    value, error document and diagnostics (key order and number forms included)."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'cache.db'}"
    else:
        url = request.getfixturevalue("database_url")
    computed: list[str] = []

    async def produce(key: Key) -> Produced[Any]:
        computed.append(key.name)
        return PRODUCED if key.name == "ok" else FAILED

    keys = [Key(NS, "ok"), Key(NS, "failed")]
    async with fleetcache.open(url) as cache:
        missed = [await cache.get(key, produce) for key in keys]
        hit = [await cache.get(key, produce) for key in keys]
    assert computed == ["ok", "failed"]
    expected = parts_text([PRODUCED, FAILED])
    assert parts_text(missed) == expected
    assert parts_text(hit) == expected
    async with fleetcache.open(url) as fresh:
        assert parts_text([await fresh.get(key, produce) for key in keys]) == expected
    assert computed == ["ok", "failed"]
    assert await hit_in_a_fresh_process(url) == expected
