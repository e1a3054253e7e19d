"""The notification hub against a real Postgres: delivery, lifecycle and reconnects."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from fleetcache.errors import NotificationError, NotOpenError
from fleetcache.notifications import NotificationHub
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME

pytestmark = pytest.mark.postgres

WAIT = 10.0  # generous bound on any wait; never an assertion about speed


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


async def hub_backends(admin: psycopg.AsyncConnection[tuple[object, ...]]) -> list[int]:
    """Backend pids of hub connections to the admin connection's database."""
    cur = await admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = %s AND pid <> pg_backend_pid()",
        (DEFAULT_APPLICATION_NAME,),
    )
    return [int(row[0]) for row in await cur.fetchall()]  # type: ignore[call-overload]


async def wait_for_backends(
    admin: psycopg.AsyncConnection[tuple[object, ...]], count: int
) -> list[int]:
    """Wait until exactly ``count`` hub backends exist (exiting backends take a moment)."""
    deadline = time.monotonic() + WAIT
    while True:
        pids = await hub_backends(admin)
        if len(pids) == count:
            return pids
        if time.monotonic() > deadline:
            pytest.fail(f"expected {count} hub backend(s), found {pids}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """An autocommit connection to the test database, to NOTIFY and inspect from."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def notify(
    admin: psycopg.AsyncConnection[tuple[object, ...]], channel: str, payload: str
) -> None:
    """Send one notification from the admin connection."""
    await admin.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def is_up(hub: NotificationHub) -> bool:
    """The hub's ``connected`` flag, read fresh (a call, so type checkers don't narrow it)."""
    return hub.connected


def make_hub(url: str) -> NotificationHub:
    """A hub with short intervals, so failures are noticed quickly in tests."""
    return NotificationHub(
        url, liveness_interval=0.25, reconnect_min_delay=0.05, reconnect_max_delay=0.5
    )


@pytest.fixture
async def hub(database_url: str) -> AsyncIterator[NotificationHub]:
    """A started hub on the test database, closed afterwards."""
    made = make_hub(database_url)
    await made.start()
    try:
        yield made
    finally:
        await made.close()


