"""CachingLookup on every store: single flight, generations, errors, candidates, fan-out."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest

from fleetcache.errors import ConfigurationError, NotOpenError, SerializationError
from fleetcache.lookup import MISSING, CachingLookup, Missing, Produced
from fleetcache.stores import Entry, Key, Store

NS = "https://realm.example/"


@dataclass
class Producer:
    """A produce function that counts calls and can be held at a gate."""

    values: dict[str, object] = field(default_factory=dict)
    errors: dict[str, object] = field(default_factory=dict)
    deps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    raises: BaseException | None = None
    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    calls: Counter[str] = field(default_factory=Counter)
    version: int = 1

    async def __call__(self, name: str) -> Produced | Missing:
        self.calls[name] += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.raises is not None:
            raise self.raises
        if name in self.missing:
            return MISSING
        if name in self.errors:
            return Produced(value={}, error=self.errors[name], deps=self.deps.get(name, ()))
        value = self.values.get(name, {"name": name, "version": self.version})
        return Produced(value=value, deps=self.deps.get(name, ()))


class Clock:
    """A settable clock in seconds."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def key(name: str, ns: str = NS) -> Key:
    """A public key in the test namespace."""
    return Key(ns, name)


async def test_same_key_callers_share_one_computation(store: Store) -> None:
    """Concurrent callers of one key share a single computation and get the same entry."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(5)]
    await produce.started.wait()
    produce.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(*callers)
    assert produce.calls["a"] == 1
    assert all(r is not None and r.value == {"name": "a", "version": 1} for r in results)
    assert lookup.stats()["coalesced"] == 4


async def test_different_keys_do_not_share(store: Store) -> None:
    """Callers of different keys each run their own computation."""
    lookup = CachingLookup(store)
    produce = Producer()
    await asyncio.gather(lookup.get(key("a"), produce), lookup.get(key("b"), produce))
    assert produce.calls == Counter({"a": 1, "b": 1})


async def test_second_get_is_a_hit(store: Store) -> None:
    """A stored entry is returned without computing again, and peek sees it."""
    lookup = CachingLookup(store)
    produce = Producer()
    first = await lookup.get(key("a"), produce)
    second = await lookup.get(key("a"), produce)
    assert first == second
    assert produce.calls["a"] == 1
    assert await lookup.peek(key("a")) == first


async def test_empty_value_is_a_hit(store: Store) -> None:
    """An empty value is cached and served as a hit, not recomputed."""
    lookup = CachingLookup(store)
    produce = Producer(values={"a": {}})
    assert (await lookup.get(key("a"), produce) or Entry(key("x"), None)).value == {}
    assert (await lookup.get(key("a"), produce) or Entry(key("x"), None)).value == {}
    assert produce.calls["a"] == 1


async def test_peek_never_computes(store: Store) -> None:
    """peek on a miss returns None and stores nothing."""
    lookup = CachingLookup(store)
    assert await lookup.peek(key("a")) is None
    assert await store.read(key("a")) is None


async def test_shared_exception_reaches_every_caller_and_frees_the_entry(store: Store) -> None:
    """A produce exception rejects every caller, stores nothing, and the next get retries."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event(), raises=RuntimeError("prerender exploded"))
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(3)]
    await produce.started.wait()
    produce.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert produce.calls["a"] == 1
    assert await store.read(key("a")) is None
    produce.raises = None
    assert await lookup.get(key("a"), produce) is not None
    assert produce.calls["a"] == 2


