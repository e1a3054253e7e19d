"""The coordinated path of CachingLookup and the front door (``fleetcache.open``), with
each open cache owning its own pool, hub and coordinator, as separate processes would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import fleetcache
from fleetcache import CachingLookup, Key, Produced
from fleetcache.coordination.base import lock_id
from fleetcache.coordination.local import LocalCoordinator
from fleetcache.coordination.postgres import POPULATED_CHANNEL
from fleetcache.errors import ConfigurationError, CoordinationGaveUpError
from fleetcache.lookup.options import LookupOptions
from fleetcache.lookup.populate import MISSING, Missing
from fleetcache.notifications import hub as hub_module
from fleetcache.stores.sqlite import SqliteStore
from waiting import PROMPT, eventually

NS = "https://realm.example/"


def counting(calls: list[str], delay: float = 0.0) -> Any:
    """A produce function recording each candidate name it is asked for."""

    async def produce(key: Key) -> Produced[Any]:
        calls.append(key.name)
        await asyncio.sleep(delay)
        return Produced(value={"name": key.name})

    return produce


@pytest.mark.postgres
async def test_two_coordinated_caches_compute_a_key_once(database_url: str) -> None:
    """Two open caches (each with its own coordinator) asking for one key at once: exactly
    one computation in total, and both get the row."""
    calls: list[str] = []
    async with fleetcache.open(database_url) as first, fleetcache.open(database_url) as second:
        a, b = await asyncio.gather(
            first.get(Key(NS, "card"), counting(calls, 0.3)),
            second.get(Key(NS, "card"), counting(calls, 0.3)),
        )
        assert a is not None
        assert a == b
        assert calls == ["card"]
        won = [c.coordinator.stats()["lock_won"] for c in (first, second) if c.coordinator]
        assert sorted(won) == [0, 1]


@pytest.mark.postgres
async def test_without_a_coordinator_it_still_works(database_url: str) -> None:
    """With coordination off the lookup computes and caches as before, taking no lock."""
    calls: list[str] = []
    async with fleetcache.open(database_url, coordinate=False) as cache:
        assert cache.coordinator is None
        assert await cache.get(Key(NS, "a"), counting(calls)) is not None
        assert await cache.get(Key(NS, "a"), counting(calls)) is not None
        assert calls == ["a"]
        assert cache.lookup.coordinator is None  # its populator has no lock to take


@pytest.mark.postgres
async def test_a_cache_hit_never_touches_the_lock(database_url: str) -> None:
    """A fresh coordinated cache reading an already-cached key neither computes nor tries
    the lock."""
    calls: list[str] = []
    async with fleetcache.open(database_url) as warm, fleetcache.open(database_url) as cold:
        await warm.get(Key(NS, "a"), counting(calls))
        assert await cold.get(Key(NS, "a"), counting(calls)) is not None
        assert calls == ["a"]
        assert cold.coordinator is not None
        stats = cold.coordinator.stats()
        assert stats["lock_won"] == stats["lock_lost"] == 0
        assert cold.lookup.stats()["hits"] == 1


@pytest.mark.postgres
async def test_hits_never_queue_behind_computations(database_url: str) -> None:
    """With a pool of 2 and 20 concurrent misses, all 20 computations run at once and a hit
    on a cached key is served while they still run: computing holds no pooled connection."""
    computing: list[str] = []
    release = asyncio.Event()

    async def held(key: Key) -> Produced[Any]:
        computing.append(key.name)
        await release.wait()
        return Produced(value={"name": key.name})

    async with fleetcache.open(database_url, pool_size=2) as cache:
        await cache.get(Key(NS, "cached"), counting([]))
        slow = [asyncio.create_task(cache.get(Key(NS, f"slow{i}"), held)) for i in range(20)]
        await eventually(lambda: len(computing) == 20)
        hit = await asyncio.wait_for(cache.get(Key(NS, "cached"), counting([])), 60)
        assert hit is not None
        assert not any(task.done() for task in slow)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*slow), 60)
        assert all(r is not None for r in results)


@pytest.mark.postgres
async def test_forged_notifications_do_not_make_a_waiter_give_up(database_url: str) -> None:
    """25 hand-sent "populated" NOTIFYs for a key (its lock id is public) while another
    process computes it: the waiter re-reads and retries each time, and still answers with
    the holder's result instead of giving up."""
    key = Key(NS, "forged")
    computing = asyncio.Event()
    release = asyncio.Event()

    async def held(k: Key) -> Produced[Any]:
        computing.set()
        await release.wait()
        return Produced(value="the holder's")

    async with (
        fleetcache.open(database_url) as holder,
        fleetcache.open(database_url, wait_timeout=30, max_rounds=1) as waiter,
    ):
        waiter_locks = waiter.coordinator
        assert waiter_locks is not None
        holding = asyncio.create_task(holder.get(key, held))
        await asyncio.wait_for(computing.wait(), PROMPT)  # the holder has the lock
        waiting = asyncio.create_task(waiter.get(key, held))

        def lost(times: int) -> Callable[[], bool]:
            # The waiter registers for the key's NOTIFY before it tries the lock, so once
            # it has lost ``times`` times it is listening for the next notification.
            return lambda: waiter_locks.stats()["lock_lost"] >= times

        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            for sent in range(25):
                await eventually(lost(sent + 1))
                await conn.execute(
                    "SELECT pg_notify(%s, %s)", (POPULATED_CHANNEL, str(lock_id(key.coalesce_key)))
                )
        await eventually(lost(26))  # woken by the last one, read, lost again: still waiting
        assert not waiting.done()
        release.set()
        got = await asyncio.wait_for(waiting, 60)
        assert got is not None
        assert got.value == "the holder's"
        assert (await holding) == got
        assert waiter_locks.stats()["woken_notify"] >= 10
        assert waiter.lookup.stats()["gave_up"] == 0


