"""CachingLookup on every store: single flight, errors, candidates, fan-out, staleness,
bounds, and the keys-by-fields guarantee."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from fleetcache.coordination.base import KeyLock, Reading
from fleetcache.coordination.local import LocalCoordinator
from fleetcache.errors import (
    CachedError,
    ComputationTimeoutError,
    ConfigurationError,
    InvalidInputError,
    NotOpenError,
    SerializationError,
)
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.options import LookupOptions
from fleetcache.lookup.populate import MISSING, Missing, Produced
from fleetcache.stores.base import Entry, GenerationStamp, Key, Store
from waiting import PROMPT, eventually

NS = "https://realm.example/"
T = TypeVar("T")


@dataclass
class Producer:
    """A produce function that counts calls and can be held at a gate.

    It reads ``source`` (the thing being cached) when it starts, as a real producer
    reads its data, then waits at the gate: a computation that started before a change
    produces the old version."""

    source: dict[str, int] = field(default_factory=lambda: {"version": 1})
    values: dict[str, object] = field(default_factory=dict)
    errors: dict[str, object] = field(default_factory=dict)
    deps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    raises: BaseException | None = None
    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    calls: Counter[str] = field(default_factory=Counter)
    keys: list[Key] = field(default_factory=list)

    async def __call__(self, key: Key) -> Produced[Any] | Missing:
        name = key.name
        self.calls[name] += 1
        self.keys.append(key)
        version = self.source["version"]
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.raises is not None:
            raise self.raises
        if name in self.missing:
            return MISSING
        if name in self.errors:
            return Produced(value={}, error=self.errors[name], deps=self.deps.get(name, ()))
        value = self.values.get(name, {"name": name, "version": version})
        return Produced(value=value, deps=self.deps.get(name, ()))

    def release(self) -> None:
        """Open the gate."""
        assert self.gate is not None
        self.gate.set()


class Clock:
    """A settable clock in seconds."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def all_joined(lookup: CachingLookup[Any], callers: int) -> None:
    """Wait until ``callers`` callers share the computation (the first started it)."""
    await eventually(lambda: lookup.stats()["coalesced"] >= callers - 1)


def key(name: str, ns: str = NS) -> Key:
    """A public key in the test namespace."""
    return Key(ns, name)


def version(entry: Entry | None) -> int:
    """The version a test entry was produced from."""
    assert entry is not None
    value: int = entry.value["version"]
    return value


async def test_same_key_callers_share_one_computation(store: Store) -> None:
    """Concurrent callers of one key share a single computation and get the same entry."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(5)]
    await produce.started.wait()
    await all_joined(lookup, 5)
    produce.release()
    results = await asyncio.gather(*callers)
    assert produce.calls["a"] == 1
    assert all(r is not None and r.value == {"name": "a", "version": 1} for r in results)
    assert lookup.stats()["coalesced"] == 4


async def test_different_keys_do_not_share(store: Store) -> None:
    """Callers of different keys each run their own computation."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer()
    await asyncio.gather(lookup.get(key("a"), produce), lookup.get(key("b"), produce))
    assert produce.calls == Counter({"a": 1, "b": 1})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (Key("https://r/a|b", "c"), Key("https://r/a", "b|c")),
        (Key(NS, "m", "realm-auth", "team|bob"), Key(NS, "m|realm-auth", "team", "bob")),
        (Key(NS, "m", "realm-auth|team", "bob"), Key(NS, "m", "realm-auth", "team|bob")),
        (Key(NS, 'a","b'), Key(NS + '","a', "b")),
    ],
)
async def test_keys_that_join_alike_never_share_a_computation_or_a_value(
    store: Store, first: Key, second: Key
) -> None:
    """Two distinct keys whose fields would read alike once joined with a separator get two
    computations, each its own value, and each its own row."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    gate = asyncio.Event()
    started: list[Key] = []

    async def produce(k: Key) -> Produced[Any]:
        started.append(k)
        await gate.wait()
        return Produced(value={"for": [k.namespace, k.name, k.scope, k.user]})

    tasks = [asyncio.create_task(lookup.get(k, produce)) for k in (first, second)]
    # Both callers are in: each computing its own key, or (wrongly) one joined the other.
    await eventually(lambda: len(started) + lookup.stats()["coalesced"] == 2)
    gate.set()
    got_first, got_second = await asyncio.gather(*tasks)
    assert got_first is not None
    assert got_second is not None
    assert got_first.value == {"for": [first.namespace, first.name, first.scope, first.user]}
    assert got_second.value == {"for": [second.namespace, second.name, second.scope, second.user]}
    assert lookup.stats()["coalesced"] == 0
    assert (await store.read(first)) == got_first
    assert (await store.read(second)) == got_second


async def test_second_get_is_a_hit(store: Store) -> None:
    """A stored entry is returned without computing again, and peek sees it."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer()
    first = await lookup.get(key("a"), produce)
    second = await lookup.get(key("a"), produce)
    assert first == second
    assert produce.calls["a"] == 1
    assert await lookup.peek(key("a")) == first


