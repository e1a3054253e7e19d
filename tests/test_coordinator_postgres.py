"""PostgresCoordinator against a real PostgreSQL: locks, NOTIFY wake-ups, the crash probe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from fleetcache.coordination import NOT_ACQUIRED, Acquired, WakeReason, lock_id
from fleetcache.coordination.postgres import (
    POPULATED_CHANNEL,
    PostgresCoordinator,
    advisory_lock_tag,
)
from fleetcache.errors import CoordinationError, NotOpenError
from fleetcache.notifications.hub import NotificationHub

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
            hub = NotificationHub(database_url, liveness_interval=0.5, reconnect_min_delay=0.05)
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


async def parked(coordinator: PostgresCoordinator, key: str, count: int = 1) -> None:
    """Return once ``count`` waiters of ``key`` are parked on ``coordinator``."""
    async with asyncio.timeout(PROMPT):
        while True:
            if len(coordinator._waiters.get(lock_id(key), ())) >= count:
                return
            await asyncio.sleep(0.01)


async def notify(conn: Conn, payload: str) -> None:
    """Send a populated NOTIFY by hand."""
    await conn.execute("SELECT pg_notify(%s, %s)", (POPULATED_CHANNEL, payload))


# --------------------------------------------------------------------------- winners


async def test_uncontended_winner_returns_result_and_wakes_peer_on_commit(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    """An uncontended winner runs fn on its connection, returns its result, and a peer's
    parked waiter wakes with NOTIFY and then sees the committed row."""
    caplog.set_level(logging.DEBUG, logger="fleetcache.coordination")
    a, b = await make_node(), await make_node()
    admin = await raw()
    await admin.execute("CREATE TABLE produced (k text PRIMARY KEY)")
    key = "realm|mod.gts|public|"
    waiter: asyncio.Task[WakeReason] | None = None

    async def fn(conn: Conn) -> str:
        nonlocal waiter
        async with conn.transaction():
            await conn.execute("INSERT INTO produced VALUES (%s)", (key,))
        waiter = asyncio.create_task(b.coordinator.wait_for_key(key, 60))
        await parked(b.coordinator, key)
        return "value"

    outcome = await a.coordinator.try_acquire_and_run(key, fn)

    assert outcome == Acquired("value")
    assert waiter is not None
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY
    async with b.pool.connection() as conn:
        rows = await (await conn.execute("SELECT k FROM produced")).fetchall()
    assert rows == [(key,)]
    assert a.coordinator.stats()["lock_won"] == 1
    assert b.coordinator.stats()["woken_notify"] == 1
    records = [r for r in caplog.records if r.name == "fleetcache.coordination"]
    assert records
    for record in records:
        assert getattr(record, "coalesce_key", "missing") in (key, None)
        if record.coalesce_key is not None:  # type: ignore[attr-defined]
            assert key in record.getMessage()


async def test_contended_loser_returns_not_acquired_without_running_fn(
    make_node: MakeNode,
) -> None:
    """While one coordinator holds a key, another's try returns NOT_ACQUIRED at once,
    never runs its fn, and gives its connection straight back."""
    a = await make_node()
    b = await make_node(max_size=1)
    key = "realm|busy.gts|public|"
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(conn: Conn) -> int:
        holding.set()
        await release.wait()
        return 1

    winner = asyncio.create_task(a.coordinator.try_acquire_and_run(key, hold))
    async with asyncio.timeout(PROMPT):
        await holding.wait()

    ran: list[object] = []

    async def must_not_run(conn: Conn) -> int:
        ran.append(conn)
        return 2

    async with asyncio.timeout(PROMPT):
        first = await b.coordinator.try_acquire_and_run(key, must_not_run)
        # With a pool of one, a second try (and a plain query) can only succeed if the
        # first gave its connection back.
        second = await b.coordinator.try_acquire_and_run(key, must_not_run)
        async with b.pool.connection() as conn:
            await conn.execute("SELECT 1")
    assert first is NOT_ACQUIRED
    assert second is NOT_ACQUIRED
    assert ran == []
    assert b.coordinator.stats()["lock_lost"] == 2

    release.set()
    async with asyncio.timeout(PROMPT):
        assert await winner == Acquired(1)
    assert await b.coordinator.try_acquire_and_run(key, must_not_run) == Acquired(2)


async def test_notify_between_lost_try_and_wait_is_not_lost(make_node: MakeNode) -> None:
    """A holder that commits after a peer's try-lock failed but before the peer's
    wait_for_key still wakes that wait with NOTIFY (not the probe, not the timeout)."""
    a, b = await make_node(), await make_node()
    key = "realm|gap.gts|public|"
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(conn: Conn) -> int:
        holding.set()
        await release.wait()
        return 1

    winner = asyncio.create_task(a.coordinator.try_acquire_and_run(key, hold))
    async with asyncio.timeout(PROMPT):
        await holding.wait()

    async def must_not_run(conn: Conn) -> int:
        raise AssertionError("the loser's fn ran")

    assert await b.coordinator.try_acquire_and_run(key, must_not_run) is NOT_ACQUIRED
    release.set()
    async with asyncio.timeout(PROMPT):
        assert await winner == Acquired(1)
        # Let the NOTIFY reach b (it wakes the waiter b registered before its try-lock)
        # before b starts waiting.
        for _ in range(int(PROMPT / 0.01)):
            if not b.coordinator._waiters.get(lock_id(key)):
                break
            await asyncio.sleep(0.01)
        reason = await b.coordinator.wait_for_key(key, 60)
    assert reason is WakeReason.NOTIFY
    assert b.coordinator._waiters == {}
    assert b.coordinator._pending == {}


async def test_repeated_lost_tries_leave_no_waiter_behind(make_node: MakeNode) -> None:
    """Lost tries that are never followed by a wait do not accumulate parked waiters."""
    a, b = await make_node(), await make_node()
    key = "realm|again.gts|public|"
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(conn: Conn) -> int:
        holding.set()
        await release.wait()
        return 1

    async def must_not_run(conn: Conn) -> int:
        raise AssertionError("the loser's fn ran")

    winner = asyncio.create_task(a.coordinator.try_acquire_and_run(key, hold))
    async with asyncio.timeout(PROMPT):
        await holding.wait()
    for _ in range(3):
        assert await b.coordinator.try_acquire_and_run(key, must_not_run) is NOT_ACQUIRED
    assert len(b.coordinator._waiters[lock_id(key)]) == 1
    release.set()
    async with asyncio.timeout(PROMPT):
        await winner


async def test_savepoint_guarded_failure_keeps_transaction_usable(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A failing query inside a savepoint in fn is caught, the lock's transaction stays
    usable, and fn's later writes commit."""
    a = await make_node()
    admin = await raw()
    await admin.execute("CREATE TABLE produced (k text PRIMARY KEY)")

    async def fn(conn: Conn) -> int:
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with conn.transaction():
                await conn.execute("SELECT 1/0")
        async with conn.transaction():
            await conn.execute("INSERT INTO produced VALUES ('after')")
        row = await (await conn.execute("SELECT 42")).fetchone()
        assert row is not None
        return int(row[0])

    assert await a.coordinator.try_acquire_and_run("k|sp|public|", fn) == Acquired(42)
    rows = await (await admin.execute("SELECT k FROM produced")).fetchall()
    assert rows == [("after",)]


