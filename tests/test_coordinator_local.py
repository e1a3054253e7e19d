"""LocalCoordinator: the in-process reference of the populate-coordination contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fleetcache.coordination import Acquired, LocalCoordinator, Waiter, WakeReason, lock_id
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


async def test_winner_runs_fn_and_returns_its_result(coordinator: LocalCoordinator) -> None:
    """An uncontended key is won: fn runs and its result comes back."""

    async def fn() -> str:
        return "value"

    assert await coordinator.try_acquire_and_run(KEY, fn) == Acquired("value")
    assert coordinator.stats() == {
        "lock_won": 1,
        "lock_lost": 0,
        "woken_notify": 0,
        "woken_timeout": 0,
        "woken_probe": 0,
        "woken_gap": 0,
        "woken_close": 0,
        "notify_failures": 0,
    }


async def test_loser_gets_a_waiter_that_wakes_on_release(coordinator: LocalCoordinator) -> None:
    """While a key is held a second try returns a Waiter without running fn; that waiter
    and plain wait_for_key callers wake with NOTIFY when the holder finishes."""
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> int:
        holding.set()
        await release.wait()
        return 1

    async def must_not_run() -> int:
        raise AssertionError("must not run")

    winner = asyncio.create_task(coordinator.try_acquire_and_run(KEY, hold))
    await holding.wait()
    lost = await coordinator.try_acquire_and_run(KEY, must_not_run)
    assert isinstance(lost, Waiter)
    waiters = [asyncio.create_task(coordinator.wait_for_key(KEY, 60)) for _ in range(2)]
    await parked(coordinator, KEY, 3)

    release.set()

    async with asyncio.timeout(PROMPT):
        assert await winner == Acquired(1)
        assert await lost.wait(60) is WakeReason.NOTIFY
        assert await asyncio.gather(*waiters) == [WakeReason.NOTIFY] * 2
    assert waiting(coordinator, KEY) == 0
    stats = coordinator.stats()
    assert (stats["lock_won"], stats["lock_lost"], stats["woken_notify"]) == (1, 1, 3)


async def test_a_release_before_the_wait_is_not_missed(coordinator: LocalCoordinator) -> None:
    """A holder that finishes between a lost try and the loser's wait still wakes it: the
    waiter was registered by the try itself."""
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    winner = asyncio.create_task(coordinator.try_acquire_and_run(KEY, hold))
    await asyncio.sleep(0)
    lost = await coordinator.try_acquire_and_run(KEY, hold)
    assert isinstance(lost, Waiter)
    release.set()
    await winner
    async with asyncio.timeout(PROMPT):
        assert await lost.wait(60) is WakeReason.NOTIFY


async def test_wait_for_another_key_is_not_woken(coordinator: LocalCoordinator) -> None:
    """Releasing one key does not wake the waiters of another."""
    release_a, release_b = asyncio.Event(), asyncio.Event()

    async def hold(event: asyncio.Event) -> None:
        await event.wait()

    holders = [
        asyncio.create_task(coordinator.try_acquire_and_run("a", lambda: hold(release_a))),
        asyncio.create_task(coordinator.try_acquire_and_run("b", lambda: hold(release_b))),
    ]
    await asyncio.sleep(0)
    waiter_a = asyncio.create_task(coordinator.wait_for_key("a", 60))
    waiter_b = asyncio.create_task(coordinator.wait_for_key("b", 60))
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


async def test_wait_times_out_or_returns_probe_when_nobody_holds_the_key(
    coordinator: LocalCoordinator,
) -> None:
    """A wait on a held key times out with TIMEOUT (no exception, no leaked waiter); a
    wait on a key nobody holds returns PROBE at once."""
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    holder = asyncio.create_task(coordinator.try_acquire_and_run(KEY, hold))
    await asyncio.sleep(0)

    assert await coordinator.wait_for_key(KEY, 0.05) is WakeReason.TIMEOUT
    assert waiting(coordinator, KEY) == 0
    assert await coordinator.wait_for_key('["k","free","public",""]', 60) is WakeReason.PROBE
    release.set()
    await holder


async def test_failing_or_cancelled_winner_wakes_waiters_and_propagates(
    coordinator: LocalCoordinator,
) -> None:
    """A winner whose fn raises (or is cancelled) re-raises unchanged, releases the key
    and wakes its waiters."""
    started = asyncio.Event()
    fail = asyncio.Event()

    async def broken() -> None:
        started.set()
        await fail.wait()
        raise LookupError("the producer broke")

    winner = asyncio.create_task(coordinator.try_acquire_and_run(KEY, broken))
    await started.wait()
    waiter = asyncio.create_task(coordinator.wait_for_key(KEY, 60))
    await parked(coordinator, KEY)
    fail.set()
    with pytest.raises(LookupError):
        await winner
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY

    started.clear()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    winner = asyncio.create_task(coordinator.try_acquire_and_run(KEY, forever))
    await started.wait()
    waiter = asyncio.create_task(coordinator.wait_for_key(KEY, 60))
    await parked(coordinator, KEY)
    winner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await winner
    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.NOTIFY
    assert coordinator._held == set()


async def test_close_wakes_waiters_and_refuses_new_work() -> None:
    """close() wakes parked waiters with CLOSE; later waits return CLOSE and tries and
    starts raise NotOpenError."""
    coordinator = LocalCoordinator()
    await coordinator.start()
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    holder = asyncio.create_task(coordinator.try_acquire_and_run(KEY, hold))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(coordinator.wait_for_key(KEY, 60))
    await parked(coordinator, KEY)

    await coordinator.close()

    async with asyncio.timeout(PROMPT):
        assert await waiter is WakeReason.CLOSE
    assert await coordinator.wait_for_key(KEY, 60) is WakeReason.CLOSE
    with pytest.raises(NotOpenError):
        await coordinator.try_acquire_and_run(KEY, hold)
    with pytest.raises(NotOpenError):
        await coordinator.start()
    await coordinator.close()
    assert coordinator.stats()["woken_close"] == 2
    release.set()
    await holder