async def test_gives_up_after_the_waiting_budget_with_a_clear_error(tmp_path: Path) -> None:
    """A key whose holder never finishes makes a waiter give up once max_rounds *
    wait_timeout seconds have passed, with an error naming the key and the time waited."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    coordinator = LocalCoordinator()
    await coordinator.start()
    holder: CachingLookup[Any] = CachingLookup(store, coordinator=coordinator)
    waiter: CachingLookup[Any] = CachingLookup(
        store, coordinator=coordinator, options=LookupOptions(max_rounds=2, wait_timeout=0.2)
    )
    computing = asyncio.Event()
    release = asyncio.Event()

    async def forever(key: Key) -> Produced[Any]:
        computing.set()
        await release.wait()
        return Produced(value={})

    try:
        holding = asyncio.create_task(holder.get(Key("ns", "stuck"), forever))
        await asyncio.wait_for(computing.wait(), PROMPT)  # the holder has the lock
        started = time.monotonic()
        with pytest.raises(CoordinationGaveUpError) as raised:
            await waiter.get(Key("ns", "stuck"), forever)
        assert time.monotonic() - started >= 0.4
        assert '["ns","stuck","public",""]' in str(raised.value)
        assert "after waiting 0." in str(raised.value)
        assert "never finished" in str(raised.value)
        release.set()
        assert await holding is not None
    finally:
        await holder.close()
        await waiter.close()
        await coordinator.close()
        await store.close()


async def test_coordination_asked_for_on_memory_is_ignored_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On memory:// coordinate=True builds no coordinator and says so once per process."""
    monkeypatch.setattr("fleetcache.factory._ignored_logged", False)
    caplog.set_level("INFO", logger="fleetcache.factory")
    for _ in range(2):
        async with fleetcache.open("memory://", coordinate=True) as cache:
            assert cache.coordinator is None
    assert sum("ignored for memory" in r.getMessage() for r in caplog.records) == 1


async def test_open_refuses_an_unknown_url() -> None:
    """An unsupported URL scheme is a clear configuration error."""
    with pytest.raises(ConfigurationError, match="unsupported cache URL"):
        await fleetcache.open("redis://localhost")


async def test_the_front_door_is_awaitable_and_an_async_context_manager() -> None:
    """``await fleetcache.open(url)`` and ``async with fleetcache.open(url)`` both give a
    working cache; the awaited one is closed by its own close()."""
    produce = counting([])
    async with fleetcache.open("memory://") as cache:
        assert await cache.get_value(Key("ns", "a"), produce) == {"name": "a"}
    opened = await fleetcache.open("memory://")
    try:
        assert await opened.get_value(Key("ns", "a"), produce) == {"name": "a"}
    finally:
        await opened.close()
    with pytest.raises(fleetcache.NotOpenError):
        await opened.get(Key("ns", "b"), produce)