@pytest.mark.parametrize("failure", ["driver", "python"])
async def test_failing_winner_raises_rolls_back_and_wakes_waiters_promptly(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], failure: str
) -> None:
    """When fn raises (an unguarded failing query, or any exception), the call re-raises
    it unchanged, the transaction is rolled back, the lock is free, and a peer waiting
    60 s wakes with NOTIFY well before that."""
    a, b = await make_node(), await make_node()
    admin = await raw()
    await admin.execute("CREATE TABLE produced (k text PRIMARY KEY)")
    key = f"realm|fails-{failure}.gts|public|"
    waiter: asyncio.Task[WakeReason] | None = None

    async def fn(conn: Conn) -> None:
        nonlocal waiter
        await conn.execute("INSERT INTO produced VALUES ('doomed')")
        waiter = asyncio.create_task(b.coordinator.wait_for_key(key, 60))
        await parked(b.coordinator, key)
        if failure == "driver":
            await conn.execute("SELECT 1/0")
        raise LookupError("the producer broke")

    expected = psycopg.errors.DivisionByZero if failure == "driver" else LookupError
    with pytest.raises(expected):
        await a.coordinator.try_acquire_and_run(key, fn)

    assert waiter is not None
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY
    assert await (await admin.execute("SELECT k FROM produced")).fetchall() == []

    async def ok(conn: Conn) -> str:
        return "recovered"

    assert await b.coordinator.try_acquire_and_run(key, ok) == Acquired("recovered")
    assert a.coordinator.stats()["notify_failures"] == 0