async def test_empty_value_is_a_hit(store: Store) -> None:
    """An empty value is cached and served as a hit, not recomputed."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(values={"a": {}})
    assert (await lookup.get(key("a"), produce) or Entry(key("x"), None)).value == {}
    assert (await lookup.get(key("a"), produce) or Entry(key("x"), None)).value == {}
    assert produce.calls["a"] == 1


async def test_peek_never_computes(store: Store) -> None:
    """peek on a miss returns None and stores nothing."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    assert await lookup.peek(key("a")) is None
    assert await store.read(key("a")) is None


async def test_produce_receives_the_candidate_key_with_scope_and_user(store: Store) -> None:
    """produce gets each candidate's full key, so scope and user need no closure."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(missing={"a.gts"})
    private = Key(NS, "a", "realm-auth", "@alice")
    await lookup.get(private, produce, candidates=["a.gts", "a"], alias="a")
    assert produce.keys == [private.with_name("a.gts"), private]


async def test_shared_exception_reaches_every_caller_and_frees_the_entry(store: Store) -> None:
    """A produce exception rejects every caller, stores nothing, and the next get retries."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event(), raises=RuntimeError("prerender exploded"))
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(3)]
    await produce.started.wait()
    await all_joined(lookup, 3)
    produce.release()
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
    lookup: CachingLookup[Any] = CachingLookup(
        store, options=LookupOptions(error_ttl=30), clock=clock
    )
    produce = Producer(gate=asyncio.Event(), errors={"a": {"message": "boom"}})
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(3)]
    await produce.started.wait()
    await all_joined(lookup, 3)
    produce.release()
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
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(errors={"a": {"message": "boom"}})
    assert await lookup.get(key("a"), produce, persist_errors=False) is None
    assert await store.read(key("a")) is None


async def test_a_result_marked_not_cacheable_is_returned_but_never_stored(store: Store) -> None:
    """Produced(cacheable=False) reaches the caller and leaves no row."""
    lookup: CachingLookup[Any] = CachingLookup(store)

    async def produce(k: Key) -> Produced[Any]:
        return Produced(value={}, error={"message": "incomplete"}, cacheable=False)

    got = await lookup.get(key("a"), produce)
    assert got is not None
    assert got.error == {"message": "incomplete"}
    assert await store.read(key("a")) is None
    assert lookup.stats()["not_persisted"] == 1


