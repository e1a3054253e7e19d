"""The invalidation listener: broadcasts and gaps replayed as generation bumps."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from fleetcache.notifications import (
    INVALIDATED_CHANNEL,
    GenerationTarget,
    InvalidationListener,
    NotificationHub,
    PostgresInvalidationPublisher,
    encode_global_payload,
    encode_module_payloads,
    encode_realm_payload,
)
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME

pytestmark = pytest.mark.postgres

WAIT = 10.0  # generous bound on any wait; never an assertion about speed

Call = tuple[object, ...]


class FakeTarget:
    """Records every bump it is asked for (the real one is the generic caching lookup)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def bump_names(self, namespace: str, names: Sequence[str]) -> None:
        """Record a names bump."""
        self.calls.append(("names", namespace, tuple(names)))

    def bump_namespace(self, namespace: str) -> None:
        """Record a namespace bump."""
        self.calls.append(("namespace", namespace))

    def bump_global(self) -> None:
        """Record a global bump."""
        self.calls.append(("global",))


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """An autocommit connection to the test database, to NOTIFY and inspect from."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def hub(database_url: str) -> AsyncIterator[NotificationHub]:
    """A started hub with short intervals, closed afterwards."""
    made = NotificationHub(
        database_url, liveness_interval=0.25, reconnect_min_delay=0.05, reconnect_max_delay=0.5
    )
    await made.start()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def target_and_listener(
    hub: NotificationHub,
) -> AsyncIterator[tuple[FakeTarget, InvalidationListener]]:
    """A fake target and a started listener replaying onto it."""
    target = FakeTarget()
    listener = InvalidationListener(hub, target)
    await listener.start()
    try:
        yield target, listener
    finally:
        await listener.close()


async def send(admin: psycopg.AsyncConnection, payload: str) -> None:
    """Hand-send one payload on the invalidated channel."""
    await admin.execute("SELECT pg_notify(%s, %s)", (INVALIDATED_CHANNEL, payload))


def test_fake_target_satisfies_the_protocol() -> None:
    """A class with the three bump methods is a GenerationTarget (structural typing)."""
    target: GenerationTarget = FakeTarget()
    target.bump_global()


async def test_each_payload_kind_calls_the_matching_bump(
    target_and_listener: tuple[FakeTarget, InvalidationListener],
    admin: psycopg.AsyncConnection,
) -> None:
    """module → bump_names, realm → bump_namespace, global → bump_global, in order."""
    target, listener = target_and_listener
    (module,) = encode_module_payloads("https://r/", ["a.gts", "b ü.gts"])
    for payload in (module, encode_realm_payload("https://r/"), encode_global_payload()):
        await send(admin, payload)
    await wait_until(lambda: len(target.calls) == 3)
    assert target.calls == [
        ("names", "https://r/", ("a.gts", "b ü.gts")),
        ("namespace", "https://r/"),
        ("global",),
    ]
    assert listener.stats() == {"applied": 3, "rejected": 0, "failed": 0, "echoes": 0, "gaps": 0}


async def test_malformed_payloads_change_nothing(
    target_and_listener: tuple[FakeTarget, InvalidationListener],
    admin: psycopg.AsyncConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Malformed payloads sent with pg_notify are warned about, counted, and bump nothing."""
    target, listener = target_and_listener
    bad = [
        "",
        "not json",
        "[123]",
        "[]",
        '{"k":"module","r":"ns"}',
        '{"k":"module","r":"","m":["a"]}',
        '{"k":"module","r":"ns","m":[""]}',
        '{"k":"module","r":"ns","m":[7]}',
        '{"k":"realm","r":""}',
        '{"k":"everything"}',
    ]
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        for payload in bad:
            await send(admin, payload)
        # A valid payload sent last: once it is applied, every bad one has been seen.
        await send(admin, encode_realm_payload("sentinel"))
        await wait_until(lambda: len(target.calls) == 1)
    assert target.calls == [("namespace", "sentinel")]
    assert listener.stats() == {
        "applied": 1,
        "rejected": len(bad),
        "failed": 0,
        "echoes": 0,
        "gaps": 0,
    }
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == len(bad)