async def test_own_statement_failure_is_coordination_error_and_probe_wakes_peer(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], postgres_server_url: str
) -> None:
    """If the winner's session dies under it, the call raises CoordinationError (caused by
    the driver error), counts a failed notify, and the peer is woken by the probe."""
    a = await make_node()
    b = await make_node(probe_interval=0.2)
    admin = await raw(url=postgres_server_url)
    key = "realm|dies.gts|public|"
    waiter: asyncio.Task[WakeReason] | None = None

    async def fn(conn: Conn) -> str:
        nonlocal waiter
        waiter = asyncio.create_task(b.coordinator.wait_for_key(key, 60))
        await parked(b.coordinator, key)
        await admin.execute("SELECT pg_terminate_backend(%s, 10000)", (conn.info.backend_pid,))
        return "never committed"

    with pytest.raises(CoordinationError) as raised:
        await a.coordinator.try_acquire_and_run(key, fn)

    assert isinstance(raised.value.__cause__, psycopg.Error)
    assert key in str(raised.value)
    assert a.coordinator.stats()["notify_failures"] == 1
    assert waiter is not None
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.PROBE


async def test_cancelled_winner_rolls_back_and_wakes_waiters(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A winner cancelled in the middle of a query propagates the cancellation, frees
    the lock and wakes a peer's waiter with NOTIFY."""
    a, b = await make_node(max_size=1), await make_node()
    key = "realm|cancelled.gts|public|"
    querying = asyncio.Event()

    async def fn(conn: Conn) -> None:
        querying.set()
        await conn.execute("SELECT pg_sleep(60)")

    winner = asyncio.create_task(a.coordinator.try_acquire_and_run(key, fn))
    async with asyncio.timeout(PROMPT):
        await querying.wait()
    waiter = asyncio.create_task(b.coordinator.wait_for_key(key, 60))
    await parked(b.coordinator, key)

    winner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await winner

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY

    async def ok(conn: Conn) -> str:
        return "again"

    async with asyncio.timeout(PROMPT):  # the pool of one got its connection back
        assert await a.coordinator.try_acquire_and_run(key, ok) == Acquired("again")


async def test_five_distinct_winners_complete_on_a_pool_of_two(make_node: MakeNode) -> None:
    """Five concurrent winners on distinct keys all complete with a pool of two, each
    using only its own connection."""
    a = await make_node(max_size=2)

    async def fn(conn: Conn) -> int:
        await asyncio.sleep(0.05)
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        return int(row[0])

    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(
            *(a.coordinator.try_acquire_and_run(f"k|{i}|public|", fn) for i in range(5))
        )
    assert all(isinstance(o, Acquired) for o in outcomes)
    assert a.coordinator.stats() == {
        "lock_won": 5,
        "lock_lost": 0,
        "woken_notify": 0,
        "woken_timeout": 0,
        "woken_probe": 0,
        "woken_gap": 0,
        "woken_close": 0,
        "notify_failures": 0,
    }


# --------------------------------------------------------------------------- waiters


async def test_wait_wakes_on_hand_sent_notify(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A NOTIFY sent by hand on the populated channel with the key's lock id wakes it."""
    a = await make_node()
    sender = await raw()
    key = "coalesce-test-key"
    waiter = asyncio.create_task(a.coordinator.wait_for_key(key, 60))
    await parked(a.coordinator, key)

    await notify(sender, "4042284392742683263")

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY


async def test_wait_times_out_without_raising_and_leaves_no_waiter(make_node: MakeNode) -> None:
    """With no NOTIFY, a wait returns TIMEOUT (it does not raise) and removes itself."""
    a = await make_node()

    assert await a.coordinator.wait_for_key("k|quiet|public|", 0.2) is WakeReason.TIMEOUT

    assert a.coordinator._waiters == {}
    assert a.coordinator.stats()["woken_timeout"] == 1


async def test_cancelled_wait_leaves_no_waiter(make_node: MakeNode) -> None:
    """A cancelled wait propagates the cancellation and removes its waiter."""
    a = await make_node()
    key = "k|cancelled|public|"
    waiter = asyncio.create_task(a.coordinator.wait_for_key(key, 60))
    await parked(a.coordinator, key)

    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert a.coordinator._waiters == {}


async def test_notify_for_another_key_does_not_wake(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY for one key wakes that key's waiters only; a malformed payload is logged
    and ignored."""
    a = await make_node()
    sender = await raw()
    mine, other = "k|mine|public|", "k|other|public|"
    mine_waiter = asyncio.create_task(a.coordinator.wait_for_key(mine, 60))
    other_waiters = [asyncio.create_task(a.coordinator.wait_for_key(other, 60)) for _ in range(2)]
    await parked(a.coordinator, mine)
    await parked(a.coordinator, other, 2)

    await notify(sender, "not-a-lock-id")
    await notify(sender, str(lock_id(other)))
    async with asyncio.timeout(PROMPT):
        assert await asyncio.gather(*other_waiters) == [WakeReason.NOTIFY] * 2

    # Dispatch is in arrival order, so the malformed payload and the other key's NOTIFY
    # have both been handled by now.
    assert not mine_waiter.done()
    assert any("malformed" in r.getMessage() for r in caplog.records)
    await notify(sender, str(lock_id(mine)))
    async with asyncio.timeout(PROMPT):
        assert await mine_waiter is WakeReason.NOTIFY


async def test_close_wakes_parked_waiters_and_refuses_new_work(make_node: MakeNode) -> None:
    """close() wakes every parked waiter with CLOSE; afterwards waits return CLOSE at once,
    tries raise NotOpenError, close is idempotent, and the caller's pool stays open."""
    a = await make_node()
    waiters = [
        asyncio.create_task(a.coordinator.wait_for_key(key, 60))
        for key in ("k|1|public|", "k|1|public|", "k|2|public|")
    ]
    await parked(a.coordinator, "k|1|public|", 2)
    await parked(a.coordinator, "k|2|public|")

    await a.coordinator.close()

    async with asyncio.timeout(PROMPT):
        assert await asyncio.gather(*waiters) == [WakeReason.CLOSE] * 3
    assert await a.coordinator.wait_for_key("k|1|public|", 60) is WakeReason.CLOSE

    async def fn(conn: Conn) -> None:
        raise AssertionError("must not run")

    with pytest.raises(NotOpenError):
        await a.coordinator.try_acquire_and_run("k|1|public|", fn)
    await a.coordinator.close()
    assert a.coordinator.stats()["woken_close"] == 4
    assert a.coordinator._probe_task is None
    assert POPULATED_CHANNEL not in a.hub.channels
    async with a.pool.connection() as conn:
        await conn.execute("SELECT 1")


async def test_gap_on_the_listen_connection_wakes_waiters(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], postgres_server_url: str
) -> None:
    """When the hub's LISTEN connection is killed and comes back, every parked waiter
    wakes with GAP."""
    a = await make_node()
    admin = await raw(url=postgres_server_url)
    waiters = [
        asyncio.create_task(a.coordinator.wait_for_key(key, 60))
        for key in ("k|g1|public|", "k|g2|public|")
    ]
    await parked(a.coordinator, "k|g1|public|")
    await parked(a.coordinator, "k|g2|public|")
    async with a.pool.connection() as conn:
        row = await (await conn.execute("SELECT current_database()")).fetchone()
    assert row is not None

    killed = await admin.execute(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = 'fleetcache-notifications'",
        (row[0],),
    )
    assert await killed.fetchall() == [(True,)]

    async with asyncio.timeout(PROMPT):
        assert await asyncio.gather(*waiters) == [WakeReason.GAP] * 2
    assert a.hub.reconnects >= 1
    assert a.coordinator.stats()["woken_gap"] == 2


# --------------------------------------------------------------------------- lifecycle


async def test_use_before_start_raises_not_open(make_node: MakeNode) -> None:
    """A coordinator that was never started refuses to wait or to run."""
    a = await make_node(start=False)

    async def fn(conn: Conn) -> None:
        raise AssertionError("must not run")

    with pytest.raises(NotOpenError):
        await a.coordinator.wait_for_key("k|x|public|", 1)
    with pytest.raises(NotOpenError):
        await a.coordinator.try_acquire_and_run("k|x|public|", fn)


async def test_start_is_idempotent(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """Starting twice (also concurrently) subscribes once and runs one probe task."""
    a = await make_node(start=False)
    await asyncio.gather(a.coordinator.start(), a.coordinator.start())
    probe = a.coordinator._probe_task
    await a.coordinator.start()

    assert a.coordinator._probe_task is probe
    assert len(a.hub._subs[POPULATED_CHANNEL]) == 1
    sender = await raw()
    waiter = asyncio.create_task(a.coordinator.wait_for_key("k|idem|public|", 60))
    await parked(a.coordinator, "k|idem|public|")
    await notify(sender, str(lock_id("k|idem|public|")))
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY


async def test_close_during_start_leaves_nothing_behind(make_node: MakeNode) -> None:
    """close() while start() is still subscribing cancels it: start raises NotOpenError
    and no subscription or task is left."""
    a = await make_node(start=False)
    starting = asyncio.create_task(a.coordinator.start())
    async with asyncio.timeout(PROMPT):
        while True:
            if POPULATED_CHANNEL in a.hub.channels:
                break
            await asyncio.sleep(0)
    # start() is now parked in the hub's subscribe, waiting for its LISTEN.
    assert not starting.done()

    await a.coordinator.close()

    with pytest.raises(NotOpenError):
        await starting
    assert POPULATED_CHANNEL not in a.hub.channels
    assert a.coordinator._start_task is None
    assert a.coordinator._probe_task is None
    with pytest.raises(NotOpenError):
        await a.coordinator.start()


# --------------------------------------------------------------------------- crash probe


async def test_probe_wakes_waiter_when_holder_vanishes_without_notify(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]]
) -> None:
    """A lock held by another session keeps the waiter parked through several probes;
    when that session ends without a NOTIFY, the waiter wakes with PROBE."""
    a = await make_node(probe_interval=0.1)
    holder = await raw(autocommit=False)
    key = "realm|crashy.gts|public|"
    await holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id(key),))

    async def must_not_run(conn: Conn) -> None:
        raise AssertionError("must not run")

    assert await a.coordinator.try_acquire_and_run(key, must_not_run) is NOT_ACQUIRED
    waiter = asyncio.create_task(a.coordinator.wait_for_key(key, 60))
    await parked(a.coordinator, key)
    await asyncio.sleep(1.0)  # ten probe intervals with the lock held
    assert not waiter.done()

    await holder.close()  # the "crash": the lock goes, no NOTIFY is sent

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.PROBE
    assert a.coordinator.stats()["woken_probe"] == 1


