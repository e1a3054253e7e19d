"""One session per process: LISTEN and the fleet's advisory locks on the hub's one direct
connection, statements interleaved with its waits for notifications, the heartbeat that
keeps a busy session from the server's idle timeout, and what a lost session costs (its
locks and its LISTENs at once)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import fleetcache
from fleetcache import Key, Produced
from fleetcache.coordination.base import WakeReason, lock_id
from fleetcache.coordination.postgres import advisory_lock_tag
from fleetcache.errors import SessionLostError
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME, NotificationHub
from fleetcache_cli.shared import Fleet
from tcp_proxy import FreezableProxy
from waiting import eventually

pytestmark = pytest.mark.postgres

NS = "https://realm.example/"
Admin = psycopg.AsyncConnection[Any]


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[Admin]:
    """A plain connection to the test database."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


async def lock_holders(admin: Admin, coalesce_key: str) -> list[int]:
    """The pids of the backends holding ``coalesce_key``'s advisory lock."""
    classid, objid = advisory_lock_tag(lock_id(coalesce_key))
    cursor = await admin.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND classid::bigint = %s AND objid::bigint = %s",
        (classid, objid),
    )
    return [int(pid) for (pid,) in await cursor.fetchall()]


async def backends(admin: Admin) -> dict[str, int]:
    """This database's other backends, counted by application_name."""
    cursor = await admin.execute(
        "SELECT application_name, count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " GROUP BY application_name"
    )
    return {str(name): int(count) for name, count in await cursor.fetchall()}


def slow(started: asyncio.Event, release: asyncio.Event, value: str) -> Any:
    """A computation that says it started, then waits for ``release``."""

    async def produce(key: Key) -> Produced[str]:
        started.set()
        await release.wait()
        return Produced(value)

    return produce


async def test_a_process_holds_one_session_carrying_its_locks_and_its_listens(
    database_url: str, admin: Admin
) -> None:
    """While a key is computed, its lock is held by the session's backend — the one that
    LISTENs — and the process has exactly that session besides its pool; stats() says so
    (pool size, in use and idle; the session up, with its backend pid)."""
    started, release = asyncio.Event(), asyncio.Event()
    key = Key(NS, f"one-session-{uuid.uuid4().hex[:6]}")
    async with fleetcache.open(database_url, near=10, pool_size=4) as cache:
        assert cache.hub is not None
        computing = asyncio.create_task(cache.get(key, slow(started, release, "v")))
        await asyncio.wait_for(started.wait(), 20)
        assert await lock_holders(admin, key.coalesce_key) == [cache.hub.backend_pid]
        session = cache.stats()["connections"]["session"]
        assert session["up"]
        assert session["backend_pid"] == cache.hub.backend_pid
        counts = await backends(admin)
        pool = cache.stats()["connections"]["pool"]
        assert counts == {DEFAULT_APPLICATION_NAME: 1, "fleetcache": pool["size"]}, counts
        assert pool["max_size"] == 4
        assert pool["in_use"] + pool["idle"] == pool["size"]
        store = cache.store
        async with store.pool.connection():  # type: ignore[attr-defined]
            assert cache.stats()["connections"]["pool"]["in_use"] >= 1
        release.set()
        assert (await computing) is not None
        assert await lock_holders(admin, key.coalesce_key) == []
    async with fleetcache.open(database_url, coordinate=False) as plain:
        assert plain.stats()["connections"]["session"]["up"]


@pytest.mark.processes
async def test_a_lost_session_loses_its_locks_and_its_listens_at_once(
    database_url: str, admin: Admin
) -> None:
    """When the session backend of a process computing a key is terminated: the key's lock
    is gone on the server (a peer process takes it and computes the key itself), this
    process's waiters wake with GAP, its near tier stops serving what it held, and the
    winner's release only notifies (the lost lock is not released twice, nothing
    fails); the session comes back as a new generation."""
    from conn_worker import start

    with Fleet(1, name="test-member") as fleet:
        peer, ready = await start(fleet, 0, database_url, probe_interval=0.2, wait_timeout=60.0)
        assert ready["ready"], ready
        async with fleetcache.open(database_url, near=100, probe_interval=0.2) as cache:
            assert cache.hub is not None
            assert cache.coordinator is not None
            warm = Key(NS, f"warm-{uuid.uuid4().hex[:6]}")
            assert (await cache.get(warm, slow(asyncio.Event(), _set(), "warm"))) is not None
            hits = cache.lookup.stats()["near_hits"]
            assert (await cache.get(warm, slow(asyncio.Event(), _set(), "x"))) is not None
            assert cache.lookup.stats()["near_hits"] == hits + 1

            name = f"lost-{uuid.uuid4().hex[:6]}"
            key = Key(NS, name)
            started, release = asyncio.Event(), asyncio.Event()
            computing = asyncio.create_task(cache.get(key, slow(started, release, "mine")))
            await asyncio.wait_for(started.wait(), 20)
            # Another key held by another session, so that a waiter of this process parks.
            other = Key(NS, f"held-{uuid.uuid4().hex[:6]}")
            async with await psycopg.AsyncConnection.connect(
                database_url, autocommit=True
            ) as holder:
                await holder.execute("SELECT pg_advisory_lock(%s)", (lock_id(other.coalesce_key),))
                coordinator = cache.coordinator

                async def wait_for_other() -> WakeReason:
                    async with coordinator.lock(other.coalesce_key) as lock:
                        assert not lock.won
                        return await lock.wait(60)

                waiter = asyncio.create_task(wait_for_other())
                await eventually(cache.coordinator._registry.waiting.is_set)
                pid = cache.hub.backend_pid
                assert await lock_holders(admin, key.coalesce_key) == [pid]
                await admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
                assert (await asyncio.wait_for(waiter, 20)).value == "gap"
            # The lock went with the session: the peer computes the key meanwhile.
            answer = await peer.call(
                "get", timeout=60, ns=NS, name=name, compute_s=0.05, tag="peer"
            )
            assert answer["value"]["tag"] == "peer", answer
            await eventually(lambda: cache.hub is not None and cache.hub.connected)
            assert cache.hub.reconnects == 1
            assert cache.hub.generation == 2
            # The near tier was emptied: the warm key is read from the store again.
            hits = cache.lookup.stats()["near_hits"]
            assert (await cache.get(warm, slow(asyncio.Event(), _set(), "x"))) is not None
            assert cache.lookup.stats()["near_hits"] == hits
            release.set()
            await computing  # its write may be stored or not; its release must not fail
            assert cache.coordinator.stats()["notify_failures"] == 0
            assert await lock_holders(admin, key.coalesce_key) == []