def test_star_import_does_not_shadow_the_builtin_open() -> None:
    """``from fleetcache import *`` exports no ``open``; ``fleetcache.open`` exists."""
    namespace: dict[str, Any] = {}
    exec("from fleetcache import *", namespace)  # noqa: S102 - the behaviour under test
    assert "open" not in namespace
    assert callable(fleetcache.open)


async def test_close_is_exception_safe_and_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A part whose close raises, and one whose close hangs, do not keep the other parts
    open: close() closes them all within its bound, then raises the first failure."""
    cache = await fleetcache.open(f"sqlite:///{tmp_path / 'c.db'}")

    async def broken(timeout: float) -> None:
        raise RuntimeError("this part cannot close")

    async def hangs(timeout: float) -> None:
        await asyncio.Event().wait()

    cache._closers[:0] = [("broken part", broken), ("hanging part", hangs)]
    with pytest.raises(RuntimeError, match="cannot close"):
        # The bound only keeps a hang (close waiting for the hanging part) from stalling.
        await asyncio.wait_for(cache.close(timeout=0.3), PROMPT)
    assert isinstance(cache.store, SqliteStore)
    with pytest.raises(fleetcache.NotOpenError):
        await cache.store.read(Key("ns", "a"))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "hanging part" in messages
    assert "broken part" in messages


async def test_bare_and_extension_requests_take_turns_on_one_lock(tmp_path: Path) -> None:
    """Concurrent coordinated requests for "x" (trying candidates) and "x.gts" share the
    alias family's lock, so x.gts is produced once and both get its row."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    coordinator = LocalCoordinator()
    await coordinator.start()
    lookup: CachingLookup[Any] = CachingLookup(store, coordinator=coordinator)
    calls: list[str] = []
    try:
        bare, explicit = await asyncio.gather(
            lookup.get(Key("ns", "x"), counting(calls, 0.2), candidates=["x.gts", "x"], alias="x"),
            lookup.get(Key("ns", "x.gts"), counting(calls, 0.2), alias="x"),
        )
        assert calls == ["x.gts"]
        assert bare == explicit
    finally:
        await lookup.close()
        await coordinator.close()
        await store.close()


async def test_many_waiters_for_a_missing_key_all_get_none(tmp_path: Path) -> None:
    """Six coordinated lookups (as six processes would) asking for a key that does not
    exist all answer None, none gives up with a coordination error."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    coordinator = LocalCoordinator()
    await coordinator.start()
    lookups: list[CachingLookup[Any]] = [
        CachingLookup(store, coordinator=coordinator) for _ in range(6)
    ]

    async def missing(key: Key) -> Missing:
        await asyncio.sleep(0.05)
        return MISSING

    try:
        results = await asyncio.gather(
            *(lookup.get(Key("ns", "gone"), missing) for lookup in lookups)
        )
        assert results == [None] * 6
        assert sum(lookup.stats()["gave_up"] for lookup in lookups) == 0
    finally:
        for lookup in lookups:
            await lookup.close()
        await coordinator.close()
        await store.close()


@pytest.mark.postgres
async def test_waiters_wake_as_the_winners_write_commits_before_its_release(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The winner's NOTIFY travels in its write's own transaction: a waiter in another
    process wakes, and finds the row, while the winner has not even released its lock."""
    async with fleetcache.open(database_url) as winner, fleetcache.open(database_url) as peer:
        assert winner.coordinator is not None
        released = asyncio.Event()
        hold_release = asyncio.Event()
        real_release = winner.coordinator._release

        async def held_release(*args: Any, **kwargs: Any) -> None:
            await hold_release.wait()
            await real_release(*args, **kwargs)
            released.set()

        monkeypatch.setattr(winner.coordinator, "_release", held_release)
        computing = asyncio.Event()

        async def produce(key: Key) -> Produced[Any]:
            computing.set()
            await asyncio.sleep(0.3)
            return Produced(value="done")

        first = asyncio.create_task(winner.get(Key(NS, "k"), produce))
        await computing.wait()
        second = await asyncio.wait_for(peer.get(Key(NS, "k"), produce), 20)
        assert second is not None
        assert second.value == "done"
        assert not released.is_set()
        assert peer.coordinator is not None
        assert peer.coordinator.stats()["woken_notify"] >= 1
        hold_release.set()
        assert await first == second


