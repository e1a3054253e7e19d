"""The invalidation listener: peers' broadcasts and hub gaps replayed on a target."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import AsyncIterator, Sequence

import psycopg
import pytest

from fleetcache.definitions.setup import SEED_INVALIDATED_CHANNEL
from fleetcache.errors import ConfigurationError, NotOpenError
from fleetcache.notifications.hub import NotificationHub
from fleetcache.notifications.listener import InvalidationListener, InvalidationTarget
from fleetcache.stores.payloads import INVALIDATED_CHANNEL, invalidation_payloads, new_origin
from waiting import eventually as wait_until

pytestmark = pytest.mark.postgres


Call = tuple[object, ...]


class FakeTarget:
    """Records every call it gets (the real target is the generic caching lookup)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def on_names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Record a names invalidation."""
        self.calls.append(("names", namespace, tuple(names)))

    def on_namespace_cleared(self, namespace: str) -> None:
        """Record a namespace invalidation."""
        self.calls.append(("namespace", namespace))

    def on_all_cleared(self) -> None:
        """Record a global invalidation."""
        self.calls.append(("all",))

    def on_notifications_lost(self) -> None:
        """Record a gap."""
        self.calls.append(("lost",))


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """An autocommit connection to the test database, to NOTIFY from."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def hub(database_url: str) -> AsyncIterator[NotificationHub]:
    """A started hub on the invalidated channel, with short intervals, closed afterwards."""
    made = NotificationHub(
        database_url,
        [INVALIDATED_CHANNEL],
        liveness_interval=0.25,
        reconnect_min_delay=0.05,
        reconnect_max_delay=0.5,
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
    """A fake target and a started listener (no origin of its own) replaying onto it."""
    target = FakeTarget()
    async with InvalidationListener(hub, target) as listener:
        yield target, listener


async def send(admin: psycopg.AsyncConnection, payload: str) -> None:
    """Hand-send one payload on the invalidated channel."""
    await admin.execute("SELECT pg_notify(%s, %s)", (INVALIDATED_CHANNEL, payload))


def stats(**changes: int) -> dict[str, int]:
    """A listener's stats: all zero but ``changes``."""
    return {"applied": 0, "rejected": 0, "failed": 0, "own": 0, "gaps": 0, **changes}


def test_fake_target_satisfies_the_protocol() -> None:
    """A class with the four methods is an InvalidationTarget (structural typing)."""
    target: InvalidationTarget = FakeTarget()
    target.on_notifications_lost()


def test_listener_refuses_a_channel_the_hub_does_not_listen_on() -> None:
    """A listener on a channel its hub does not LISTEN on would hear nothing: refused."""
    hub = NotificationHub("dbname=x", [INVALIDATED_CHANNEL])
    with pytest.raises(ConfigurationError):
        InvalidationListener(hub, FakeTarget(), channel=SEED_INVALIDATED_CHANNEL)


async def test_each_payload_kind_calls_the_matching_method(
    target_and_listener: tuple[FakeTarget, InvalidationListener],
    admin: psycopg.AsyncConnection,
) -> None:
    """Names → on_names_invalidated, a namespace → on_namespace_cleared, everything →
    on_all_cleared, in order, from peers with an origin and from older peers without one."""
    target, listener = target_and_listener
    peer = new_origin()
    (names,) = invalidation_payloads("https://r/", ["a.gts", "b ü.gts"], origin=peer)
    payloads = [
        names,
        invalidation_payloads("https://r/", origin=peer)[0],
        invalidation_payloads(None, origin=peer)[0],
        invalidation_payloads("https://old/")[0],
    ]
    for payload in payloads:
        await send(admin, payload)
    await wait_until(lambda: len(target.calls) == 4)
    assert target.calls == [
        ("names", "https://r/", ("a.gts", "b ü.gts")),
        ("namespace", "https://r/"),
        ("all",),
        ("namespace", "https://old/"),
    ]
    assert listener.stats() == stats(applied=4)


async def test_malformed_and_hostile_payloads_change_nothing(
    target_and_listener: tuple[FakeTarget, InvalidationListener],
    hub: NotificationHub,
    admin: psycopg.AsyncConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Malformed and hostile payloads sent with pg_notify are warned about, counted, and
    reach the target not at all; the hub stays up on the same connection."""
    target, listener = target_and_listener
    pid = hub.backend_pid
    bad = [
        "",
        "not json",
        "[123]",
        '{"k":"module","r":"ns"}',
        '{"k":"module","r":"","m":["a"]}',
        '{"k":"module","r":"ns","m":[7]}',
        '{"k":"realm","r":""}',
        '{"k":"everything"}',
        '{"k":"global","o":""}',
        '{"k":"realm","r":"\\ud800"}',
        '{"k":"module","r":"ns","m":["a\\u0000b"]}',
        "[" * 7900,
        '{"k":"global","n":' + "7" * 6000 + "}",
    ]
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        for payload in bad:
            await send(admin, payload)
        # A valid payload sent last: once it is applied, every bad one has been seen.
        await send(admin, invalidation_payloads("sentinel")[0])
        await wait_until(lambda: len(target.calls) == 1)
    assert target.calls == [("namespace", "sentinel")]
    assert listener.stats() == stats(applied=1, rejected=len(bad))
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == len(bad)
    assert (hub.connected, hub.reconnects, hub.backend_pid) == (True, 0, pid)


class CountingTarget:
    """Counts calls and keeps nothing else (so memory measured is the listener's)."""

    def __init__(self) -> None:
        self.count = 0

    def on_names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Count."""
        self.count += 1

    def on_namespace_cleared(self, namespace: str) -> None:
        """Count."""
        self.count += 1

    def on_all_cleared(self) -> None:
        """Count."""
        self.count += 1

    def on_notifications_lost(self) -> None:
        """Count."""
        self.count += 1


@pytest.mark.slow
async def test_flood_of_forged_payloads_keeps_nothing_per_payload(
    hub: NotificationHub, admin: psycopg.AsyncConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """Tens of thousands of forged payloads, malformed and well-formed with made-up
    origins, are each handled and leave the process's memory where it was."""
    flood = 40_000  # half malformed, half forged global invalidations
    # Warnings are not recorded during the flood: the test's own log capture would be
    # what grows.
    caplog.set_level(logging.ERROR, logger="fleetcache.notifications")
    target = CountingTarget()
    async with InvalidationListener(hub, target, origin=new_origin()) as listener:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            # One transaction: delivered as one burst at commit (distinct payloads, so the
            # server does not fold duplicates).
            await admin.execute(
                "SELECT pg_notify(%s, CASE WHEN g %% 2 = 0 THEN 'junk ' || g "
                "ELSE json_build_object('k', 'global', 'o', 'forged-' || g)::text END) "
                "FROM generate_series(1, %s) AS g",
                (INVALIDATED_CHANNEL, flood),
            )
            await wait_until(
                lambda: listener.stats()["applied"] + listener.stats()["rejected"] == flood,
                timeout=60.0,
            )
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert listener.stats() == stats(applied=flood // 2, rejected=flood // 2)
    assert target.count == flood // 2
    # Keeping even the payloads alone would take several megabytes.
    assert grown < 1_000_000, f"memory grew by {grown} bytes over {flood} payloads"
    assert (hub.connected, hub.reconnects) == (True, 0)


async def test_hub_gap_is_reported_as_on_notifications_lost(
    target_and_listener: tuple[FakeTarget, InvalidationListener],
    hub: NotificationHub,
    admin: psycopg.AsyncConnection,
) -> None:
    """When the hub's connection is terminated, the gap reaches the target as
    on_notifications_lost(), and broadcasts after the reconnect are replayed again."""
    target, listener = target_and_listener
    await admin.execute("SELECT pg_terminate_backend(%s)", (hub.backend_pid,))
    await wait_until(lambda: target.calls == [("lost",)])
    assert listener.stats() == stats(gaps=1)
    assert hub.reconnects == 1
    await send(admin, invalidation_payloads("later")[0])
    await wait_until(lambda: len(target.calls) == 2)
    assert target.calls[1] == ("namespace", "later")


async def test_start_and_close_are_idempotent_and_close_silences_the_handlers(
    hub: NotificationHub, admin: psycopg.AsyncConnection
) -> None:
    """start() and close() may be repeated (a closed listener cannot restart); after
    close() neither broadcasts nor gaps reach the target, while the hub goes on."""
    target = FakeTarget()
    listener = InvalidationListener(hub, target)
    await asyncio.gather(listener.start(), listener.start())
    await listener.start()
    await send(admin, invalidation_payloads(None)[0])
    await wait_until(lambda: target.calls == [("all",)])  # replayed once, not 2x
    await listener.close()
    await listener.close()
    with pytest.raises(NotOpenError):
        await listener.start()
    # Another handler on the same channel shows when later payloads have been delivered.
    seen: list[str] = []
    hub.add_handler(INVALIDATED_CHANNEL, seen.append)
    await send(admin, invalidation_payloads(None)[0])
    await wait_until(lambda: len(seen) == 1)  # delivered before the connection is cut
    await admin.execute("SELECT pg_terminate_backend(%s)", (hub.backend_pid,))
    await wait_until(lambda: hub.reconnects == 1)
    await send(admin, invalidation_payloads("marker")[0])
    await wait_until(lambda: len(seen) == 2)
    assert target.calls == [("all",)]
    assert listener.stats() == stats(applied=1)


async def test_a_target_that_raises_is_logged_and_counted(
    hub: NotificationHub, admin: psycopg.AsyncConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """A target method that raises, on a payload or a gap, is logged and counted as
    failed, never raised; later payloads still apply."""

    class Flaky(FakeTarget):
        def on_namespace_cleared(self, namespace: str) -> None:
            raise RuntimeError(f"cannot clear {namespace}")

        def on_notifications_lost(self) -> None:
            raise RuntimeError("cannot forget")

    target = Flaky()
    async with InvalidationListener(hub, target) as listener:
        with caplog.at_level(logging.ERROR, logger="fleetcache.notifications"):
            await send(admin, invalidation_payloads("ns")[0])
            await send(admin, invalidation_payloads(None)[0])
            await wait_until(lambda: target.calls == [("all",)])
            await admin.execute("SELECT pg_terminate_backend(%s)", (hub.backend_pid,))
            await wait_until(lambda: listener.stats()["gaps"] == 1)
        assert listener.stats() == stats(applied=1, failed=2, gaps=1)
        await send(admin, invalidation_payloads(None)[0])
        await wait_until(lambda: target.calls == [("all",), ("all",)])
    errors = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert "cannot clear ns" in errors
    assert "cannot forget" in errors


async def test_chunked_broadcasts_are_replayed_in_order(
    hub: NotificationHub, admin: psycopg.AsyncConnection
) -> None:
    """What a peer sends in chunks is replayed by the listener, chunk by chunk, in order."""
    target = FakeTarget()
    names = [f"https://r/m{i}.gts" for i in range(50)]
    peer = new_origin()
    chunks = invalidation_payloads("https://r/", names, origin=peer, budget=300)
    assert len(chunks) > 2
    async with InvalidationListener(hub, target, origin=new_origin()):
        for payload in [*chunks, *invalidation_payloads(None, origin=peer)]:
            await send(admin, payload)
        await wait_until(lambda: target.calls[-1:] == [("all",)])
    replayed = [name for call in target.calls[:-1] for name in call[2]]  # type: ignore[attr-defined]
    assert replayed == names
    assert len(target.calls) == len(chunks) + 1


async def test_own_broadcasts_are_skipped_by_origin(
    hub: NotificationHub, admin: psycopg.AsyncConnection
) -> None:
    """Given this process's origin, the listener skips every echo of what this process
    sent, and counts them as own."""
    target = FakeTarget()
    ours = new_origin()
    names = [f"https://r/m{i}.gts" for i in range(50)]
    payloads = [
        *invalidation_payloads("https://r/", names, origin=ours, budget=300),
        *invalidation_payloads("https://r/", origin=ours),
        *invalidation_payloads(None, origin=ours),
    ]
    async with InvalidationListener(hub, target, origin=ours) as listener:
        for payload in payloads:
            await send(admin, payload)
        await wait_until(lambda: listener.stats()["own"] == len(payloads))
    assert target.calls == []
    assert listener.stats() == stats(own=len(payloads))


async def test_a_peer_payload_identical_to_ours_but_for_the_origin_is_applied(
    hub: NotificationHub, admin: psycopg.AsyncConnection
) -> None:
    """The origin, not the payload, decides: around this process's own echo, a peer's
    identical invalidation (an older peer without origin, and a current one with its
    own) is applied; the echo is skipped."""
    target = FakeTarget()
    ours = new_origin()
    async with InvalidationListener(hub, target, origin=ours) as listener:
        await send(admin, invalidation_payloads(None)[0])
        await send(admin, invalidation_payloads(None, origin=ours)[0])
        await send(admin, invalidation_payloads(None, origin=new_origin())[0])
        await wait_until(lambda: listener.stats()["applied"] == 2)
        assert listener.stats() == stats(applied=2, own=1)
    assert target.calls == [("all",), ("all",)]


async def test_on_heard_gets_every_valid_announcement_own_ones_included_and_gaps(
    hub: NotificationHub, admin: psycopg.AsyncConnection
) -> None:
    """``on_heard`` (the store's ``lock_released``) is called with the namespace of every
    valid announcement — this process's own echoes too, which the target never sees — with
    None for a global one and for a gap, and never for a malformed payload; one that
    raises is logged and counted."""
    ours, peer = new_origin(), new_origin()
    heard: list[str | None] = []
    target = FakeTarget()
    async with InvalidationListener(hub, target, origin=ours, on_heard=heard.append) as listener:
        for payload in (
            invalidation_payloads("https://a/", ["x"], origin=ours)[0],
            invalidation_payloads("https://b/", origin=peer)[0],
            "not json",
            invalidation_payloads(None, origin=ours)[0],
        ):
            await send(admin, payload)
        await wait_until(lambda: len(heard) == 3)
        assert heard == ["https://a/", "https://b/", None]
        assert target.calls == [("namespace", "https://b/")]
        await admin.execute("SELECT pg_terminate_backend(%s)", (hub.backend_pid,))
        await wait_until(lambda: len(heard) == 4)
        assert heard[3] is None
        assert listener.stats() == stats(applied=1, rejected=1, own=2, gaps=1)

    def broken(namespace: str | None) -> None:
        raise RuntimeError("boom")

    async with InvalidationListener(hub, target, on_heard=broken) as listener:
        await send(admin, invalidation_payloads("https://c/")[0])
        await wait_until(lambda: listener.stats()["failed"] == 1)
        await wait_until(lambda: target.calls[-1] == ("namespace", "https://c/"))
