"""LocalCoordinator: the in-process reference of the populate-coordination contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fleetcache.coordination.base import WakeReason, lock_id
from fleetcache.coordination.local import LocalCoordinator
from fleetcache.errors import NotOpenError
from waiting import eventually

PROMPT = 20.0  # a bound that keeps a broken build from hanging, not a speed assertion
KEY = '["realm","mod.gts","public",""]'


@pytest.fixture
async def coordinator() -> AsyncIterator[LocalCoordinator]:
    """A started LocalCoordinator, closed after the test."""
    made = LocalCoordinator()
    await made.start()
    yield made
    await made.close()


def waiting(coordinator: LocalCoordinator, key: str) -> int:
    """How many waiters are parked on ``key``."""
    return len(coordinator._registry._waiters.get(lock_id(key), ()))


async def parked(coordinator: LocalCoordinator, key: str, count: int = 1) -> None:
    """Return once ``count`` waiters of ``key`` are parked."""
    await eventually(lambda: waiting(coordinator, key) >= count)


async def hold(
    coordinator: LocalCoordinator,
    key: str,
    release: asyncio.Event,
    started: asyncio.Event | None = None,
) -> int:
    """Win ``key``'s lock and hold it until ``release`` is set; 1 when done."""
    async with coordinator.lock(key) as lock:
        assert lock.won
        if started is not None:
            started.set()
        await release.wait()
    return 1


async def lose_and_wait(coordinator: LocalCoordinator, key: str, timeout: float) -> WakeReason:
    """Lose ``key``'s lock (someone holds it) and wait for its holder."""
    async with coordinator.lock(key) as lock:
        assert not lock.won
        return await lock.wait(timeout)


async def test_an_uncontended_lock_is_won(coordinator: LocalCoordinator) -> None:
    """An uncontended key is won, needs no NOTIFY of its own (its release wakes the waiters
    of this process), and is free again once the block ends."""
    async with coordinator.lock(KEY) as lock:
        assert lock.won
        assert lock.notify is None
        with pytest.raises(RuntimeError, match="was won"):
            await lock.wait(1)
    async with coordinator.lock(KEY) as again:
        assert again.won
    assert coordinator.stats() == {
        "lock_won": 2,
        "lock_lost": 0,
        "woken_notify": 0,
        "woken_timeout": 0,
        "woken_probe": 0,
        "woken_gap": 0,
        "woken_close": 0,
        "notifies": 0,
        "notify_failures": 0,
    }


async def test_losers_wait_and_wake_on_release(coordinator: LocalCoordinator) -> None:
    """While a key is held, every other try loses; each loser's wait ends with NOTIFY when
    the holder's block ends."""
    started, release = asyncio.Event(), asyncio.Event()
    winner = asyncio.create_task(hold(coordinator, KEY, release, started))
    await started.wait()
    losers = [asyncio.create_task(lose_and_wait(coordinator, KEY, 60)) for _ in range(3)]
    await parked(coordinator, KEY, 3)

    release.set()

    async with asyncio.timeout(PROMPT):
        assert await winner == 1
        assert await asyncio.gather(*losers) == [WakeReason.NOTIFY] * 3
    assert waiting(coordinator, KEY) == 0
    stats = coordinator.stats()
    assert (stats["lock_won"], stats["lock_lost"], stats["woken_notify"]) == (1, 3, 3)


async def test_a_release_before_the_wait_is_not_missed(coordinator: LocalCoordinator) -> None:
    """A holder that finishes between a lost try and the loser's wait still wakes it: the
    waiter was registered by the try itself."""
    started, release = asyncio.Event(), asyncio.Event()
    winner = asyncio.create_task(hold(coordinator, KEY, release, started))
    await started.wait()
    async with coordinator.lock(KEY) as lost:
        assert not lost.won
        release.set()
        await winner
        async with asyncio.timeout(PROMPT):
            assert await lost.wait(60) is WakeReason.NOTIFY


async def test_waiters_of_another_key_are_not_woken(coordinator: LocalCoordinator) -> None:
    """Releasing one key does not wake the waiters of another."""
    started_a, started_b = asyncio.Event(), asyncio.Event()
    release_a, release_b = asyncio.Event(), asyncio.Event()
    holders = [
        asyncio.create_task(hold(coordinator, "a", release_a, started_a)),
        asyncio.create_task(hold(coordinator, "b", release_b, started_b)),
    ]
    await started_a.wait()
    await started_b.wait()
    waiter_a = asyncio.create_task(lose_and_wait(coordinator, "a", 60))
    waiter_b = asyncio.create_task(lose_and_wait(coordinator, "b", 60))
    await parked(coordinator, "a")
    await parked(coordinator, "b")

    release_a.set()
    async with asyncio.timeout(PROMPT):
        assert await waiter_a is WakeReason.NOTIFY
    assert not waiter_b.done()
    release_b.set()
    async with asyncio.timeout(PROMPT):
        assert await waiter_b is WakeReason.NOTIFY
        await asyncio.gather(*holders)


async def test_a_wait_times_out_without_leaking_its_waiter(
    coordinator: LocalCoordinator,
) -> None:
    """A wait on a held key times out with TIMEOUT (no exception, no leaked waiter)."""
    started, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(coordinator, KEY, release, started))
    await started.wait()

    assert await lose_and_wait(coordinator, KEY, 0.05) is WakeReason.TIMEOUT
    assert waiting(coordinator, KEY) == 0
    release.set()
    await holder


async def test_failing_or_cancelled_winner_wakes_waiters_and_propagates(
    coordinator: LocalCoordinator,
) -> None:
    """A winner whose block raises (or is cancelled) re-raises unchanged, releases the key
    and wakes its waiters."""
    started = asyncio.Event()
    fail = asyncio.Event()

    async def broken() -> None:
        async with coordinator.lock(KEY) as lock:
            assert lock.won
            started.set()
            await fail.wait()
            raise LookupError("the producer broke")

    winner = asyncio.create_task(broken())
    await started.wait()
    waiter = asyncio.create_task(lose_and_wait(coordinator, KEY, 60))
    await parked(coordinator, KEY)
    fail.set()
    with pytest.raises(LookupError):
        await winner
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY

    started.clear()
    winner = asyncio.create_task(hold(coordinator, KEY, asyncio.Event(), started))
    await started.wait()
    waiter = asyncio.create_task(lose_and_wait(coordinator, KEY, 60))
    await parked(coordinator, KEY)
    winner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await winner
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY
    assert coordinator._held == set()


async def test_close_wakes_waiters_and_refuses_new_work() -> None:
    """close() wakes parked waiters with CLOSE; later tries and starts raise
    NotOpenError."""
    coordinator = LocalCoordinator()
    await coordinator.start()
    started, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(coordinator, KEY, release, started))
    await started.wait()
    waiter = asyncio.create_task(lose_and_wait(coordinator, KEY, 60))
    await parked(coordinator, KEY)

    await coordinator.close()

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.CLOSE
    with pytest.raises(NotOpenError):
        async with coordinator.lock(KEY):
            pass
    with pytest.raises(NotOpenError):
        await coordinator.start()
    await coordinator.close()
    assert coordinator.stats()["woken_close"] == 1
    release.set()
    await holder
