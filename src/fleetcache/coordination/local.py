"""Populate coordination among the tasks of one process: the contract without a database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fleetcache._lifecycle import Service
from fleetcache.coordination.base import KeyLock, Reading, WakeReason, lock_id
from fleetcache.coordination.waiters import WaiterRegistry
from fleetcache.logcontext import get_logger

__all__ = ["LocalCoordinator"]

logger = get_logger("fleetcache.coordination")


class LocalCoordinator(Service):
    """A :class:`~fleetcache.coordination.base.PopulateCoordinator` for the tasks of one
    event loop, with the Postgres coordinator's semantics: a key's lock is membership of a
    set, and its release wakes its waiters on every outcome (so no NOTIFY is needed). Use
    it between ``start()`` and ``close()``; ``close()`` wakes every waiter."""

    def __init__(self) -> None:
        super().__init__()
        # Lock ids being computed. Written by lock() (add when won, discard at the release,
        # then wake) on the event loop; read by the same. No lock needed.
        self._held: set[int] = set()
        self._registry = WaiterRegistry()

    async def _on_close(self) -> None:
        self._registry.wake_all(WakeReason.CLOSE)

    def waiters(self) -> int:
        """How many callers are parked on a lost lock now (or about to try one)."""
        return self._registry.parked()

    def stats(self) -> dict[str, int]:
        """A copy of the counters (the same keys as the Postgres coordinator's)."""
        return dict(self._registry.stats)

    @contextlib.asynccontextmanager
    async def lock(
        self, coalesce_key: str, reading: Reading | None = None
    ) -> AsyncIterator[KeyLock]:
        """The key's lock, held until the block ends (see
        :meth:`~fleetcache.coordination.base.PopulateCoordinator.lock`); nothing is read
        with the try (``reading`` is ignored: the caller reads the store)."""
        self.check_started(f"the lock of key {coalesce_key}")
        lid = lock_id(coalesce_key)
        if lid in self._held:
            self._registry.stats["lock_lost"] += 1
            waiter = self._registry.register(coalesce_key, lid)
            try:
                yield KeyLock(coalesce_key, won=False, _waiter=waiter)
            finally:
                waiter.cancel()
            return
        self._held.add(lid)
        self._registry.stats["lock_won"] += 1
        try:
            yield KeyLock(coalesce_key, won=True)
        finally:
            self._held.discard(lid)
            self._registry.wake(lid, WakeReason.NOTIFY)