async def test_shared_error_is_cached_until_its_ttl(store: Store) -> None:
    """An error entry reaches every caller, is served until the TTL, then is recomputed."""
    clock = Clock()
    lookup = CachingLookup(store, clock=clock, error_ttl=30)
    produce = Producer(gate=asyncio.Event(), errors={"a": {"message": "boom"}})
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(3)]
    await produce.started.wait()
    produce.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(*callers)
    assert all(r is not None and r.error == {"message": "boom"} for r in results)
    assert produce.calls["a"] == 1
    clock.now += 29
    cached = await lookup.get(key("a"), produce)
    assert cached is not None
    assert cached.error == {"message": "boom"}
    assert produce.calls["a"] == 1
    clock.now += 2
    assert await lookup.peek(key("a")) is None
    del produce.errors["a"]
    fresh = await lookup.get(key("a"), produce)
    assert fresh is not None
    assert fresh.error is None
    assert produce.calls["a"] == 2
    assert lookup.stats()["errors_cached"] == 1


async def test_errors_not_persisted_on_request(store: Store) -> None:
    """With persist_errors=False an error yields None and stores nothing."""
    lookup = CachingLookup(store)
    produce = Producer(errors={"a": {"message": "boom"}})
    assert await lookup.get(key("a"), produce, persist_errors=False) is None
    assert await store.read(key("a")) is None


async def test_missing_is_never_stored(store: Store) -> None:
    """A missing outcome answers None and leaves no row; the next get asks again."""
    lookup = CachingLookup(store)
    produce = Producer(missing={"a"})
    assert await lookup.get(key("a"), produce) is None
    assert await lookup.get(key("a"), produce) is None
    assert produce.calls["a"] == 2
    assert await store.read(key("a")) is None


async def test_candidates_are_tried_in_order_and_stored_with_alias(store: Store) -> None:
    """Missing candidates are skipped; the first that exists is stored under its own name
    with the alias, so a later get of the alias hits it."""
    lookup = CachingLookup(store)
    produce = Producer(missing={"a.gts"})
    got = await lookup.get(key("a"), produce, candidates=["a.gts", "a.ts", "a"], alias="a")
    assert got is not None
    assert got.key.name == "a.ts"
    assert list(produce.calls) == ["a.gts", "a.ts"]
    again = await lookup.get(key("a"), produce, candidates=["a.gts", "a.ts", "a"], alias="a")
    assert again == got
    assert sum(produce.calls.values()) == 2


async def test_all_candidates_missing_answers_none(store: Store) -> None:
    """When every candidate is missing the answer is None and nothing is stored."""
    lookup = CachingLookup(store)
    produce = Producer(missing={"a.gts", "a"})
    assert await lookup.get(key("a"), produce, candidates=["a.gts", "a"], alias="a") is None
    assert await store.read(key("a")) is None


async def test_non_json_value_raises_typed_error_and_stores_nothing(store: Store) -> None:
    """A produced value that is not JSON raises SerializationError to the caller; no row."""
    lookup = CachingLookup(store)
    produce = Producer(values={"a": {"bad": {1, 2}}})
    with pytest.raises(SerializationError, match="not JSON-serialisable"):
        await lookup.get(key("a"), produce)
    assert await store.read(key("a")) is None


@pytest.mark.parametrize("how", ["invalidate", "clear_namespace", "clear_all"])
async def test_invalidation_during_computation_persists_nothing(store: Store, how: str) -> None:
    """Invalidating (a key, its namespace, or everything) while its computation runs leaves
    no row, and a caller arriving afterwards triggers its own computation."""
    lookup = CachingLookup(store)
    old = Producer(gate=asyncio.Event())
    doomed = asyncio.create_task(lookup.get(key("a"), old))
    await old.started.wait()
    if how == "invalidate":
        assert await lookup.invalidate(NS, ["a"]) == ["a"]
    elif how == "clear_namespace":
        await lookup.clear_namespace(NS)
    else:
        await lookup.clear_all()
    new = Producer(version=2)
    fresh = await lookup.get(key("a"), new)
    assert new.calls["a"] == 1
    assert fresh is not None
    assert fresh.value["version"] == 2
    await store.delete_all()  # drop the fresh row; the doomed result must still not land
    old.gate.set()  # type: ignore[union-attr]
    assert await doomed is None
    assert await store.read(key("a")) is None
    assert lookup.stats()["stale_discarded"] == 1