async def test_missing_is_never_stored(store: Store) -> None:
    """A missing outcome answers None and leaves no row; the next get asks again."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(missing={"a"})
    assert await lookup.get(key("a"), produce) is None
    assert await lookup.get(key("a"), produce) is None
    assert produce.calls["a"] == 2
    assert await store.read(key("a")) is None


async def test_candidates_are_tried_in_order_and_stored_with_alias(store: Store) -> None:
    """Missing candidates are skipped; the first that exists is stored under its own name
    with the alias, so a later get of the alias hits it."""
    lookup: CachingLookup[Any] = CachingLookup(store)
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
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(missing={"a.gts", "a"})
    assert await lookup.get(key("a"), produce, candidates=["a.gts", "a"], alias="a") is None
    assert await store.read(key("a")) is None


async def test_non_json_value_raises_typed_error_and_stores_nothing(store: Store) -> None:
    """A produced value that is not JSON raises SerializationError to the caller; no row."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(values={"a": {"bad": {1, 2}}})
    with pytest.raises(SerializationError, match="not JSON"):
        await lookup.get(key("a"), produce)
    assert await store.read(key("a")) is None


@pytest.mark.parametrize("how", ["invalidate", "clear_namespace", "clear_all"])
async def test_invalidation_during_computation_never_lands_the_old_result(
    store: Store, how: str
) -> None:
    """Invalidating (a key, its namespace, or everything) while its computation runs: the
    result computed from the old data is refused and never stored; the computation runs
    again, so its caller and a caller arriving afterwards both get the new version."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    doomed = asyncio.create_task(lookup.get(key("a"), produce))
    await produce.started.wait()
    produce.source["version"] = 2  # the data changes, then the cache is told
    if how == "invalidate":
        assert await lookup.invalidate(NS, ["a"]) == ["a"]
    elif how == "clear_namespace":
        await lookup.clear_namespace(NS)
    else:
        await lookup.clear_all()
    later = asyncio.create_task(lookup.get(key("a"), produce))
    produce.release()
    assert version(await doomed) == 2
    assert version(await later) == 2
    assert version(await store.read(key("a"))) == 2
    assert lookup.stats()["stale_refused"] == 1


async def test_a_refused_result_restarts_once_for_every_caller_that_shared_it(
    store: Store,
) -> None:
    """Callers that joined a computation overtaken by an invalidation all get the restarted
    result; the computation ran twice in all, not once per caller."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(4)]
    await produce.started.wait()
    await all_joined(lookup, 4)
    produce.source["version"] = 2
    await store.invalidate(NS, ["a"])  # as another process would: behind the lookup's back
    produce.release()
    results = await asyncio.gather(*callers)
    assert {version(r) for r in results} == {2}
    assert produce.calls["a"] == 2
    stats = lookup.stats()
    assert (stats["stale_refused"], stats["restarts"]) == (1, 1)


async def test_invalidated_during_every_attempt_answers_what_the_store_holds(
    store: Store,
) -> None:
    """When every attempt is overtaken by an invalidation the computation stops after the
    last attempt and answers what the store holds (here nothing): bounded, never stale."""
    lookup: CachingLookup[Any] = CachingLookup(store)

    async def produce(k: Key) -> Produced[Any]:
        await store.invalidate(NS, [k.name])  # invalidated while computing, every time
        return Produced(value={"stale": True})

    assert await lookup.get(key("a"), produce) is None
    assert await store.read(key("a")) is None
    assert lookup.stats()["stale_refused"] == 3


async def test_invalidating_one_key_spares_a_bystander(store: Store) -> None:
    """Invalidating one key does not discard a concurrent result for another key."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    bystander = asyncio.create_task(lookup.get(key("b"), produce))
    await produce.started.wait()
    await lookup.invalidate(NS, ["a"])
    produce.release()
    assert await bystander is not None
    assert await store.read(key("b")) is not None
    assert produce.calls["b"] == 1


async def test_identity_checked_cleanup(store: Store) -> None:
    """An old computation finishing after a new one started under the same key does not
    remove the new one's in-flight entry: later callers still join the new one (as the
    old one's callers do, their result refused)."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    old = Producer(gate=asyncio.Event())
    old_call = asyncio.create_task(lookup.get(key("a"), old))
    await old.started.wait()
    await lookup.invalidate(NS, ["a"])
    new = Producer(gate=asyncio.Event(), source={"version": 2})
    new_call = asyncio.create_task(lookup.get(key("a"), new))
    await new.started.wait()
    old.release()
    await eventually(lambda: lookup.stats()["overtaken"] == 1)  # the old one has finished
    joiner = asyncio.create_task(lookup.get(key("a"), new))
    await eventually(lambda: lookup.stats()["coalesced"] == 1)
    new.release()
    results = await asyncio.gather(new_call, joiner, old_call)
    assert (old.calls["a"], new.calls["a"]) == (1, 1)
    assert results[0] == results[1] == results[2]
    assert version(results[0]) == 2


