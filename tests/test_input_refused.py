"""Bad input is refused with a typed error before any I/O (and before ``produce``), on
every store and through the front door: the existing entry and its dependents stay, no
store method is called, nothing is computed."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import fleetcache
from fleetcache import CachingLookup, Key, Produced
from fleetcache.errors import ConfigurationError, InvalidInputError, SerializationError
from fleetcache.lookup.decorator import cached
from fleetcache.stores.base import Entry, Expand, GenerationStamp, Store
from fleetcache.stores.codecs import ValueCodec
from fleetcache.stores.validation import MAX_JSON_DEPTH
from test_store_contract import assert_no_transaction_left

NS = "https://realm.example/"


def deep(levels: int) -> Any:
    """A list nested ``levels`` deep."""
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


#: Values no store can keep (and the decorator takes none of them as an argument).
BAD_VALUES: dict[str, Any] = {
    "nan": math.nan,
    "inf": {"x": [1.0, math.inf]},
    "int-dict-key": {1: "x"},
    "bool-dict-key": {"a": {True: "x"}},
    "none-dict-key": {None: "x"},
    "float-dict-key": {1.5: "x"},
    "too-deep": deep(MAX_JSON_DEPTH + 1),
    "hostile-depth": deep(100_000),
    "5000-digit-int": 10**5000,
    "set": {"s": {1, 2}},
    "bytes": b"bytes",
    "nul": "a\x00b",
}

#: Expiry options that are not durations (or contradict each other), per call.
BAD_EXPIRY: list[dict[str, Any]] = [
    {"ttl": math.nan},
    {"ttl": math.inf},
    {"ttl": -math.inf},
    {"ttl": 1e300},
    {"ttl": 10**400},
    {"ttl": "5"},
    {"ttl": True},
    {"ttl": 0},
    {"ttl": -1},
    {"ttl": 0.0001},
    {"ttl": 10, "stale_ttl": math.nan},
    {"ttl": 10, "stale_ttl": math.inf},
    {"ttl": 10, "stale_ttl": 1e300},
    {"ttl": 10, "stale_ttl": -1},
    {"ttl": 10, "stale_ttl": "5"},
    {"ttl": 10, "stale_ttl": False},
    {"stale_ttl": 5},
    {"ttl": None, "stale_ttl": 5},
]

#: Early-refresh options that are not a positive finite beta (or have no ttl to act on).
BAD_BETA: list[dict[str, Any]] = [
    {"ttl": 10, "early_refresh": math.nan},
    {"ttl": 10, "early_refresh": math.inf},
    {"ttl": 10, "early_refresh": 10**400},
    {"ttl": 10, "early_refresh": 0},
    {"ttl": 10, "early_refresh": -1},
    {"ttl": 10, "early_refresh": "1"},
    {"ttl": 10, "early_refresh": True},
    {"early_refresh": 1.0},
]


class RecordingStore:
    """A store that records every method called on it, then delegates: an empty record
    proves no I/O happened."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: list[str] = []

    @property
    def values(self) -> ValueCodec:
        """The inner store's codec (no I/O)."""
        return self.inner.values

    async def open(self) -> None:
        """Open the inner store."""
        self.calls.append("open")
        await self.inner.open()

    async def close(self) -> None:
        """Close the inner store."""
        self.calls.append("close")
        await self.inner.close()

    async def read(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """Record, then read."""
        self.calls.append("read")
        return await self.inner.read(key, by_alias=by_alias)

    async def stamp_and_read(
        self, key: Key, names: Sequence[str], *, by_alias: bool = False
    ) -> tuple[GenerationStamp, Entry | None]:
        """Record, then stamp and read."""
        self.calls.append("stamp_and_read")
        return await self.inner.stamp_and_read(key, names, by_alias=by_alias)

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        notify: tuple[str, str] | None = None,
    ) -> bool:
        """Record, then write."""
        self.calls.append("write")
        return await self.inner.write(entry, stamp=stamp, notify=notify)

    async def invalidate(
        self, namespace: str, names: Sequence[str], *, expand: Expand | None = None
    ) -> list[str]:
        """Record, then invalidate."""
        self.calls.append("invalidate")
        return await self.inner.invalidate(namespace, names, expand=expand)

    async def clear_namespace(self, namespace: str) -> None:
        """Record, then clear the namespace."""
        self.calls.append("clear_namespace")
        await self.inner.clear_namespace(namespace)

    async def clear_all(self) -> None:
        """Record, then clear everything."""
        self.calls.append("clear_all")
        await self.inner.clear_all()

    async def purge_expired(self, before_ms: int, limit: int = 1000) -> int:
        """Record, then purge."""
        self.calls.append("purge_expired")
        return await self.inner.purge_expired(before_ms, limit)