async def test_probe_wakes_waiter_that_registered_after_release(make_node: MakeNode) -> None:
    """A waiter that parks after the holder already finished (its NOTIFY came too early)
    does not sleep out its timeout: the probe wakes it."""
    a = await make_node(probe_interval=0.1)

    async with asyncio.timeout(PROMPT):
        assert await a.coordinator.wait_for_key("k|late|public|", 60) is WakeReason.PROBE
    assert a.coordinator._waiters == {}


async def test_lock_id_maps_to_pg_locks_for_negative_and_positive_ids(
    make_node: MakeNode, raw: Callable[..., Awaitable[Conn]], postgres_server_url: str
) -> None:
    """advisory_lock_tag gives the (classid, objid) pg_locks shows for a bigint advisory
    lock, for negative and positive ids, and held_lock_ids finds exactly the held ones:
    not a two-int lock with the same halves, nor the same id in another database."""
    a = await make_node()
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
        lock_id("k|negative|public|"),
    ]
    assert lock_id("k|negative|public|") < 0
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
    target = lock_id("k|negative|public|")
    classid, objid = advisory_lock_tag(target)

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
    await elsewhere.execute("SELECT pg_advisory_xact_lock(%s)", (target,))
    assert await a.coordinator.held_lock_ids([target]) == set()