async def test_gap_after_terminated_connection_bumps_global(
    target_and_listener: tuple[FakeTarget, InvalidationListener],
    hub: NotificationHub,
    admin: psycopg.AsyncConnection,
) -> None:
    """When the hub's connection is terminated, the gap is replayed as bump_global and
    broadcasts after the reconnect are replayed again."""
    target, listener = target_and_listener
    cur = await admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = %s",
        (DEFAULT_APPLICATION_NAME,),
    )
    (row,) = await cur.fetchall()
    await admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
    await wait_until(lambda: target.calls == [("global",)])
    assert listener.stats()["gaps"] == 1
    assert hub.reconnects == 1
    await send(admin, encode_realm_payload("later"))
    await wait_until(lambda: len(target.calls) == 2)
    assert target.calls[1] == ("namespace", "later")


async def test_start_and_close_are_idempotent_and_close_stops_replay(
    hub: NotificationHub, admin: psycopg.AsyncConnection
) -> None:
    """start() and close() may be repeated; after close() broadcasts are not replayed."""
    target = FakeTarget()
    listener = InvalidationListener(hub, target)
    await asyncio.gather(listener.start(), listener.start())
    await listener.start()
    await send(admin, encode_global_payload())
    await wait_until(lambda: target.calls == [("global",)])  # replayed once, not 2x
    await listener.close()
    await listener.close()
    await send(admin, encode_global_payload())
    # A second subscriber on the same channel shows when the payload has been delivered.
    seen: list[str] = []
    await hub.subscribe(INVALIDATED_CHANNEL, seen.append)
    await send(admin, encode_realm_payload("marker"))
    await wait_until(lambda: len(seen) >= 1)
    assert target.calls == [("global",)]
    assert listener.stats()["applied"] == 1


async def test_a_target_that_raises_is_logged_and_counted(
    hub: NotificationHub, admin: psycopg.AsyncConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """A bump that raises is logged and counted as failed; later payloads still apply."""

    class Flaky(FakeTarget):
        def bump_namespace(self, namespace: str) -> None:
            raise RuntimeError(f"cannot bump {namespace}")

    target = Flaky()
    async with InvalidationListener(hub, target) as listener:
        with caplog.at_level(logging.ERROR, logger="fleetcache.notifications"):
            await send(admin, encode_realm_payload("ns"))
            await send(admin, encode_global_payload())
            await wait_until(lambda: target.calls == [("global",)])
        assert listener.stats() == {
            "applied": 1,
            "rejected": 0,
            "failed": 1,
            "echoes": 0,
            "gaps": 0,
        }
    assert any("cannot bump ns" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_publisher_to_listener_end_to_end_including_self_echo(
    hub: NotificationHub, database_url: str
) -> None:
    """What a publisher sends (chunked) is replayed by a listener in the same process:
    the self-echo just bumps again."""
    target = FakeTarget()
    names = [f"https://r/m{i}.gts" for i in range(50)]
    async with (
        AsyncConnectionPool(
            database_url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
        ) as pool,
        InvalidationListener(hub, target),
    ):
        publisher = PostgresInvalidationPublisher(pool, budget=300)
        await publisher.names_invalidated("https://r/", names)
        await publisher.all_cleared()
        await wait_until(lambda: target.calls[-1:] == [("global",)])
    replayed = [name for call in target.calls[:-1] for name in call[2]]  # type: ignore[attr-defined]
    assert replayed == names
    assert len(target.calls) > 2  # the names came in several chunks


async def test_own_echoes_are_skipped_and_peers_payloads_replayed(
    hub: NotificationHub, database_url: str
) -> None:
    """Given its process's publisher, the listener skips the echoes of what that publisher
    sent (this process already bumped) and still replays an identical payload from a peer."""
    target = FakeTarget()
    async with AsyncConnectionPool(
        database_url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
    ) as pool:
        publisher = PostgresInvalidationPublisher(pool)
        async with InvalidationListener(hub, target, own=publisher) as listener:
            await publisher.names_invalidated("https://r/", ["https://r/a.gts"])
            await publisher.all_cleared()
            await wait_until(lambda: listener.stats()["echoes"] == 2)
            assert target.calls == []
            async with pool.connection() as conn:  # a peer sends the very same payload
                await conn.execute(
                    "SELECT pg_notify(%s, %s)", (INVALIDATED_CHANNEL, encode_global_payload())
                )
            await wait_until(lambda: target.calls == [("global",)])
            assert listener.stats()["applied"] == 1
