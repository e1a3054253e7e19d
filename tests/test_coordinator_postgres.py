"""PostgresCoordinator against a real PostgreSQL: session locks on the process's session,
NOTIFY wake-ups, the crash probe, and no transaction held while a winner computes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from fleetcache.coordination.base import WakeReason, lock_id
from fleetcache.coordination.postgres import (
    LOCK_APPLICATION_NAME,
    POPULATED_CHANNEL,
    PostgresCoordinator,
    advisory_lock_tag,
)
from fleetcache.errors import NotOpenError
from fleetcache.notifications.hub import NotificationHub
from waiting import eventually

pytestmark = pytest.mark.postgres

Conn = psycopg.AsyncConnection[Any]

# Generous bounds for things that should happen "at once" or "within a probe interval":
# they keep a broken build from hanging, they do not measure speed.
PROMPT = 20.0
# A probe interval long enough that the probe never wakes anyone during a test that
# asserts another reason.
NO_PROBE = 600.0


@dataclass
class Node:
    """One simulated process: its own pool, hub and coordinator on the shared database."""

    coordinator: PostgresCoordinator
    pool: AsyncConnectionPool[Any]
    hub: NotificationHub


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(database_url: str) -> AsyncIterator[MakeNode]:
    """A factory of started nodes on the test database, all closed at the end."""
    async with AsyncExitStack() as stack:

        async def make(
            *, probe_interval: float = NO_PROBE, max_size: int = 4, start: bool = True
        ) -> Node:
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                database_url,
                min_size=1,
                max_size=max_size,
                kwargs={"autocommit": True},
                open=False,
            )
            await pool.open()
            stack.push_async_callback(pool.close)
            hub = NotificationHub(
                database_url, [POPULATED_CHANNEL], liveness_interval=0.5, reconnect_min_delay=0.05
            )
            await hub.start()
            stack.push_async_callback(hub.close)
            coordinator = PostgresCoordinator(pool, hub, probe_interval=probe_interval)
            if start:
                await coordinator.start()
            stack.push_async_callback(coordinator.close)
            return Node(coordinator, pool, hub)

        yield make


@pytest.fixture
async def raw(database_url: str) -> AsyncIterator[Callable[..., Awaitable[Conn]]]:
    """A factory of plain connections to the test database, closed at the end."""
    async with AsyncExitStack() as stack:

        async def connect(*, autocommit: bool = True, url: str = database_url) -> Conn:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=autocommit)
            stack.push_async_callback(conn.close)
            return conn

        yield connect


def waiting(coordinator: PostgresCoordinator, key: str) -> int:
    """How many waiters are parked on ``key``."""
    return len(coordinator._registry._waiters.get(lock_id(key), ()))


async def parked(coordinator: PostgresCoordinator, key: str, count: int = 1) -> None:
    """Return once ``count`` waiters of ``key`` are parked on ``coordinator``."""
    await eventually(lambda: waiting(coordinator, key) >= count)


async def notify(conn: Conn, payload: str) -> None:
    """Send a populated NOTIFY by hand."""
    await conn.execute("SELECT pg_notify(%s, %s)", (POPULATED_CHANNEL, payload))


async def hold(
    coordinator: PostgresCoordinator,
    key: str,
    release: asyncio.Event,
    started: asyncio.Event | None = None,
) -> int:
    """Win ``key``'s lock and hold it until ``release`` is set; 1 once released."""
    async with coordinator.lock(key) as lock:
        assert lock.won
        if started is not None:
            started.set()
        await release.wait()
    return 1


async def lose_and_wait(coordinator: PostgresCoordinator, key: str, timeout: float) -> WakeReason:
    """Lose ``key``'s lock (someone holds it) and wait for its holder."""
    async with coordinator.lock(key) as lock:
        assert not lock.won
        return await lock.wait(timeout)


async def try_once(coordinator: PostgresCoordinator, key: str) -> bool:
    """Whether ``key``'s lock is won now (given back at once if it is)."""
    async with coordinator.lock(key) as lock:
        return lock.won


async def held_elsewhere(raw: Callable[..., Awaitable[Conn]], *keys: str) -> Conn:
    """A session of "another process" holding the session locks of ``keys``."""
    holder = await raw()
    for key in keys:
        await holder.execute("SELECT pg_advisory_lock(%s)", (lock_id(key),))
    return holder


# --------------------------------------------------------------------------- winners