async def heard_for(cache: fleetcache.Fleetcache, heard: list[str], key: Key) -> int:
    """How many populated NOTIFYs for ``key``'s lock ``cache`` heard, once everything sent
    so far has arrived (a marker sent now is delivered after them)."""
    async with await psycopg.AsyncConnection.connect(cache.url, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify(%s, 'marker')", (POPULATED_CHANNEL,))
    await eventually(lambda: "marker" in heard)
    heard.remove("marker")
    return heard.count(str(lock_id(key.coalesce_key)))


@pytest.mark.postgres
async def test_one_notify_per_fill(database_url: str) -> None:
    """Each computation under the fleet's lock sends exactly one NOTIFY: the one its write
    carries when it stores, or its release's when it stores nothing (missing, an error
    not persisted, an exception); the coordinator counts one per won lock."""
    async with fleetcache.open(database_url) as cache:
        assert cache.hub is not None
        assert cache.coordinator is not None
        heard: list[str] = []
        cache.hub.add_handler(POPULATED_CHANNEL, heard.append)

        async def stores(key: Key) -> Produced[Any]:
            return Produced(value="v")

        async def missing(key: Key) -> Missing:
            return MISSING

        async def failing(key: Key) -> Produced[Any]:
            return Produced(value=None, error={"message": "broke"})

        async def raising(key: Key) -> Produced[Any]:
            raise LookupError("broke")

        filled = Key(NS, "filled")
        assert await cache.get(filled, stores) is not None
        assert await heard_for(cache, heard, filled) == 1
        assert await cache.get(Key(NS, "missing"), missing) is None
        assert await heard_for(cache, heard, Key(NS, "missing")) == 1
        assert await cache.get(Key(NS, "error"), failing, persist_errors=False) is None
        assert await heard_for(cache, heard, Key(NS, "error")) == 1
        with pytest.raises(LookupError):
            await cache.get(Key(NS, "raising"), raising)
        assert await heard_for(cache, heard, Key(NS, "raising")) == 1
        stats = cache.coordinator.stats()
        assert stats["notifies"] == stats["lock_won"] == 4


@pytest.mark.postgres
async def test_a_winner_that_finds_the_key_filled_releases_without_a_notify(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that missed, then won the lock after another process had filled the key
    and released it, answers with that fill and releases without a NOTIFY of its own: the
    filler's write announced the row, and anyone who tried the lock later read it before
    parking. One NOTIFY for the key in all."""
    key = Key(NS, "filled-meanwhile")
    async with fleetcache.open(database_url) as filler, fleetcache.open(database_url) as late:
        assert filler.hub is not None
        heard: list[str] = []
        filler.hub.add_handler(POPULATED_CHANNEL, heard.append)
        missed, go = asyncio.Event(), asyncio.Event()
        real_read = late.store.read

        async def gated_read(*args: Any, **kwargs: Any) -> Any:
            entry = await real_read(*args, **kwargs)
            if not missed.is_set():  # its first read: the miss
                missed.set()
                await go.wait()
            return entry

        monkeypatch.setattr(late.store, "read", gated_read)
        calls: list[str] = []
        second = asyncio.create_task(late.get(key, counting(calls)))
        async with asyncio.timeout(PROMPT):
            await missed.wait()
        first = await filler.get(key, counting(calls))  # computed, stored and released
        go.set()
        assert await asyncio.wait_for(second, PROMPT) == first
        assert calls == ["filled-meanwhile"]
        assert late.coordinator is not None
        assert late.coordinator.stats()["lock_won"] == 1
        assert await heard_for(filler, heard, key) == 1


@pytest.mark.postgres
async def test_a_loser_rereads_after_its_lost_try_and_needs_no_second_notify(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fill that commits (and notifies) after a peer's read missed but before the peer
    tries the lock is found by the peer's re-read after its lost try: the peer answers at
    once, while the winner still holds the lock, without waiting for any NOTIFY."""
    key = Key(NS, "reread")
    async with fleetcache.open(database_url) as winner, fleetcache.open(database_url) as peer:
        assert winner.coordinator is not None
        release = asyncio.Event()
        real_release = winner.coordinator._release

        async def held_release(*args: Any, **kwargs: Any) -> None:
            await release.wait()
            await real_release(*args, **kwargs)

        monkeypatch.setattr(winner.coordinator, "_release", held_release)
        produce_gate, written = asyncio.Event(), asyncio.Event()
        real_write = winner.store.write

        async def noted_write(*args: Any, **kwargs: Any) -> bool:
            ok = await real_write(*args, **kwargs)
            written.set()
            return ok

        monkeypatch.setattr(winner.store, "write", noted_write)
        peer_read, peer_gate = asyncio.Event(), asyncio.Event()
        real_read = peer.store.read

        peer_reads: list[Key] = []

        async def gated_read(key: Key, *args: Any, **kwargs: Any) -> Any:
            peer_reads.append(key)
            entry = await real_read(key, *args, **kwargs)
            if not peer_read.is_set():  # its first read: the miss
                peer_read.set()
                await peer_gate.wait()
            return entry

        monkeypatch.setattr(peer.store, "read", gated_read)

        async def produce(k: Key) -> Produced[Any]:
            await produce_gate.wait()
            return Produced(value="the winner's")

        first = asyncio.create_task(winner.get(key, produce))
        second = asyncio.create_task(peer.get(key, produce))
        async with asyncio.timeout(PROMPT):
            await peer_read.wait()  # the peer missed
            produce_gate.set()
            await written.wait()  # the winner's row and NOTIFY are committed; no release
        peer_gate.set()  # the peer tries the lock now: lost, while the winner holds it
        try:
            got = await asyncio.wait_for(second, PROMPT)
            assert got is not None
            assert got.value == "the winner's"
            assert peer.coordinator is not None
            assert peer.coordinator.stats()["lock_lost"] == 1
            assert not first.done()  # the winner has not released its lock yet
            # The re-read travelled with the try, on the session: the pooled read was
            # only the miss.
            assert peer_reads == [key]
        finally:
            release.set()
        assert await first == got


@pytest.mark.postgres
@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "libpq-before-14"])
async def test_a_won_try_stamps_and_reads_in_its_own_round_trip(
    database_url: str, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    """A coordinated miss on Postgres stamps and re-reads the key in the try-lock's round
    trip (after the try, on the session): the store's pooled stamp_and_read is not used,
    the key is computed once, and a hit answers it after. Where libpq has no pipeline mode
    the two statements go one after the other, with the same answers."""
    monkeypatch.setattr(hub_module, "_PIPELINE", pipeline)
    async with fleetcache.open(database_url) as cache:
        pooled_stamps: list[Key] = []
        real_stamp = cache.store.stamp_and_read

        async def counted_stamp(key: Key, *args: Any, **kwargs: Any) -> Any:
            pooled_stamps.append(key)
            return await real_stamp(key, *args, **kwargs)

        monkeypatch.setattr(cache.store, "stamp_and_read", counted_stamp)
        calls: list[str] = []
        first = await cache.get(Key(NS, "one-trip"), counting(calls))
        assert first is not None
        assert await cache.get(Key(NS, "one-trip"), counting(calls)) == first
        assert calls == ["one-trip"]
        assert pooled_stamps == []


@pytest.mark.postgres
async def test_a_try_whose_read_fails_gives_its_lock_back(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stamp-and-read sent with a try-lock fails after the try took the lock (no
    rollback gives a session lock back): the caller gets the error, and the lock is free
    at once for the next try, here or in another process."""
    from fleetcache.stores.postgres import StampAndRead

    key = Key(NS, "read-fails")
    async with fleetcache.open(database_url) as cache, fleetcache.open(database_url) as peer:
        real_statement = cache.store.stamp_and_read_statement

        def broken_statement(*args: Any, **kwargs: Any) -> StampAndRead:
            good = real_statement(*args, **kwargs)
            broken = good.query.replace("fleetcache_entries", "fleetcache_no_such_table", 1)
            return StampAndRead(good.key, good.names, broken, good.params, good.values)

        monkeypatch.setattr(cache.store, "stamp_and_read_statement", broken_statement)
        calls: list[str] = []
        with pytest.raises(fleetcache.FleetcacheError, match="no_such_table"):
            await cache.get(key, counting(calls))
        assert calls == []
        # The peer's try wins the lock at once (were it still held, it would wait).
        assert await asyncio.wait_for(peer.get(key, counting(calls)), PROMPT) is not None
        assert calls == ["read-fails"]
        assert peer.coordinator is not None
        assert peer.coordinator.stats()["lock_won"] == 1