async def test_probe_does_not_judge_a_waiter_before_it_lost_the_try_lock(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a try is still on its way to the try-lock (here: its pool checkout held up),
    a free lock says nothing (we may take it ourselves): the probe leaves that try's early
    waiter alone, so after losing to a holder that came later, the wait ends on the
    holder's NOTIFY, not on a stale PROBE."""
    a = await make_node(probe_interval=0.1)
    b = await make_node()
    key = "realm|early.gts|public|"
    holding, release, checkout = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_getconn = a.pool.getconn
    held_up: list[bool] = []

    async def held_up_getconn(*args: Any, **kwargs: Any) -> Any:
        if not held_up:  # only the try's checkout; the probe's go through
            held_up.append(True)
            await checkout.wait()
        return await real_getconn(*args, **kwargs)

    monkeypatch.setattr(a.pool, "getconn", held_up_getconn)

    async def hold(conn: Conn) -> int:
        holding.set()
        await release.wait()
        return 1

    async def must_not_run(conn: Conn) -> int:
        raise AssertionError("the loser's fn ran")

    async def try_then_wait() -> WakeReason:
        assert await a.coordinator.try_acquire_and_run(key, must_not_run) is NOT_ACQUIRED
        return await a.coordinator.wait_for_key(key, 60)

    loser = asyncio.create_task(try_then_wait())
    await asyncio.sleep(0.5)  # several probe intervals with the lock free
    winner = asyncio.create_task(b.coordinator.try_acquire_and_run(key, hold))
    async with asyncio.timeout(PROMPT):
        await holding.wait()
    checkout.set()
    for _ in range(int(PROMPT / 0.01)):  # until a's try has run, and lost
        if a.coordinator.stats()["lock_lost"]:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # more probe intervals, now with the lock held
    release.set()
    async with asyncio.timeout(PROMPT):
        assert await winner == Acquired(1)
        assert await loser is WakeReason.NOTIFY