def _set() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def test_notifications_are_not_lost_while_session_statements_run(
    database_url: str, admin: Admin
) -> None:
    """While 4 tasks run 100 lock statements each on the hub's session, 300 NOTIFYs sent
    from another connection all arrive, once each and in order, and every statement gets
    its own answer (its lock taken and given back on the session)."""
    got: list[str] = []
    async with NotificationHub(database_url, ["busy"]) as hub:
        hub.add_handler("busy", got.append)

        async def statements(task: int) -> None:
            for i in range(100):
                lid = task * 1000 + i
                row, _ = await hub.execute("SELECT pg_try_advisory_lock(%(id)s)", {"id": lid})
                assert row == (True,)
                row, _ = await hub.execute("SELECT pg_advisory_unlock(%(id)s)", {"id": lid})
                assert row == (True,)

        async def send() -> None:
            for i in range(300):
                await admin.execute("SELECT pg_notify('busy', %s)", (str(i),))

        await asyncio.gather(send(), *(statements(task) for task in range(4)))
        await eventually(lambda: len(got) >= 300)
        assert got == [str(i) for i in range(300)]
        assert (hub.gaps, hub.reconnects) == (0, 0)


@pytest.mark.slow  # waits out a timeout on purpose
async def test_a_session_with_notifications_flowing_still_sends_its_heartbeat(
    database_url: str, admin: Admin
) -> None:
    """With an idle bound of 2 s, a session that keeps receiving notifications (every
    50 ms, for 5 s) but runs no statement of its own still sends one often enough: the
    server never ends it as idle (no gap, the same backend throughout)."""
    got: list[str] = []
    async with NotificationHub(database_url, ["flow"]) as hub:
        hub.add_handler("flow", got.append)
        await hub.bound_idleness(2.0)
        pid = hub.backend_pid
        until = time.monotonic() + 5.0
        sent = 0
        while time.monotonic() < until:
            await admin.execute("SELECT pg_notify('flow', 'x')")
            sent += 1
            await asyncio.sleep(0.05)
        await eventually(lambda: len(got) >= sent)
        assert (hub.gaps, hub.reconnects, hub.backend_pid) == (0, 0, pid)


async def test_a_statement_on_a_frozen_session_fails_once_the_session_is_declared_dead(
    database_url: str,
) -> None:
    """A session statement whose network path freezes does not hang: when the hub
    declares the connection dead (its probe unanswered), the statement fails with
    SessionLostError, and after the thaw the hub reconnects and runs statements again."""
    async with (
        FreezableProxy(database_url) as proxy,
        NotificationHub(proxy.url(database_url), ["x"], reconnect_max_delay=0.5) as hub,
    ):
        assert (await hub.execute("SELECT 1"))[0] == (1,)
        assert proxy.freeze(DEFAULT_APPLICATION_NAME.encode()) == 1
        started = time.monotonic()
        with pytest.raises(SessionLostError):
            await hub.execute("SELECT 2", wait=0.5)
        assert time.monotonic() - started < 20
        assert not hub.connected
        proxy.thaw()
        await eventually(lambda: hub.connected)
        row, generation = await hub.execute("SELECT 3")
        assert (row, generation) == ((3,), 2)


@pytest.mark.slow  # waits out a timeout on purpose
async def test_a_miss_while_the_session_is_down_is_computed_without_the_lock(
    database_url: str,
) -> None:
    """While the session cannot be had (its path frozen, the pool fine), a miss does not
    fail: after a short wait for the session, the key is computed without the fleet's
    lock (counted as computed_unlocked) and stored, and its waiters are told through the
    pool."""
    async with (
        FreezableProxy(database_url) as proxy,
        fleetcache.open(proxy.url(database_url)) as cache,
    ):
        assert cache.coordinator is not None
        proxy.freeze(DEFAULT_APPLICATION_NAME.encode())
        key = Key(NS, f"unlocked-{uuid.uuid4().hex[:6]}")
        entry = await asyncio.wait_for(cache.get(key, slow(asyncio.Event(), _set(), "v")), 60)
        assert entry is not None
        assert entry.value == "v"
        stats = cache.coordinator.stats()
        assert stats["computed_unlocked"] == 1
        assert stats["notify_failures"] == 0
        assert await cache.peek(key) is not None
        proxy.thaw()