class HeldWriteStore:
    """Wraps a store: a write reaches the store, then its caller is held at a gate before it
    learns the outcome (the window between a commit and the computation resuming)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.written = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        notify: tuple[str, str] | None = None,
    ) -> bool:
        written = await self.inner.write(entry, stamp=stamp, notify=notify)
        self.written.set()
        await self.gate.wait()
        return written


async def test_a_caller_after_invalidate_returns_never_joins_a_computation_that_stored_old_data(
    store: Store,
) -> None:
    """A computation that stored its result just before an invalidation, and has not yet
    returned, is not joined by a caller arriving after invalidate() returned: that caller
    computes the new version instead of receiving the deleted old one."""
    held = HeldWriteStore(store)
    lookup: CachingLookup[Any] = CachingLookup(held)  # type: ignore[arg-type]
    produce = Producer()
    early = asyncio.create_task(lookup.get(key("a"), produce))
    await held.written.wait()  # version 1 is stored; the computation has not returned
    produce.source["version"] = 2
    await lookup.invalidate(NS, ["a"])
    held.gate.set()
    late = await lookup.get(key("a"), produce)
    assert version(late) == 2
    assert version(await early) == 1  # it began before the invalidation: linearizable


class ReleaseGatedCoordinator(LocalCoordinator):
    """A LocalCoordinator whose winner is held after its computation, before it releases
    (as a Postgres winner is while its NOTIFY-and-unlock statement runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.computed = asyncio.Event()
        self.gate = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lock(
        self, coalesce_key: str, reading: Reading | None = None
    ) -> AsyncIterator[KeyLock]:
        async with super().lock(coalesce_key, reading) as lock:
            yield lock
            if lock.won:
                self.computed.set()
                await self.gate.wait()


async def test_a_winner_releasing_its_lock_is_not_joined_after_its_result_was_stored(
    store: Store,
) -> None:
    """While a winner releases its lock, its result is already in the store: a caller
    arriving then reads the store (and so sees an invalidation made by another process
    meanwhile) instead of joining the winner's old result."""
    coordinator = ReleaseGatedCoordinator()
    await coordinator.start()
    lookup: CachingLookup[Any] = CachingLookup(store, coordinator=coordinator)
    produce = Producer()
    early = asyncio.create_task(lookup.get(key("a"), produce))
    await coordinator.computed.wait()
    produce.source["version"] = 2
    await store.invalidate(NS, ["a"])  # another process's invalidation
    coordinator.gate.set()  # later winners pass straight through
    late = await lookup.get(key("a"), produce)
    assert version(late) == 2
    assert version(await early) == 1
    await coordinator.close()


async def test_cancelling_a_follower_leaves_the_others_their_result(store: Store) -> None:
    """Cancelling one caller (even the first) does not cancel the shared computation."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    first = asyncio.create_task(lookup.get(key("a"), produce))
    await produce.started.wait()
    others = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(2)]
    await eventually(lambda: lookup.stats()["coalesced"] == 2)
    first.cancel()
    others[0].cancel()
    produce.release()
    result = await others[1]
    assert result is not None
    assert first.cancelled()
    assert others[0].cancelled()
    assert produce.calls["a"] == 1
    assert await store.read(key("a")) is not None


async def test_dependency_fan_out_through_a_chain(store: Store) -> None:
    """Invalidating a leaf invalidates middle and deep (leaf <- middle <- deep), not others."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(deps={"middle": ("leaf",), "deep": ("middle",), "other": ("x",)})
    for name in ["leaf", "middle", "deep", "other"]:
        await lookup.get(key(name), produce)
    assert sorted(await lookup.invalidate(NS, ["leaf"])) == ["deep", "leaf", "middle"]
    for name in ["leaf", "middle", "deep"]:
        assert await store.read(key(name)) is None
    assert await store.read(key("other")) is not None


async def test_dependency_fan_out_through_a_diamond(store: Store) -> None:
    """A diamond (leaf <- left, right <- top) invalidates each dependent once."""
    lookup: CachingLookup[Any] = CachingLookup(store)
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
    """An empty namespace or name, a NUL or a lone surrogate is refused before any I/O, and
    a nonsensical option is a ConfigurationError."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer()
    for bad in (
        Key("", "a"),
        Key(NS, ""),
        Key(NS, "a\x00b"),
        Key(NS, "a\ud800"),
        Key("x" * 5000, "a"),
    ):
        with pytest.raises(InvalidInputError):
            await lookup.get(bad, produce)
    with pytest.raises(InvalidInputError):
        await lookup.get(key("a"), produce, candidates=["a\x00.gts"])
    assert not produce.calls
    for options in ({"max_rounds": 0}, {"compute_timeout": 0}, {"wait_timeout": -1}):
        with pytest.raises(ConfigurationError):
            LookupOptions(**options)  # type: ignore[arg-type]


async def test_close_cancels_running_computations(store: Store) -> None:
    """close() cancels computations under way, their callers get NotOpenError (not a
    cancellation they did not ask for), and later gets are refused."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    pending = asyncio.create_task(lookup.get(key("a"), produce))
    await produce.started.wait()
    await lookup.close()
    with pytest.raises(NotOpenError, match="closed while a computation was under way"):
        await pending
    with pytest.raises(NotOpenError):
        await lookup.get(key("a"), produce)


async def test_a_computation_that_never_returns_is_bounded_for_every_caller(
    store: Store,
) -> None:
    """A produce that never returns: every caller sharing it gets ComputationTimeoutError
    after compute_timeout, nothing is stored, and the next caller starts afresh."""
    lookup: CachingLookup[Any] = CachingLookup(store, options=LookupOptions(compute_timeout=0.3))
    produce = Producer(gate=asyncio.Event())
    callers = [asyncio.create_task(lookup.get(key("a"), produce)) for _ in range(2)]
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)
    assert all(isinstance(r, ComputationTimeoutError) for r in results)
    assert "compute_timeout=0.3" in str(results[0])
    assert produce.calls["a"] == 1
    assert await store.read(key("a")) is None
    produce.release()
    assert version(await lookup.get(key("a"), produce)) == 1
    assert produce.calls["a"] == 2
    assert lookup.stats()["compute_timeouts"] == 1