async def test_callback_receives_payload_sent_from_another_connection(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """A NOTIFY sent after subscribe() returns reaches the callback with its payload."""
    got: list[str] = []
    await hub.subscribe("chan", got.append)
    await notify(admin, "chan", "hello ✓")
    await wait_until(lambda: got == ["hello ✓"])


async def test_channel_names_are_quoted_identifiers(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """A channel name with capitals, spaces and quotes is LISTENed exactly as given."""
    channel = 'Odd "Channel"; name'
    got: list[str] = []
    await hub.subscribe(channel, got.append)
    await notify(admin, channel, "x")
    await wait_until(lambda: got == ["x"])


async def test_every_subscriber_on_a_channel_gets_the_payload(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """Several subscribers on one channel each receive every payload; other channels don't."""
    first: list[str] = []
    second: list[str] = []
    other: list[str] = []
    await hub.subscribe("shared", first.append)
    await hub.subscribe("shared", second.append)
    await hub.subscribe("other", other.append)
    await notify(admin, "shared", "p")
    await wait_until(lambda: first == ["p"] and second == ["p"])
    await notify(admin, "other", "q")
    await wait_until(lambda: other == ["q"])
    assert first == ["p"]
    assert second == ["p"]


async def test_payloads_are_delivered_in_arrival_order(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """Notifications reach the callback in the order they were committed."""
    got: list[str] = []
    await hub.subscribe("ordered", got.append)
    expected = [str(i) for i in range(300)]
    for payload in expected:
        await notify(admin, "ordered", payload)
    await wait_until(lambda: len(got) >= len(expected))
    assert got == expected


async def test_raising_callback_is_logged_and_delivery_continues(
    hub: NotificationHub,
    admin: psycopg.AsyncConnection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A callback that raises is logged and neither the hub nor later deliveries suffer."""
    got: list[str] = []

    def explode(payload: str) -> None:
        raise RuntimeError(f"boom on {payload}")

    await hub.subscribe("c", explode)
    await hub.subscribe("c", got.append)
    with caplog.at_level(logging.ERROR, logger="fleetcache.notifications"):
        await notify(admin, "c", "1")
        await wait_until(lambda: got == ["1"])
        await notify(admin, "c", "2")
        await wait_until(lambda: got == ["1", "2"])
    failures = [r for r in caplog.records if r.name == "fleetcache.notifications"]
    assert len(failures) == 2
    assert all(r.exc_info and "boom on" in str(r.exc_info[1]) for r in failures)
    assert is_up(hub)
    assert hub.reconnects == 0


async def test_unsubscribe_stops_delivery(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """After unsubscribe() (twice: idempotent) a subscriber gets nothing more; others still do."""
    gone: list[str] = []
    stays: list[str] = []
    sub = await hub.subscribe("u", gone.append)
    await hub.subscribe("u", stays.append)
    sub.unsubscribe()
    sub.unsubscribe()
    assert not sub.active
    await notify(admin, "u", "after")
    await wait_until(lambda: stays == ["after"])
    assert gone == []


async def test_last_unsubscribe_forgets_the_channel_and_resubscribe_works(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """When a channel's last subscriber leaves, the channel is dropped; subscribing again
    delivers again."""
    first: list[str] = []
    sub = await hub.subscribe("again", first.append)
    sub.unsubscribe()
    assert "again" not in hub.channels
    await notify(admin, "again", "lost")
    second: list[str] = []
    await hub.subscribe("again", second.append)
    await notify(admin, "again", "kept")
    await wait_until(lambda: "kept" in second)
    assert first == []


async def test_subscribe_before_start_listens_once_started(
    database_url: str, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """A subscription made before start() is LISTENed by start()."""
    hub = make_hub(database_url)
    got: list[str] = []
    try:
        await hub.subscribe("early", got.append)
        assert not is_up(hub)
        await hub.start()
        assert is_up(hub)
        await notify(admin, "early", "x")
        await wait_until(lambda: got == ["x"])
    finally:
        await hub.close()


async def test_start_and_close_are_idempotent(
    database_url: str, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """start() twice (also concurrently) opens one connection; close() twice is fine and
    leaves no connection and no task behind."""
    hub = make_hub(database_url)
    await asyncio.gather(hub.start(), hub.start())
    await hub.start()
    assert is_up(hub)
    await wait_for_backends(admin, 1)
    await hub.close()
    await hub.close()
    assert not is_up(hub)
    await wait_for_backends(admin, 0)
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_closed_hub_refuses_start_and_subscribe(database_url: str) -> None:
    """A closed hub cannot be restarted or subscribed to, and says so."""
    hub = make_hub(database_url)
    await hub.close()
    with pytest.raises(NotOpenError):
        await hub.start()
    with pytest.raises(NotOpenError):
        await hub.subscribe("c", print)


async def test_start_failure_raises_notification_error(database_url: str) -> None:
    """A start() that cannot connect raises NotificationError (the driver error as cause)."""
    hub = make_hub(make_conninfo(database_url, dbname="fleetcache_no_such_database"))
    with pytest.raises(NotificationError) as info:
        await hub.start()
    assert isinstance(info.value.__cause__, psycopg.Error)
    assert not is_up(hub)
    await hub.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_close_during_start_leaves_nothing_listening(
    database_url: str, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """close() at any point while start() is still running leaves no hub connection, no
    LISTEN and no task; the interrupted start() raises NotOpenError or completes."""
    outcomes: set[str] = set()
    for step in range(40):
        hub = make_hub(database_url)
        await hub.subscribe("c", print)
        starting = asyncio.create_task(hub.start())
        # Spread the close over the whole start: the connect, the LISTEN, and after.
        await asyncio.sleep(step * 0.0005)
        await hub.close()
        try:
            await starting
            outcomes.add("started")
        except NotOpenError:
            outcomes.add("interrupted")
        assert not is_up(hub)
        await wait_for_backends(admin, 0)
        assert asyncio.all_tasks() == {asyncio.current_task()}
    assert "interrupted" in outcomes


async def test_cancelled_subscribe_leaves_no_subscription(hub: NotificationHub) -> None:
    """A subscribe() cancelled while waiting for its LISTEN does not stay subscribed."""
    task = asyncio.create_task(hub.subscribe("cancelled", print))
    await asyncio.sleep(0)  # let it register and start waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "cancelled" not in hub.channels


async def test_terminated_backend_reconnects_reports_gap_and_delivers_again(
    database_url: str,
    admin: psycopg.AsyncConnection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pg_terminate_backend on the hub's connection (default settings): the hub
    reconnects within seconds, re-LISTENs, calls on_gap, and a later NOTIFY is delivered."""
    async with NotificationHub(database_url) as hub:
        await _terminate_and_recover(hub, admin, caplog)


async def _terminate_and_recover(
    hub: NotificationHub,
    admin: psycopg.AsyncConnection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[str] = []
    gaps: list[float] = []
    await hub.subscribe("gap", got.append, on_gap=lambda: gaps.append(time.monotonic()))
    (pid,) = await wait_for_backends(admin, 1)
    assert hub.backend_pid == pid

    with caplog.at_level(logging.INFO, logger="fleetcache.notifications"):
        killed_at = time.monotonic()
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await wait_until(lambda: len(gaps) == 1)
    reconnect_seconds = gaps[0] - killed_at
    print(f"\nhub reconnected {reconnect_seconds:.3f} s after pg_terminate_backend")

    assert is_up(hub)
    assert hub.reconnects == 1
    (new_pid,) = await wait_for_backends(admin, 1)
    assert new_pid != pid
    assert hub.backend_pid == new_pid
    await notify(admin, "gap", "after the gap")
    await wait_until(lambda: got == ["after the gap"])
    assert any("connection lost" in r.getMessage() for r in caplog.records)


async def test_reconnect_keeps_retrying_while_connections_are_refused(
    database_url: str,
    postgres_server_url: str,
    admin: psycopg.AsyncConnection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the database refuses connections the hub logs failed attempts and keeps
    retrying; once connections are allowed again it reconnects and reports one gap."""
    dbname = str(psycopg.conninfo.conninfo_to_dict(database_url)["dbname"])
    hub = make_hub(database_url)
    got: list[str] = []
    gaps: list[None] = []
    await hub.subscribe("retry", got.append, on_gap=lambda: gaps.append(None))
    await hub.start()
    try:
        (pid,) = await wait_for_backends(admin, 1)
        async with await psycopg.AsyncConnection.connect(
            postgres_server_url, autocommit=True
        ) as superuser:
            allow = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}")
            await superuser.execute(allow.format(sql.Identifier(dbname), sql.SQL("false")))
            try:
                with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
                    await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    await wait_until(
                        lambda: sum("attempt" in r.getMessage() for r in caplog.records) >= 2
                    )
                assert not is_up(hub)
                assert gaps == []
            finally:
                await superuser.execute(allow.format(sql.Identifier(dbname), sql.SQL("true")))
        await wait_until(lambda: len(gaps) == 1)
        assert is_up(hub)
        await notify(admin, "retry", "back")
        await wait_until(lambda: got == ["back"])
    finally:
        await hub.close()


async def test_subscribe_while_reconnecting_is_listened_after_the_reconnect(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """A channel subscribed while the hub is down is LISTENed by the reconnect and its
    subscriber is told about the gap."""
    gaps: list[str] = []
    await hub.subscribe("first", print, on_gap=lambda: gaps.append("first"))
    (pid,) = await wait_for_backends(admin, 1)
    await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await wait_until(lambda: not is_up(hub))
    got: list[str] = []
    await hub.subscribe("late", got.append, on_gap=lambda: gaps.append("late"))
    await wait_until(lambda: len(gaps) == 2)
    assert sorted(gaps) == ["first", "late"]
    await notify(admin, "late", "x")
    await wait_until(lambda: got == ["x"])


async def test_idle_hub_probes_its_connection(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """An idle hub keeps checking its connection (its backend runs SELECT 1)."""
    await hub.subscribe("idle", print)
    deadline = time.monotonic() + WAIT
    while True:
        cur = await admin.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s",
            (DEFAULT_APPLICATION_NAME,),
        )
        rows = await cur.fetchall()
        if rows and rows[0][0] == "SELECT 1":
            break
        assert time.monotonic() < deadline, f"no liveness probe seen: {rows}"
        await asyncio.sleep(0.05)


async def test_repeated_terminations_each_reconnect_and_report_a_gap(
    hub: NotificationHub, admin: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """Every drop, even of a connection only just made, is followed by a reconnect and
    one on_gap; delivery works after the last one."""
    got: list[str] = []
    gaps: list[None] = []
    await hub.subscribe("flap", got.append, on_gap=lambda: gaps.append(None))

    def recovered(count: int) -> Callable[[], bool]:
        return lambda: len(gaps) == count and is_up(hub)

    for round_ in range(1, 4):
        (pid,) = await wait_for_backends(admin, 1)
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await wait_until(recovered(round_))
    assert hub.reconnects == 3
    await notify(admin, "flap", "steady")
    await wait_until(lambda: got == ["steady"])