class Producer:
    """A produce function that counts its calls and returns what it is given."""

    def __init__(self, produced: Produced[Any] | None = None) -> None:
        self.calls = 0
        self.produced = produced

    async def __call__(self, key: Key) -> Produced[Any]:
        self.calls += 1
        return self.produced or Produced(value={"name": key.name})


def key(name: str) -> Key:
    """A public key in the test namespace."""
    return Key(NS, name)


async def seed(store: Store) -> dict[str, Entry]:
    """Entries ``a``, ``b`` (depends on ``a``), ``c`` and ``d`` (depends on ``c``), as read
    back: what every test expects to find unchanged after a refusal."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    await lookup.set(key("a"), {"v": "a"})
    await lookup.set(key("b"), {"v": "b"}, deps=["a"])
    await lookup.set(key("c"), {"v": "c"})
    await lookup.set(key("d"), {"v": "d"}, deps=["c"])
    return {name: await read(store, name) for name in "abcd"}


async def read(store: Store, name: str) -> Entry:
    """The entry ``name``, which must be there."""
    found = await store.read(key(name))
    assert found is not None, f"entry {name!r} is gone"
    return found


async def assert_intact(store: Store, seeded: dict[str, Entry]) -> None:
    """Every seeded entry is there, unchanged, and nothing else was written."""
    for name, was in seeded.items():
        assert await read(store, name) == was
    for name in ("abc", "x", "new", "e"):
        assert await store.read(key(name)) is None
    await assert_no_transaction_left(store)


def recorded(store: Store) -> tuple[RecordingStore, CachingLookup[Any]]:
    """A lookup over a recording wrapper of ``store``."""
    recorder = RecordingStore(store)
    return recorder, CachingLookup(recorder)


# ------------------------------------------------------------------------------ set


async def test_set_with_a_value_the_store_refuses_changes_nothing(store: Store) -> None:
    """set(key, value) with a value no store can keep raises InvalidInputError (or its
    SerializationError) naming the key before any I/O: the existing entry and its
    dependent are still there (set no longer invalidates first, then fails)."""
    seeded = await seed(store)
    recorder, lookup = recorded(store)
    for what, bad in BAD_VALUES.items():
        with pytest.raises(InvalidInputError, match=r'\["https://realm.example/","a"'):
            await lookup.set(key("a"), bad)
        assert recorder.calls == [], what
    await assert_intact(store, seeded)


async def test_set_with_bad_deps_alias_or_expiry_changes_nothing(store: Store) -> None:
    """deps given as a str (or bytes, or holding a non-str), a bad alias, and expiry
    options that are not durations are refused with a typed error before any I/O."""
    seeded = await seed(store)
    recorder, lookup = recorded(store)
    refused: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"deps": "abc"}, InvalidInputError),
        ({"deps": b"ab"}, InvalidInputError),
        ({"deps": ["c", 1]}, InvalidInputError),
        ({"deps": None}, InvalidInputError),
        ({"alias": "x\x00"}, InvalidInputError),
        ({"alias": 5}, InvalidInputError),
        *((options, ConfigurationError) for options in BAD_EXPIRY),
    ]
    for options, error in refused:
        with pytest.raises(error):
            await lookup.set(key("a"), {"v": "new"}, **options)
        assert recorder.calls == [], options
    await assert_intact(store, seeded)


async def test_set_refuses_times_past_what_a_store_keeps(store: Store) -> None:
    """A clock far in the future (times past 64 bits) makes set raise InvalidInputError
    before it invalidates anything."""
    seeded = await seed(store)
    recorder = RecordingStore(store)
    lookup: CachingLookup[Any] = CachingLookup(recorder, clock=lambda: 2.0**63)
    with pytest.raises(InvalidInputError, match="64-bit"):
        await lookup.set(key("a"), {"v": "new"})
    assert recorder.calls == []
    await assert_intact(store, seeded)


# ------------------------------------------------------------------------------ get


async def test_get_refuses_bad_expiry_before_any_io_and_before_produce(store: Store) -> None:
    """ttl/stale_ttl/early_refresh of NaN, an infinity, 1e300, a str, a bool, zero or
    below, or a stale window or beta without a ttl raise ConfigurationError on a miss and
    on a hit alike, before the store is read and before produce runs."""
    seeded = await seed(store)
    recorder, lookup = recorded(store)
    produce = Producer()
    for options in BAD_EXPIRY + BAD_BETA:
        for name in ("new", "a"):  # a miss, and a hit
            with pytest.raises(ConfigurationError):
                await lookup.get(key(name), produce, **options)
            with pytest.raises(ConfigurationError):
                await lookup.get_value(key(name), produce, **options)
    assert (recorder.calls, produce.calls) == ([], 0)
    await assert_intact(store, seeded)


async def test_get_refuses_candidates_alias_key_and_produce_of_the_wrong_kind(
    store: Store,
) -> None:
    """candidates given as a str (not taken apart into its characters), bytes or holding
    a non-str, an alias that is not a name, a key field that is not a str (a list does not
    even hash) and a produce that is not callable are refused before any I/O."""
    seeded = await seed(store)
    recorder, lookup = recorded(store)
    produce = Producer()
    for options in (
        {"candidates": "abc"},
        {"candidates": b"abc"},
        {"candidates": ["x.gts", 1]},
        {"candidates": ["x\x00"]},
        {"candidates": 5},
        {"alias": ["x"]},
        {"alias": "x\ud800"},
    ):
        with pytest.raises(InvalidInputError):
            await lookup.get(key("x"), produce, **options)
    for bad_key in (Key(NS, ["a"]), Key(NS, "a", scope=None), Key(b"ns", "a")):  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            await lookup.get(bad_key, produce)
    with pytest.raises(ConfigurationError, match="produce"):
        await lookup.get(key("x"), "not a function")  # type: ignore[arg-type]
    assert (recorder.calls, produce.calls) == ([], 0)
    await assert_intact(store, seeded)


async def test_produced_deps_given_as_a_str_are_refused_before_any_write(store: Store) -> None:
    """Produced(deps="abc") cannot be refused before produce, but it is refused before
    any write, with InvalidInputError naming the key: no entry depending on "a", "b" and
    "c" is stored."""
    seeded = await seed(store)
    recorder, lookup = recorded(store)
    for deps in ("abc", b"abc", None, ["a", 2]):
        produce = Producer(Produced(value={"v": "e"}, deps=deps))  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match=r'deps produced for key \["https'):
            await lookup.get(key("e"), produce)
        assert produce.calls == 1
    assert "write" not in recorder.calls
    await assert_intact(store, seeded)
    assert await store.invalidate(NS, ["c"]) == ["c", "d"]  # no "e" depending on "c"


async def test_produce_returning_a_bare_value_is_refused_naming_the_key(store: Store) -> None:
    """A produce that returns a value instead of Produced(...) or MISSING raises
    InvalidInputError naming the key (it used to escape as AttributeError); nothing is
    written."""
    seeded = await seed(store)
    recorder, lookup = recorded(store)

    async def bare(key: Key) -> Any:
        return {"v": key.name}

    with pytest.raises(InvalidInputError, match=r'key \["https://realm.example/","e".*Produced'):
        await lookup.get(key("e"), bare)
    assert "write" not in recorder.calls
    await assert_intact(store, seeded)


async def test_produced_values_no_store_can_keep_are_refused_before_any_write(
    store: Store,
) -> None:
    """A produced value that is not storable JSON (a 5000-digit int included, which used
    to raise an untyped ValueError) raises InvalidInputError naming the key; nothing is
    written."""
    seeded = await seed(store)
    lookup: CachingLookup[Any] = CachingLookup(store)
    for what, bad in BAD_VALUES.items():
        produce = Producer(Produced(value=bad))
        with pytest.raises(InvalidInputError, match=r'\["https://realm.example/","e"'):
            await lookup.get(key("e"), produce)
        assert produce.calls == 1, what
    # The store's write refuses it before its first I/O (the same check as set's).
    await assert_intact(store, seeded)


# ------------------------------------------------------------------------ invalidate


async def test_invalidate_refuses_names_that_are_not_a_list_of_names(store: Store) -> None:
    """invalidate(ns, "abc") is refused instead of invalidating "a", "b" and "c" (and so
    are bytes, None, a number, a set of non-str); through the lookup and the store
    alike, nothing changes."""
    seeded = await seed(store)
    lookup: CachingLookup[Any] = CachingLookup(store)
    for names in ("abc", "a", b"abc", bytearray(b"a"), None, 5, {1, 2}, ["a", None]):
        with pytest.raises(InvalidInputError, match="names to invalidate"):
            await lookup.invalidate(NS, names)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="names to invalidate"):
            await store.invalidate(NS, names)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="names to invalidate"):
            await lookup.invalidate(NS, names, expand=lambda name: [name])  # type: ignore[arg-type]
    await assert_intact(store, seeded)


async def test_invalidate_takes_any_iterable_of_names_exactly_once(store: Store) -> None:
    """A generator, a set or a tuple of names invalidates those names and their
    dependents (the memory store used to consume a generator while checking it and then
    invalidate nothing)."""
    await seed(store)

    def names(*given: str) -> Iterator[str]:
        yield from given

    assert await store.invalidate(NS, names("a")) == ["a", "b"]  # type: ignore[arg-type]
    assert sorted(await store.invalidate(NS, {"c"})) == ["c", "d"]  # type: ignore[arg-type]
    for name in "abcd":
        assert await store.read(key(name)) is None


async def test_expand_returning_a_str_or_nothing_or_not_callable_changes_nothing(
    store: Store,
) -> None:
    """An expand that returns a str (not taken apart into characters), None or a number,
    or an expand that is not callable, is refused with InvalidInputError and the
    invalidation is rolled back."""
    seeded = await seed(store)
    expands: list[Any] = [
        lambda name: name + ".gts",
        lambda name: name.encode(),
        lambda name: None,
        lambda name: 7,
        "not a function",
    ]
    for expand in expands:
        with pytest.raises(InvalidInputError, match="expand"):
            await store.invalidate(NS, ["a"], expand=expand)
    await assert_intact(store, seeded)


# ----------------------------------------------------------------------- the store


async def test_the_store_refuses_what_it_would_split_or_overflow(store: Store) -> None:
    """A write whose deps are a str, whose times do not fit in 64 bits or whose value
    holds a 5000-digit int is refused with InvalidInputError, and the entry it would have
    replaced stays."""
    seeded = await seed(store)
    good = seeded["a"]
    for bad in (
        Entry(key("a"), {"v": 1}, deps="abc"),  # type: ignore[arg-type]
        Entry(key("a"), {"v": 1}, deps=None),  # type: ignore[arg-type]
        Entry(key("a"), {"v": 1}, created_at=2**63),
        Entry(key("a"), {"v": 1}, expires_at=-(2**63) - 1),
        Entry(key("a"), {"v": 1}, stale_until=10**30),
        Entry(key("a"), {"v": 1}, compute_ms=2**64),
        Entry(key("a"), 10**5000),
        Entry(key("a"), {"v": 1}, error={"n": -(10**4300)}),
    ):
        with pytest.raises(InvalidInputError):
            await store.write(bad)
        with pytest.raises(InvalidInputError):
            await store.write(bad, stamp=(await store.stamp_and_read(good.key, ["a"]))[0])
    with pytest.raises(InvalidInputError, match="stamped names"):
        await store.stamp_and_read(key("a"), "abc")
    await assert_intact(store, seeded)
    edge = Entry(key("e"), {"big": 10**4299, "neg": -(10**4299)}, created_at=2**63 - 1)
    assert await store.write(edge)
    assert await store.read(key("e")) == edge  # the limits themselves are kept


# --------------------------------------------------------------------- the decorator


async def test_the_decorator_never_gives_a_dict_with_non_str_keys_another_dicts_entry(
    store: Store,
) -> None:
    """f({1: "x"}) and f({"1": "x"}) used to share one entry (JSON makes every key a
    str): a dict argument with a key that is not a str is refused naming the argument,
    before anything is read or computed, so each str-keyed call gets its own value."""
    recorder, lookup = recorded(store)
    calls: list[Any] = []

    @cached(lookup, namespace="shapes")
    async def f(options: Any) -> list[Any]:
        calls.append(options)
        return [len(calls), sorted(options)]

    for non_str, as_json in (
        ({1: "x"}, {"1": "x"}),
        ({True: "x"}, {"true": "x"}),
        ({None: "x"}, {"null": "x"}),
        ({1.5: "x"}, {"1.5": "x"}),
        ({"outer": {2: "x"}}, {"outer": {"2": "x"}}),
    ):
        with pytest.raises(InvalidInputError, match=r"argument 'options' of .*f.*key="):
            await f(non_str)
        with pytest.raises(InvalidInputError, match="argument 'options'"):
            f.key_for(non_str)
        assert recorder.calls == []
        got = await f(as_json)
        assert got == [len(calls), sorted(as_json)]  # computed for this call, not shared
        assert calls[-1] is as_json
        recorder.calls.clear()
    assert len(calls) == 5


async def test_the_decorator_refuses_arguments_a_value_could_not_be(store: Store) -> None:
    """An argument nested too deep (which used to escape as RecursionError), a
    5000-digit int, NaN or a set is refused with InvalidInputError naming it, before any
    I/O and without calling the function."""
    recorder, lookup = recorded(store)
    calls: list[Any] = []

    @cached(lookup)
    async def f(arg: Any) -> int:
        calls.append(arg)
        return 1

    for bad in (deep(100_000), deep(MAX_JSON_DEPTH + 1), 10**5000, math.nan, {1, 2}):
        with pytest.raises(InvalidInputError, match="argument 'arg'"):
            await f(bad)
    assert (recorder.calls, calls) == ([], [])


async def test_the_decorator_refuses_bad_options_when_decorating(store: Store) -> None:
    """Expiry options that are not durations, an empty namespace and a key that is not a
    function are refused when the function is decorated, not at its first call."""
    lookup: CachingLookup[Any] = CachingLookup(store)

    async def fn(x: int) -> int:
        return x

    for options in BAD_EXPIRY + BAD_BETA:
        with pytest.raises(ConfigurationError):
            cached(lookup, **options)(fn)
    with pytest.raises(InvalidInputError, match="namespace"):
        cached(lookup, namespace="")(fn)
    with pytest.raises(ConfigurationError, match="key="):
        cached(lookup, key="x")(fn)  # type: ignore[arg-type]


# ------------------------------------------------------------------- the front door


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fleetcache URL of each store kind."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'front.db'}"
    database_url: str = request.getfixturevalue("database_url")
    return database_url


async def test_the_front_door_refuses_bad_input_and_changes_nothing(url: str) -> None:
    """Through fleetcache.open(url): set with a bad value, get with a bad ttl or str
    candidates, invalidate with a str and a decorated call with an int-keyed dict are all
    refused with typed errors; the entry, its dependent and the other entries stay, and
    nothing is computed."""
    async with fleetcache.open(url) as cache:
        await cache.set(key("a"), {"v": "a"})
        await cache.set(key("b"), {"v": "b"}, deps=["a"])
        await cache.set(key("c"), {"v": "c"})
        produce = Producer()
        with pytest.raises(SerializationError):
            await cache.set(key("a"), {"v": math.nan})
        with pytest.raises(SerializationError):
            await cache.set(key("a"), 10**5000)
        with pytest.raises(InvalidInputError):
            await cache.set(key("a"), {"v": 1}, deps="abc")
        for ttl in (math.nan, math.inf, 1e300, "5", True):
            with pytest.raises(ConfigurationError):
                await cache.set(key("a"), {"v": 1}, ttl=ttl)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError):
                await cache.get(key("new"), produce, ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            await cache.get(key("new"), produce, candidates="abc")
        with pytest.raises(InvalidInputError):
            await cache.invalidate(NS, "abc")

        @cache.cached(namespace=NS)
        async def f(options: dict[Any, str]) -> int:
            produce.calls += 1
            return 1

        with pytest.raises(InvalidInputError):
            await f({1: "x"})
        assert produce.calls == 0
        for name in "abc":
            entry = await cache.peek(key(name))
            assert entry is not None
            assert entry.value == {"v": name}
        assert await cache.peek(key("new")) is None