@pytest.mark.slow
async def test_a_computation_that_ignores_cancellation_still_frees_its_callers(
    store: Store,
) -> None:
    """A produce that swallows its cancellation cannot hold callers past their own bound,
    and close() does not wait for it past its timeout."""
    lookup: CachingLookup[Any] = CachingLookup(store, options=LookupOptions(compute_timeout=0.2))
    stop = asyncio.Event()

    async def stubborn(k: Key) -> Produced[Any]:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue
        return Produced(value={})

    with pytest.raises(ComputationTimeoutError):
        await asyncio.wait_for(lookup.get(key("a"), stubborn), 10)
    # The bound only keeps a hang (close waiting for the stubborn computation) from stalling.
    await asyncio.wait_for(lookup.close(timeout=0.3), PROMPT)
    stop.set()
    await asyncio.sleep(0.1)


async def test_a_producers_own_timeout_error_is_not_taken_for_ours(store: Store) -> None:
    """A TimeoutError raised by produce itself reaches the caller as it is."""
    lookup: CachingLookup[Any] = CachingLookup(store)

    async def produce(k: Key) -> Produced[Any]:
        raise TimeoutError("the prerender service timed out")

    with pytest.raises(TimeoutError, match="prerender service") as caught:
        await lookup.get(key("a"), produce)
    assert not isinstance(caught.value, ComputationTimeoutError)


