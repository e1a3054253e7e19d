"""Silent faults a fleet meets: a LISTEN connection whose network path freezes, and a
winner that is frozen (SIGSTOP) or partitioned while it holds a key's lock. The paths are
frozen through a proxy (tests/tcp_proxy.py) that stops forwarding without closing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import fleetcache
from conn_worker import start
from fleetcache import Key, Produced
from fleetcache.coordination.base import lock_id
from fleetcache.coordination.postgres import LOCK_APPLICATION_NAME, advisory_lock_tag
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME
from fleetcache_cli.shared import Fleet, Member
from tcp_proxy import FreezableProxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NS = "https://realm.example/"
#: The lock connections' idle timeout the winner tests use (seconds): short, so they run
#: quickly; the default is 10 s.
IDLE = 3.0


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[FreezableProxy]:
    """A freezable TCP proxy in front of the test database."""
    async with FreezableProxy(database_url) as made:
        yield made


# ------------------------------------------------------------------ the near tier


async def test_the_near_tier_stops_serving_soon_after_its_listen_connection_freezes(
    database_url: str, proxy: FreezableProxy
) -> None:
    """A process whose LISTEN connection silently freezes misses a peer's invalidation;
    its near tier serves the old value only until the hub declares the connection dead
    (1.5 s with the defaults), then reads go to the store and get the new value — not for
    as long as the partition lasts (the first release: up to 18.5 s of stale reads)."""
    key = Key(NS, f"near-{uuid.uuid4().hex[:8]}")

    def producing(version: int) -> Any:
        async def produce(_key: Key) -> Produced[Any]:
            return Produced(value={"version": version})

        return produce

    async with (
        fleetcache.open(proxy.url(database_url), near=100) as here,
        fleetcache.open(database_url) as peer,
    ):
        assert (await here.get(key, producing(1))).value == {"version": 1}  # type: ignore[union-attr]
        hits = here.stats()["lookup"]["near_hits"]
        assert (await here.get(key, producing(2))).value == {"version": 1}  # type: ignore[union-attr]
        assert here.stats()["lookup"]["near_hits"] == hits + 1
        assert proxy.freeze(DEFAULT_APPLICATION_NAME.encode()) == 1
        await peer.invalidate(NS, [key.name])
        invalidated_at = time.monotonic()
        last_stale = invalidated_at
        while True:
            entry = await here.get(key, producing(2))
            assert entry is not None
            if entry.value == {"version": 2}:
                break
            last_stale = time.monotonic()
            assert last_stale - invalidated_at < 30, "the old value is still served"
            await asyncio.sleep(0.01)
        window = last_stale - invalidated_at
        # The stated bound is 1.5 s; 5 s leaves room for a loaded machine (the first
        # release served stale values for at least 7 s).
        assert window < 5.0, f"stale near hits for {window:.2f} s after the invalidation"
        print(f"\nstale near hits for {window:.2f} s after the invalidation")
        assert here.hub is not None
        assert not here.hub.connected
        proxy.thaw()


# ------------------------------------------------------------------ a silent winner


async def lock_is_held(database_url: str, coalesce_key: str, timeout: float = 30.0) -> None:
    """Wait until some session holds the advisory lock of ``coalesce_key``."""
    classid, objid = advisory_lock_tag(lock_id(coalesce_key))
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        while True:
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
                (classid, objid),
            )
            if (await cursor.fetchone() or (0,))[0]:
                return
            assert time.monotonic() < deadline, f"nobody took the lock of {coalesce_key}"
            await asyncio.sleep(0.02)


async def silent_winner_is_replaced(
    winner: Member,
    peer: Member,
    database_url: str,
    silence: Any,
    wake: Any,
) -> dict[str, float]:
    """The shared scenario: ``winner`` computes a key (10 s); once it holds the lock it
    goes silent (``silence()``); ``peer`` asks for the key and must compute it itself once
    the server has ended the winner's lock session; the key is then invalidated and the
    winner woken (``wake()``): its computation, begun before the invalidation, must not be
    what the store holds afterwards. Returns the measured times."""
    name = f"silent-{uuid.uuid4().hex[:8]}"
    key = Key(NS, name)
    winner.send("get", ns=NS, name=name, compute_s=10, tag="winner")
    await lock_is_held(database_url, key.coalesce_key)
    silenced_at = time.time()
    await silence()
    answer = await peer.call("get", timeout=60, ns=NS, name=name, compute_s=0.2, tag="peer")
    assert answer["value"]["tag"] == "peer", answer
    replaced_after = answer["value"]["began"] - silenced_at
    invalidated = await peer.call("invalidate", ns=NS, names=[name])
    assert invalidated["names"] == [name], invalidated
    invalidated_at = invalidated["t_end"]
    await wake()
    late = await winner.receive(60)
    # Whatever the winner answers, it was computed after the invalidation: its first
    # computation (begun before it) was refused by the store.
    assert late["value"]["began"] > invalidated_at, late
    held = await peer.call("peek", ns=NS, name=name)
    assert held["value"] is None or held["value"]["began"] > invalidated_at, held
    return {"replaced_after": replaced_after}


@pytest.mark.processes
async def test_a_stopped_winner_loses_its_lock_within_the_idle_timeout(
    database_url: str,
) -> None:
    """A winner process SIGSTOPped while it computes (its kernel still acknowledges TCP)
    sends no heartbeat, so the server ends its lock session after ``lock_idle_timeout``;
    a waiting process then computes the key itself (within the timeout plus the crash
    probe, not after the 12-minute waiting budget). Resumed, the stopped winner cannot
    store its result computed before the key was invalidated."""
    options = {"lock_idle_timeout": IDLE, "probe_interval": 0.5, "wait_timeout": 120.0}
    with Fleet(2, name="test-member") as fleet:
        winner, ready = await start(fleet, 0, database_url, **options)
        peer, peer_ready = await start(fleet, 1, database_url, **options)
        assert ready["ready"], ready
        assert peer_ready["ready"], peer_ready
        stopped = False

        async def silence() -> None:
            nonlocal stopped
            os.kill(winner.pid, signal.SIGSTOP)
            stopped = True

        async def wake() -> None:
            nonlocal stopped
            os.kill(winner.pid, signal.SIGCONT)
            stopped = False

        try:
            measured = await silent_winner_is_replaced(winner, peer, database_url, silence, wake)
        finally:
            if stopped:
                os.kill(winner.pid, signal.SIGCONT)
    print(f"\nSIGSTOPped winner replaced after {measured['replaced_after']:.2f} s (idle {IDLE} s)")
    # IDLE + the 0.5 s probe, with room for a loaded machine; without the bound the peer
    # would wait 120 s for its first round to end.
    assert measured["replaced_after"] < IDLE + 12


@pytest.mark.processes
async def test_a_partitioned_winner_loses_its_lock_within_the_idle_timeout(
    database_url: str, proxy: FreezableProxy
) -> None:
    """A winner whose lock connection's network path freezes (no FIN, no error, and the
    proxy's kernel still acknowledges TCP) loses its lock the same way: the server ends
    the silent session after ``lock_idle_timeout`` and a waiting process computes the key;
    the partitioned winner's own late result, begun before an invalidation, is refused."""
    options = {"lock_idle_timeout": IDLE, "probe_interval": 0.5, "wait_timeout": 120.0}

    async def silence() -> None:
        assert proxy.freeze(LOCK_APPLICATION_NAME.encode()) >= 1

    async def wake() -> None:
        proxy.thaw()

    with Fleet(2, name="test-member") as fleet:
        winner, ready = await start(fleet, 0, proxy.url(database_url), **options)
        peer, peer_ready = await start(fleet, 1, database_url, **options)
        assert ready["ready"], ready
        assert peer_ready["ready"], peer_ready
        try:
            measured = await silent_winner_is_replaced(winner, peer, database_url, silence, wake)
        finally:
            proxy.thaw()
    print(f"\npartitioned winner replaced after {measured['replaced_after']:.2f} s (idle {IDLE} s)")
    assert measured["replaced_after"] < IDLE + 12


@pytest.mark.processes
async def test_a_healthy_winner_keeps_its_lock_past_the_idle_timeout(database_url: str) -> None:
    """A winner that computes for several idle timeouts keeps its lock (its heartbeat
    keeps the lock session busy), so a waiting process does not compute the key too."""
    options = {"lock_idle_timeout": 1.0, "probe_interval": 0.2, "wait_timeout": 120.0}
    name = f"healthy-{uuid.uuid4().hex[:8]}"
    with Fleet(2, name="test-member") as fleet:
        winner, ready = await start(fleet, 0, database_url, **options)
        peer, peer_ready = await start(fleet, 1, database_url, **options)
        assert ready["ready"], ready
        assert peer_ready["ready"], peer_ready
        winner.send("get", ns=NS, name=name, compute_s=5, tag="winner")
        await lock_is_held(database_url, Key(NS, name).coalesce_key)
        peer.send("get", ns=NS, name=name, compute_s=0, tag="peer")
        answers = [await winner.receive(60), await peer.receive(60)]
    assert [a["value"]["tag"] for a in answers] == ["winner", "winner"], answers