async def test_invalidation_serves_the_fresh_row_to_the_doomed_caller(store: Store) -> None:
    """A discarded computation's caller gets what the store holds now (the fresh row)."""
    lookup = CachingLookup(store)
    old = Producer(gate=asyncio.Event())
    doomed = asyncio.create_task(lookup.get(key("a"), old))
    await old.started.wait()
    await lookup.invalidate(NS, ["a"])
    fresh = await lookup.get(key("a"), Producer(version=2))
    old.gate.set()  # type: ignore[union-attr]
    assert await doomed == fresh


async def test_invalidating_one_key_spares_a_bystander(store: Store) -> None:
    """Invalidating one key does not discard a concurrent result for another key."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    bystander = asyncio.create_task(lookup.get(key("b"), produce))
    await produce.started.wait()
    await lookup.invalidate(NS, ["a"])
    produce.gate.set()  # type: ignore[union-attr]
    assert await bystander is not None
    assert await store.read(key("b")) is not None


async def test_store_refuses_a_write_invalidated_behind_the_lookups_back(store: Store) -> None:
    """An invalidation this process never heard of (made directly on the store, as another
    process would) still stops the stale write: the store refuses it."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    pending = asyncio.create_task(lookup.get(key("a"), produce))
    await produce.started.wait()
    await store.delete_names(NS, ["a"])
    produce.gate.set()  # type: ignore[union-attr]
    assert await pending is None
    assert await store.read(key("a")) is None
    assert lookup.stats()["stale_refused"] == 1


async def test_identity_checked_cleanup(store: Store) -> None:
    """An old computation finishing after a new one started under the same key does not
    remove the new one's in-flight entry: later callers still join the new one."""
    lookup = CachingLookup(store)
    old = Producer(gate=asyncio.Event())
    old_call = asyncio.create_task(lookup.get(key("a"), old))
    await old.started.wait()
    await lookup.invalidate(NS, ["a"])
    new = Producer(gate=asyncio.Event(), version=2)
    new_call = asyncio.create_task(lookup.get(key("a"), new))
    await new.started.wait()
    old.gate.set()  # type: ignore[union-attr]
    await old_call
    joiner = asyncio.create_task(lookup.get(key("a"), new))
    await asyncio.sleep(0.05)
    new.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(new_call, joiner)
    assert new.calls["a"] == 1
    assert results[0] == results[1]
    assert results[0] is not None
    assert results[0].value["version"] == 2


