"""Populate coordination inside one process: the reference implementation of the contract.

:class:`LocalCoordinator` has the semantics of
:class:`~fleetcache.coordination.postgres.PostgresCoordinator` without a database: a key's
"lock" is membership of a set, and releasing a key wakes its waiters on every outcome
(result, exception or cancellation). It lets the coordinated path of the lookup run, and
be tested, on the memory and sqlite stores.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from fleetcache._lifecycle import Service
from fleetcache.coordination.base import Acquired, WakeReason, lock_id
from fleetcache.coordination.waiters import Waiter, WaiterRegistry
from fleetcache.logcontext import get_logger

__all__ = ["LocalCoordinator"]

T = TypeVar("T")

logger = get_logger("fleetcache.coordination")


class LocalCoordinator(Service):
    """A :class:`~fleetcache.coordination.base.PopulateCoordinator` for the tasks of one
    event loop. Use it between ``start()`` and ``close()``; ``close()`` wakes every waiter."""

    def __init__(self) -> None:
        super().__init__()
        # Lock ids being computed. Written by try_acquire_and_run (add before running,
        # discard after, then wake) on the event loop; read by the same. No lock needed.
        self._held: set[int] = set()
        self._registry = WaiterRegistry()

    async def _on_close(self) -> None:
        self._registry.wake_all(WakeReason.CLOSE)

    def stats(self) -> dict[str, int]:
        """A copy of the counters (the same keys as the Postgres coordinator's)."""
        return dict(self._registry.stats)

    async def try_acquire_and_run(
        self, coalesce_key: str, fn: Callable[[], Awaitable[T]]
    ) -> Acquired[T] | Waiter:
        """Hold the key while ``fn()`` runs and wake its waiters afterwards, whatever the
        outcome; a :class:`Waiter` at once if the key is already held."""
        self.check_started(f"try_acquire_and_run for {coalesce_key}")
        lid = lock_id(coalesce_key)
        if lid in self._held:
            self._registry.stats["lock_lost"] += 1
            return self._registry.register(coalesce_key, lid)
        self._held.add(lid)
        self._registry.stats["lock_won"] += 1
        try:
            return Acquired(await fn())
        finally:
            self._held.discard(lid)
            self._registry.wake(lid, WakeReason.NOTIFY)

    def announcement(self, coalesce_key: str) -> None:
        """None: this process's waiters are woken by the release itself."""

    async def wait_for_key(self, coalesce_key: str, timeout: float) -> WakeReason:
        """Wait until the key is released (NOTIFY), ``timeout`` passes, or close; PROBE at
        once if nobody holds it (there is nothing to wait for). Never raises."""
        lid = lock_id(coalesce_key)
        if self.closed:
            return self._registry.record(coalesce_key, WakeReason.CLOSE)
        if lid not in self._held:
            return self._registry.record(coalesce_key, WakeReason.PROBE)
        return await self._registry.register(coalesce_key, lid).wait(timeout)