async def test_uncontended_winner_holds_the_lock_and_wakes_peer_after_its_write(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    """A winner writes and commits on a connection of its own while it holds the lock; the
    peer's waiter wakes with NOTIFY only after that (the release's NOTIFY: the write sent
    none), and then sees the row; every record names its key field."""
    caplog.set_level(logging.DEBUG, logger="fleetcache.coordination")
    a, b = await make_node(), await make_node()
    writer = await raw()
    await writer.execute("CREATE TABLE produced (k text PRIMARY KEY)")
    key = '["realm","mod.gts","public",""]'

    async with a.coordinator.lock(key) as lock:
        assert lock.won
        assert lock.notify == (POPULATED_CHANNEL, str(lock_id(key)))
        waiter = asyncio.create_task(lose_and_wait(b.coordinator, key, 60))
        await parked(b.coordinator, key)
        await writer.execute("INSERT INTO produced VALUES (%s)", (key,))

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY
    async with b.pool.connection() as conn:
        rows = await (await conn.execute("SELECT k FROM produced")).fetchall()
    assert rows == [(key,)]
    assert a.coordinator.stats()["lock_won"] == 1
    assert a.coordinator.stats()["notifies"] == 1
    assert b.coordinator.stats()["woken_notify"] == 1
    records = [r for r in caplog.records if r.name == "fleetcache.coordination"]
    assert records
    assert all(hasattr(r, "coalesce_key") for r in records)


async def test_a_winner_whose_write_notified_releases_without_a_second_notify(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A winner whose write carried the lock's NOTIFY in its own transaction (and said so)
    wakes the peer's waiter with that NOTIFY as the write commits, before its release; the
    release then only unlocks: the channel carries one NOTIFY for the fill, not two."""
    a, b = await make_node(), await make_node()
    writer = await raw()
    await writer.execute("CREATE TABLE produced (k text PRIMARY KEY)")
    key = '["realm","once.gts","public",""]'
    heard: list[str] = []
    b.hub.add_handler(POPULATED_CHANNEL, heard.append)

    async with a.coordinator.lock(key) as lock:
        assert lock.won
        assert lock.notify is not None
        waiter = asyncio.create_task(lose_and_wait(b.coordinator, key, 60))
        await parked(b.coordinator, key)
        async with writer.transaction():  # a write carrying the NOTIFY, as Store.write does
            await writer.execute("INSERT INTO produced VALUES (%s)", (key,))
            await writer.execute("SELECT pg_notify(%s, %s)", lock.notify)
        lock.notified = True
        async with asyncio.timeout(PROMPT):
            assert await waiter is WakeReason.NOTIFY  # woken while the lock is still held

    # A marker sent after the release: a NOTIFY the release sent would be heard before it.
    await notify(writer, "marker")
    await eventually(lambda: "marker" in heard)
    assert heard == [str(lock_id(key)), "marker"]
    assert a.coordinator.stats()["notifies"] == 1
    assert await try_once(b.coordinator, key)  # and the lock was given back


async def test_contended_loser_waits_without_using_the_pool(make_node: MakeNode) -> None:
    """While one process holds a key, another's tries lose at once and take no pooled
    connection (its pool of one stays held elsewhere throughout); once released, it wins."""
    a = await make_node()
    b = await make_node(max_size=1)
    key = '["realm","busy.gts","public",""]'
    release, started = asyncio.Event(), asyncio.Event()
    winner = asyncio.create_task(hold(a.coordinator, key, release, started))
    async with asyncio.timeout(PROMPT):
        await started.wait()
        async with b.pool.connection():  # the only pooled connection, held throughout
            assert not await try_once(b.coordinator, key)
            assert not await try_once(b.coordinator, key)
    assert waiting(b.coordinator, key) == 0
    assert b.coordinator.stats()["lock_lost"] == 2

    release.set()
    async with asyncio.timeout(PROMPT):
        assert await winner == 1
    assert await try_once(b.coordinator, key)


async def test_notify_between_lost_try_and_wait_is_not_lost(make_node: MakeNode) -> None:
    """A holder that finishes after a peer's try-lock failed but before the peer waits
    still wakes that wait with NOTIFY (not the probe, not the timeout)."""
    a, b = await make_node(), await make_node()
    key = '["realm","gap.gts","public",""]'
    release, started = asyncio.Event(), asyncio.Event()
    winner = asyncio.create_task(hold(a.coordinator, key, release, started))
    async with asyncio.timeout(PROMPT):
        await started.wait()
    async with b.coordinator.lock(key) as lost:
        assert not lost.won
        release.set()
        async with asyncio.timeout(PROMPT):
            assert await winner == 1
            await eventually(lambda: not waiting(b.coordinator, key))  # NOTIFY came first
            assert await lost.wait(60) is WakeReason.NOTIFY
    assert waiting(b.coordinator, key) == 0


async def test_no_transaction_and_no_snapshot_is_held_while_a_winner_computes(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], database_url: str
) -> None:
    """While a winner computes, none of the process's connections is in a transaction or
    pins the xmin horizon; only its session connection holds the key's (session) lock."""
    a = await make_node()
    observer = await raw()
    key = '["realm","long.gts","public",""]'
    async with a.coordinator.lock(key) as lock:
        assert lock.won
        seen = await (
            await observer.execute(
                "SELECT application_name, state, backend_xmin IS NOT NULL"
                " FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
        ).fetchall()
    assert seen
    assert all(state != "idle in transaction" and not xmin for _, state, xmin in seen), seen
    assert LOCK_APPLICATION_NAME in {name for name, _, _ in seen}


@pytest.mark.slow
async def test_a_winner_outlives_idle_in_transaction_session_timeout_and_keeps_its_lock(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], database_url: str
) -> None:
    """With idle_in_transaction_session_timeout shorter than the computation, the winner
    still completes, and a peer cannot take the key's lock while it computes."""
    admin = await raw()
    row = await (await admin.execute("SELECT current_database()")).fetchone()
    assert row is not None
    await admin.execute(
        psycopg.sql.SQL("ALTER DATABASE {} SET idle_in_transaction_session_timeout = 200").format(
            psycopg.sql.Identifier(row[0])
        )
    )
    a, b = await make_node(), await make_node()
    key = '["realm","slow.gts","public",""]'
    peer_won: list[bool] = []
    async with a.coordinator.lock(key) as lock:
        assert lock.won
        for _ in range(4):  # 1.2 s in all, six times the timeout
            await asyncio.sleep(0.3)
            peer_won.append(await try_once(b.coordinator, key))
    assert peer_won == [False] * 4


async def test_two_keys_of_one_lock_id_in_one_process_take_turns(make_node: MakeNode) -> None:
    """Two tasks of one process on the same lock id (an alias family): the second loses
    locally, though a session lock is re-entrant, and wakes when the first releases."""
    a = await make_node()
    key = '["realm","x","public",""]'
    release, started = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(hold(a.coordinator, key, release, started))
    async with asyncio.timeout(PROMPT):
        await started.wait()
    async with a.coordinator.lock(key) as second:
        assert not second.won
        release.set()
        async with asyncio.timeout(PROMPT):
            assert await first == 1
            assert await second.wait(60) is WakeReason.NOTIFY


@pytest.mark.parametrize("how", ["raises", "cancelled"])
async def test_failing_or_cancelled_winner_releases_and_wakes_waiters_promptly(
    make_node: MakeNode, how: str
) -> None:
    """When the winner's block raises (or its task is cancelled) the exception propagates,
    the lock is free, and a peer waiting 60 s wakes with NOTIFY well before that."""
    a, b = await make_node(), await make_node()
    key = f'["realm","fails-{how}.gts","public",""]'
    started, fail = asyncio.Event(), asyncio.Event()

    async def broken() -> None:
        async with a.coordinator.lock(key) as lock:
            assert lock.won
            started.set()
            await fail.wait()
            raise LookupError("the producer broke")

    winner = asyncio.create_task(broken())
    async with asyncio.timeout(PROMPT):
        await started.wait()
    waiter = asyncio.create_task(lose_and_wait(b.coordinator, key, 60))
    await parked(b.coordinator, key)
    if how == "raises":
        fail.set()
        with pytest.raises(LookupError):
            await winner
    else:
        winner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await winner
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY
    assert await try_once(b.coordinator, key)
    assert a.coordinator.stats()["notify_failures"] == 0


async def test_a_lost_lock_connection_still_notifies_and_the_next_try_reconnects(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], postgres_server_url: str
) -> None:
    """If the session connection is terminated while a winner computes, the server frees
    the lock (a peer may take it), the winner's computation still completes, its waiters
    are still notified, and the next try works on the new session connection."""
    a, b = await make_node(), await make_node()
    admin = await raw(url=postgres_server_url)
    key = '["realm","dies.gts","public",""]'
    async with a.coordinator.lock(key) as lock:
        assert lock.won
        pid = a.hub.backend_pid
        assert pid is not None
        await admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        # A peer that has just lost its try (the lock may already be free on the server).
        waiter = b.coordinator._registry.register(key, lock_id(key))
    async with asyncio.timeout(PROMPT):
        assert await waiter.wait(60) is WakeReason.NOTIFY
    assert await try_once(a.coordinator, key)
    assert a.coordinator.stats()["notify_failures"] == 0


async def test_a_try_cancelled_during_its_statement_leaves_no_lock_behind(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """Cancelling a try while its try-lock statement is on the wire does not leave the lock
    held for nobody: it is given back, and another process can win the key."""
    a, b = await make_node(), await make_node()
    key = '["realm","cancel-try.gts","public",""]'
    for _ in range(20):
        task = asyncio.create_task(try_once(a.coordinator, key))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # won and given back, lost to an earlier try still finishing, or cancelled

    async def win_eventually() -> None:
        while True:
            async with b.coordinator.lock(key) as lock:
                if lock.won:
                    return
                await lock.wait(0.1)

    async with asyncio.timeout(PROMPT):
        await win_eventually()
    await eventually(lambda: not a.coordinator._held)


async def test_winners_hold_no_pooled_connection(make_node: MakeNode) -> None:
    """Five concurrent winners, each running a pooled query while holding its lock,
    complete with a pool of one: winners borrow the pool only for their own statements."""
    a = await make_node(max_size=1)

    async def win(key: str) -> int:
        async with a.coordinator.lock(key) as lock:
            assert lock.won
            await asyncio.sleep(0.05)
            async with a.pool.connection() as conn:
                row = await (await conn.execute("SELECT 1")).fetchone()
        assert row is not None
        return int(row[0])

    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(*(win(f'["k","{i}","public",""]') for i in range(5)))
    assert outcomes == [1] * 5
    assert a.coordinator.stats()["lock_won"] == 5


# --------------------------------------------------------------------------- waiters


async def test_wait_wakes_on_hand_sent_notify(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A NOTIFY sent by hand on the populated channel with the key's lock id wakes its
    waiter (the key is held by another session meanwhile)."""
    a = await make_node()
    sender = await raw()
    key = "coalesce-test-key"
    await held_elsewhere(raw, key)
    waiter = asyncio.create_task(lose_and_wait(a.coordinator, key, 60))
    await parked(a.coordinator, key)

    await notify(sender, "4042284392742683263")

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY


async def test_wait_times_out_without_raising_and_leaves_no_waiter(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """With no NOTIFY, a wait returns TIMEOUT (it does not raise) and removes itself."""
    a = await make_node()
    key = '["k","quiet","public",""]'
    await held_elsewhere(raw, key)
    assert await lose_and_wait(a.coordinator, key, 0.2) is WakeReason.TIMEOUT
    assert waiting(a.coordinator, key) == 0
    assert a.coordinator.stats()["woken_timeout"] == 1


async def test_cancelled_wait_leaves_no_waiter(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A cancelled wait propagates the cancellation and removes its waiter."""
    a = await make_node()
    key = '["k","cancelled","public",""]'
    await held_elsewhere(raw, key)
    waiter = asyncio.create_task(lose_and_wait(a.coordinator, key, 60))
    await parked(a.coordinator, key)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert waiting(a.coordinator, key) == 0


async def test_notify_for_another_key_does_not_wake(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY for one key wakes that key's waiters only; a malformed payload is logged
    and ignored."""
    a = await make_node()
    sender = await raw()
    mine, other = '["k","mine","public",""]', '["k","other","public",""]'
    await held_elsewhere(raw, mine, other)
    mine_waiter = asyncio.create_task(lose_and_wait(a.coordinator, mine, 60))
    other_waiters = [asyncio.create_task(lose_and_wait(a.coordinator, other, 60)) for _ in range(2)]
    await parked(a.coordinator, mine)
    await parked(a.coordinator, other, 2)

    await notify(sender, "not-a-lock-id")
    await notify(sender, str(lock_id(other)))
    async with asyncio.timeout(PROMPT):
        assert await asyncio.gather(*other_waiters) == [WakeReason.NOTIFY] * 2
    # Dispatch is in arrival order: the malformed payload was handled before.
    assert not mine_waiter.done()
    assert any("malformed" in r.getMessage() for r in caplog.records)
    await notify(sender, str(lock_id(mine)))
    async with asyncio.timeout(PROMPT):
        assert await mine_waiter is WakeReason.NOTIFY


async def test_close_wakes_parked_waiters_and_refuses_new_work(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """close() wakes every parked waiter with CLOSE; afterwards tries raise NotOpenError,
    close is idempotent, and the caller's pool stays open."""
    a = await make_node()
    keys = ('["k","1","public",""]', '["k","1","public",""]', '["k","2","public",""]')
    await held_elsewhere(raw, *set(keys))
    waiters = [asyncio.create_task(lose_and_wait(a.coordinator, key, 60)) for key in keys]
    await parked(a.coordinator, keys[0], 2)
    await parked(a.coordinator, keys[2])

    await a.coordinator.close()

    async with asyncio.timeout(PROMPT):
        assert await asyncio.gather(*waiters) == [WakeReason.CLOSE] * 3
    with pytest.raises(NotOpenError):
        await try_once(a.coordinator, keys[0])
    await a.coordinator.close()
    assert a.coordinator.stats()["woken_close"] == 3
    assert not a.coordinator._tasks
    assert not a.coordinator._held
    async with a.pool.connection() as conn:
        await conn.execute("SELECT 1")


async def test_gap_on_the_listen_connection_wakes_waiters(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], postgres_server_url: str
) -> None:
    """When the hub's LISTEN connection is killed and comes back, every parked waiter
    wakes with GAP."""
    a = await make_node()
    admin = await raw(url=postgres_server_url)
    keys = ('["k","g1","public",""]', '["k","g2","public",""]')
    await held_elsewhere(raw, *keys)
    waiters = [asyncio.create_task(lose_and_wait(a.coordinator, key, 60)) for key in keys]
    for key in keys:
        await parked(a.coordinator, key)
    pid = a.hub.backend_pid
    assert pid is not None
    await admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    async with asyncio.timeout(PROMPT):
        assert await asyncio.gather(*waiters) == [WakeReason.GAP] * 2
    assert a.hub.reconnects >= 1
    assert a.coordinator.stats()["woken_gap"] == 2


# --------------------------------------------------------------------------- lifecycle


async def test_use_before_start_raises_not_open(make_node: MakeNode) -> None:
    """A coordinator that was never started refuses to lock."""
    a = await make_node(start=False)
    with pytest.raises(NotOpenError):
        await try_once(a.coordinator, '["k","x","public",""]')


async def test_start_is_idempotent(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """Starting twice (also concurrently) registers once and runs one probe task (the
    session's heartbeat is the hub's); a NOTIFY wakes a waiter exactly once."""
    a = await make_node(start=False)
    await asyncio.gather(a.coordinator.start(), a.coordinator.start())
    await a.coordinator.start()
    names = sorted(task.get_name() for task in a.coordinator._tasks)
    assert names == ["fleetcache coordinator probe"]
    sender = await raw()
    key = '["k","idem","public",""]'
    await held_elsewhere(raw, key)
    waiter = asyncio.create_task(lose_and_wait(a.coordinator, key, 60))
    await parked(a.coordinator, key)
    await notify(sender, str(lock_id(key)))
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY
    assert a.coordinator.stats()["woken_notify"] == 1


async def test_close_during_start_leaves_nothing_behind(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while start() is still configuring the session cancels it: start raises
    NotOpenError and no task is left."""
    a = await make_node(start=False)
    connecting = asyncio.Event()

    async def slow_bound(*args: Any, **kwargs: Any) -> Any:
        connecting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(a.hub, "bound_idleness", slow_bound)
    starting = asyncio.create_task(a.coordinator.start())
    async with asyncio.timeout(PROMPT):
        await connecting.wait()
    await a.coordinator.close()
    with pytest.raises(NotOpenError):
        await starting
    assert not a.coordinator._tasks
    with pytest.raises(NotOpenError):
        await a.coordinator.start()


# --------------------------------------------------------------------------- crash probe


async def test_probe_wakes_waiter_when_holder_vanishes_without_notify(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A lock held by another session keeps the waiter parked through several probes;
    when that session ends without a NOTIFY, the waiter wakes with PROBE."""
    a = await make_node(probe_interval=0.1)
    key = '["realm","crashy.gts","public",""]'
    holder = await held_elsewhere(raw, key)
    waiter = asyncio.create_task(lose_and_wait(a.coordinator, key, 60))
    await parked(a.coordinator, key)
    await asyncio.sleep(1.0)  # ten probe intervals with the lock held
    assert not waiter.done()

    await holder.close()  # the "crash": the lock goes, no NOTIFY is sent

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.PROBE
    assert a.coordinator.stats()["woken_probe"] == 1


async def test_probe_wakes_a_waiter_whose_holder_released_without_notifying(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A holder that gives its lock back without a NOTIFY (as a winner does whose write
    already notified, before this waiter registered) does not leave the waiter to sleep
    out its timeout: the probe finds the lock free and wakes it."""
    a = await make_node(probe_interval=0.1)
    key = '["k","late","public",""]'
    holder = await held_elsewhere(raw, key)
    waiter = asyncio.create_task(lose_and_wait(a.coordinator, key, 60))
    await parked(a.coordinator, key)
    await holder.execute("SELECT pg_advisory_unlock(%s)", (lock_id(key),))
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.PROBE
    assert waiting(a.coordinator, key) == 0


async def test_lock_id_maps_to_pg_locks_for_negative_and_positive_ids(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], postgres_server_url: str
) -> None:
    """advisory_lock_tag gives the (classid, objid) pg_locks shows for a bigint advisory
    lock, for negative and positive ids, and held_lock_ids finds exactly the held ones:
    not a two-int lock with the same halves, nor the same id in another database."""
    a = await make_node()
    negative = lock_id('["k","negative","public",""]')
    ids = [
        -(2**63),
        -(2**32),
        -(2**31),
        -1,
        0,
        1,
        2**31,
        2**32 + 7,
        0x7FFF_FFFF_8000_0001,
        2**63 - 1,
        lock_id("coalesce-test-key"),
        negative,
    ]
    assert negative < 0
    assert advisory_lock_tag(-1) == (0xFFFF_FFFF, 0xFFFF_FFFF)
    assert advisory_lock_tag(2**32 + 7) == (1, 7)
    holder = await raw(autocommit=False)
    for lid in ids:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (lid,))
    rows = await (
        await holder.execute(
            "SELECT classid::bigint, objid::bigint FROM pg_locks"
            " WHERE locktype = 'advisory' AND objsubid = 1 AND pid = pg_backend_pid()"
        )
    ).fetchall()
    assert sorted(rows) == sorted(advisory_lock_tag(lid) for lid in ids)

    unheld = [5, -5, 2**40]
    assert await a.coordinator.held_lock_ids(ids + unheld) == set(ids)

    await holder.rollback()
    assert await a.coordinator.held_lock_ids(ids) == set()

    # Same halves as a two-int lock (objsubid 2), and the same bigint in another
    # database: neither is the coordinator's lock.
    classid, objid = advisory_lock_tag(negative)

    def int4(u: int) -> int:
        return u - 2**32 if u >= 2**31 else u

    await holder.execute(
        "SELECT pg_advisory_xact_lock(%s::int4, %s::int4)", (int4(classid), int4(objid))
    )
    two_int = await (
        await holder.execute(
            "SELECT classid::bigint, objid::bigint FROM pg_locks"
            " WHERE locktype = 'advisory' AND objsubid = 2 AND pid = pg_backend_pid()"
        )
    ).fetchall()
    assert two_int == [(classid, objid)]
    elsewhere = await raw(url=postgres_server_url, autocommit=False)
    await elsewhere.execute("SELECT pg_advisory_xact_lock(%s)", (negative,))
    assert await a.coordinator.held_lock_ids([negative]) == set()


async def test_probe_does_not_judge_a_waiter_before_it_lost_the_try_lock(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a try is still on its way to the try-lock (here: held up before its
    statement), a free lock says nothing (we may take it ourselves): the probe leaves that
    try's early waiter alone, so after losing to a holder that came later, the wait ends
    on the holder's NOTIFY, not on a stale PROBE."""
    a = await make_node(probe_interval=0.1)
    b = await make_node()
    key = '["realm","early.gts","public",""]'
    release, started, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    line = a.coordinator._line(lock_id(key))
    real_statement = line.statements

    async def held_up(*args: Any, **kwargs: Any) -> Any:
        await go.wait()
        return await real_statement(*args, **kwargs)

    monkeypatch.setattr(line, "statements", held_up)

    loser = asyncio.create_task(lose_and_wait(a.coordinator, key, 60))
    await asyncio.sleep(0.5)  # several probe intervals with the lock free
    winner = asyncio.create_task(hold(b.coordinator, key, release, started))
    async with asyncio.timeout(PROMPT):
        await started.wait()
    go.set()
    await eventually(lambda: a.coordinator.stats()["lock_lost"])
    await asyncio.sleep(0.3)  # more probe intervals, now with the lock held
    release.set()
    async with asyncio.timeout(PROMPT):
        assert await winner == 1
        assert await loser is WakeReason.NOTIFY