async def test_cancelling_a_follower_leaves_the_others_their_result(store: Store) -> None:
    """Cancelling one caller (even the first) does not cancel the shared computation."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    first = asyncio.create_task(lookup.get(key("a"), produce))
    await produce.started.wait()
    others = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(2)]
    await asyncio.sleep(0.01)
    first.cancel()
    others[0].cancel()
    produce.gate.set()  # type: ignore[union-attr]
    result = await others[1]
    assert result is not None
    assert first.cancelled()
    assert others[0].cancelled()
    assert produce.calls["a"] == 1
    assert await store.read(key("a")) is not None


async def test_dependency_fan_out_through_a_chain(store: Store) -> None:
    """Invalidating a leaf invalidates middle and deep (leaf <- middle <- deep), not others."""
    lookup = CachingLookup(store)
    produce = Producer(deps={"middle": ("leaf",), "deep": ("middle",), "other": ("x",)})
    for name in ["leaf", "middle", "deep", "other"]:
        await lookup.get(key(name), produce)
    assert sorted(await lookup.invalidate(NS, ["leaf"])) == ["deep", "leaf", "middle"]
    for name in ["leaf", "middle", "deep"]:
        assert await store.read(key(name)) is None
    assert await store.read(key("other")) is not None


async def test_dependency_fan_out_through_a_diamond(store: Store) -> None:
    """A diamond (leaf <- left, right <- top) invalidates each dependent once."""
    lookup = CachingLookup(store)
    produce = Producer(
        deps={"left": ("leaf",), "right": ("leaf",), "top": ("left", "right"), "side": ("z",)}
    )
    for name in ["leaf", "left", "right", "top", "side"]:
        await lookup.get(key(name), produce)
    invalidated = await lookup.invalidate(NS, ["leaf"])
    assert sorted(invalidated) == ["leaf", "left", "right", "top"]
    assert len(invalidated) == len(set(invalidated))
    assert await store.read(key("side")) is not None


async def test_invalidate_of_nothing_returns_empty(store: Store) -> None:
    """Invalidating no names does nothing and returns an empty list."""
    assert await CachingLookup(store).invalidate(NS, []) == []


async def test_bad_keys_and_options_are_refused(store: Store) -> None:
    """An empty namespace or name, or a nonsensical option, is a ConfigurationError."""
    lookup = CachingLookup(store)
    with pytest.raises(ConfigurationError):
        await lookup.get(Key("", "a"), Producer())
    with pytest.raises(ConfigurationError):
        await lookup.get(Key(NS, ""), Producer())
    with pytest.raises(ConfigurationError):
        CachingLookup(store, max_rounds=0)


async def test_close_cancels_running_computations(store: Store) -> None:
    """close() cancels computations under way, their callers get NotOpenError (not a
    cancellation they did not ask for), and later gets are refused."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    pending = asyncio.create_task(lookup.get(key("a"), produce))
    await produce.started.wait()
    await lookup.close()
    with pytest.raises(NotOpenError, match="closed while computing"):
        await pending
    with pytest.raises(NotOpenError):
        await lookup.get(key("a"), produce)


async def test_late_broadcast_does_not_discard_a_fresh_result(store: Store) -> None:
    """A bump heard while computing (a peer's broadcast arriving after its delete committed,
    before this computation's stamp) does not throw away a result the store proves fresh."""
    lookup = CachingLookup(store)
    await store.delete_names(NS, ["a"])  # the peer's invalidation, already committed
    produce = Producer(gate=asyncio.Event())
    pending = asyncio.create_task(lookup.get(key("a"), produce))
    await produce.started.wait()
    lookup.bump_names(NS, ["a"])  # ...and its broadcast, arriving late
    produce.gate.set()  # type: ignore[union-attr]
    got = await pending
    assert got is not None
    assert await store.read(key("a")) == got
    stats = lookup.stats()
    assert stats["fresh_despite_invalidation"] == 1
    assert stats["stale_discarded"] == stats["stale_refused"] == 0


async def test_dependency_invalidated_while_computing_leaves_no_stale_dependent(
    store: Store,
) -> None:
    """A computation whose result depends on D, with D invalidated while it runs (and no row
    of its own yet for the fan-out to find), persists nothing."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event(), deps={"m": ("d",)})
    pending = asyncio.create_task(lookup.get(key("m"), produce))
    await produce.started.wait()
    assert await lookup.invalidate(NS, ["d"]) == ["d"]
    produce.gate.set()  # type: ignore[union-attr]
    assert await pending is None
    assert await store.read(key("m")) is None
    assert lookup.stats()["stale_refused"] == 1


async def test_joined_callers_each_get_errors_as_they_asked(store: Store) -> None:
    """A caller that does want errors, joining a computation started by one that does not
    persist them, gets the error entry; the starter gets None; nothing is stored."""
    lookup = CachingLookup(store)
    produce = Producer(gate=asyncio.Event(), errors={"a": {"message": "boom"}})
    prewarm = asyncio.create_task(lookup.get(key("a"), produce, persist_errors=False))
    await produce.started.wait()
    wants_errors = asyncio.create_task(lookup.get(key("a"), produce))
    await asyncio.sleep(0.01)
    produce.gate.set()  # type: ignore[union-attr]
    assert await prewarm is None
    joined = await wants_errors
    assert joined is not None
    assert joined.error == {"message": "boom"}
    assert produce.calls["a"] == 1
    assert await store.read(key("a")) is None