@pytest.mark.slow
async def test_invalidation_notices_from_the_fleet_never_multiply_computations(
    store: Store,
) -> None:
    """A flood of invalidation notices (here 20 a second, as a forged broadcast could send)
    while one computation runs: 20 callers arriving meanwhile still share that one
    computation, since only the store decides whether a result is stale."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event())
    callers = [asyncio.create_task(lookup.get(key("a"), produce))]
    await produce.started.wait()
    for _ in range(20):
        lookup.on_all_cleared()
        lookup.on_names_invalidated(NS, ["a"])
        callers.append(asyncio.create_task(lookup.get(key("a"), produce)))
        await asyncio.sleep(0.05)
    produce.release()
    results = await asyncio.gather(*callers)
    assert produce.calls["a"] == 1
    assert {version(r) for r in results} == {1}
    assert lookup.stats()["remote_invalidations"] == 40


async def test_dependency_invalidated_while_computing_leaves_no_stale_dependent(
    store: Store,
) -> None:
    """A computation whose result depends on D, with D invalidated while it runs (and no row
    of its own yet for the fan-out to find), never stores the old result."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event(), deps={"m": ("d",)})
    pending = asyncio.create_task(lookup.get(key("m"), produce))
    await produce.started.wait()
    produce.source["version"] = 2
    assert await lookup.invalidate(NS, ["d"]) == ["d"]
    produce.release()
    assert version(await pending) == 2
    assert version(await store.read(key("m"))) == 2
    assert lookup.stats()["stale_refused"] == 1


async def test_joined_callers_each_get_errors_as_they_asked(store: Store) -> None:
    """A caller that does want errors, joining a computation started by one that does not
    persist them, gets the error entry; the starter gets None; nothing is stored."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(gate=asyncio.Event(), errors={"a": {"message": "boom"}})
    prewarm = asyncio.create_task(lookup.get(key("a"), produce, persist_errors=False))
    await produce.started.wait()
    wants_errors = asyncio.create_task(lookup.get(key("a"), produce))
    await eventually(lambda: lookup.stats()["coalesced"] == 1)
    produce.release()
    assert await prewarm is None
    joined = await wants_errors
    assert joined is not None
    assert joined.error == {"message": "boom"}
    assert produce.calls["a"] == 1
    assert await store.read(key("a")) is None


async def test_get_value_returns_the_value_none_or_raises_the_cached_error(
    store: Store,
) -> None:
    """get_value gives the value, None for a missing key, and CachedError carrying the
    error document for an error entry."""
    lookup: CachingLookup[Any] = CachingLookup(store)
    produce = Producer(missing={"gone"}, errors={"bad": {"message": "boom"}})
    assert await lookup.get_value(key("a"), produce) == {"name": "a", "version": 1}
    assert await lookup.get_value(key("gone"), produce) is None
    with pytest.raises(CachedError) as caught:
        await lookup.get_value(key("bad"), produce)
    assert caught.value.error == {"message": "boom"}


@dataclass(frozen=True)
class Point:
    """A typed value for the codec test."""

    x: int
    y: int


class PointCodec:
    """Points as JSON objects."""

    def encode(self, value: Point) -> Any:
        return {"x": value.x, "y": value.y}

    def decode(self, document: Any) -> Point:
        return Point(document["x"], document["y"])


async def test_a_codec_types_the_values_both_ways(store: Store) -> None:
    """With a codec the store keeps JSON and callers get typed values, computed or hit."""
    lookup: CachingLookup[Point] = CachingLookup(store, codec=PointCodec())

    async def produce(k: Key) -> Produced[Point]:
        return Produced(value=Point(1, 2))

    assert await lookup.get_value(key("p"), produce) == Point(1, 2)
    assert await lookup.get_value(key("p"), produce) == Point(1, 2)
    stored = await store.read(key("p"))
    assert stored is not None
    assert stored.value == {"x": 1, "y": 2}
    assert lookup.stats()["hits"] == 1
