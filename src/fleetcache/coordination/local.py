"""Populate coordination inside one process: the reference implementation of the contract.

:class:`LocalCoordinator` has the semantics of
:class:`~fleetcache.coordination.postgres.PostgresCoordinator` without a database: a key's
"lock" is membership of a set, ``fn`` gets the session ``None``, and releasing a key wakes
its waiters on every outcome (result, exception or cancellation). It lets the coordinated
path of the lookup run, and be tested, on the memory and sqlite stores.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fleetcache.coordination.base import (
    NOT_ACQUIRED,
    STAT_KEYS,
    Acquired,
    NotAcquired,
    WakeReason,
    record_wake,
)
from fleetcache.errors import NotOpenError

__all__ = ["LocalCoordinator"]

T = TypeVar("T")

logger = logging.getLogger("fleetcache.coordination")


class LocalCoordinator:
    """A :class:`~fleetcache.coordination.base.PopulateCoordinator` for the tasks of one
    event loop.

    ``try_acquire_and_run`` never blocks: a key already held answers ``NOT_ACQUIRED``.
    ``wait_for_key`` returns NOTIFY when the holder releases the key, PROBE at once when
    nobody holds it (the analogue of the Postgres crash probe: there is nothing to wait
    for), TIMEOUT, or CLOSE. It needs no ``start()`` (provided for symmetry); after
    ``close()`` it refuses new work and every wait returns CLOSE.
    """

    def __init__(self) -> None:
        # Keys being computed, and parked waiters by key. Written by try_acquire_and_run
        # (add/discard its key, then wake that key's waiters), wait_for_key (adds its
        # future, removes it when it returns or is cancelled) and close() (wakes all);
        # read by the same. One event loop, no mutation spans an await: no lock.
        self._held: set[str] = set()
        self._waiters: dict[str, set[asyncio.Future[WakeReason]]] = {}
        self._closed = False
        # Counters; incremented on the event loop only, copied by stats().
        self._stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    async def start(self) -> None:
        """Nothing to start; raises :class:`NotOpenError` after :meth:`close`."""
        if self._closed:
            raise NotOpenError("LocalCoordinator is closed; it cannot be started again")

    async def close(self) -> None:
        """Wake every parked waiter with CLOSE and refuse new acquisitions. Idempotent."""
        self._closed = True
        for key in list(self._waiters):
            self._wake(key, WakeReason.CLOSE)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    async def __aenter__(self) -> LocalCoordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stats(self) -> dict[str, int]:
        """A copy of the counters (the same keys as the Postgres coordinator's)."""
        return dict(self._stats)

    async def try_acquire_and_run(
        self, coalesce_key: str, fn: Callable[[None], Awaitable[T]]
    ) -> Acquired[T] | NotAcquired:
        """Hold ``coalesce_key`` while ``fn(None)`` runs and wake its waiters afterwards,
        whatever the outcome; ``NOT_ACQUIRED`` at once if the key is already held.
        ``fn``'s exceptions propagate unchanged."""
        if self._closed:
            raise NotOpenError(
                f"LocalCoordinator is closed: try_acquire_and_run refused for {coalesce_key!r}"
            )
        extra = {"coalesce_key": coalesce_key}
        if coalesce_key in self._held:
            self._stats["lock_lost"] += 1
            logger.debug("lost the lock of key %r", coalesce_key, extra=extra)
            return NOT_ACQUIRED
        self._held.add(coalesce_key)
        self._stats["lock_won"] += 1
        logger.debug("won the lock of key %r", coalesce_key, extra=extra)
        try:
            result = await fn(None)
        except BaseException as exc:
            logger.warning(
                "the computation of key %r failed (%s: %s); waking its waiters",
                coalesce_key,
                type(exc).__name__,
                exc,
                extra=extra,
            )
            raise
        finally:
            self._held.discard(coalesce_key)
            self._wake(coalesce_key, WakeReason.NOTIFY)
        return Acquired(result)

    async def wait_for_key(self, coalesce_key: str, timeout: float) -> WakeReason:
        """Wait until the key's holder releases it (NOTIFY), ``timeout`` seconds pass
        (TIMEOUT) or the coordinator closes (CLOSE); PROBE at once if nobody holds the key.
        Never raises."""
        if self._closed:
            reason = WakeReason.CLOSE
        elif coalesce_key not in self._held:
            reason = WakeReason.PROBE
        else:
            future: asyncio.Future[WakeReason] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(coalesce_key, set()).add(future)
            try:
                async with asyncio.timeout(timeout):
                    reason = await future
            except TimeoutError:
                # A wake may land in the same loop iteration as the timeout; it wins.
                done = future.done() and not future.cancelled()
                reason = future.result() if done else WakeReason.TIMEOUT
            finally:
                waiters = self._waiters.get(coalesce_key)
                if waiters is not None:
                    waiters.discard(future)
                    if not waiters:
                        del self._waiters[coalesce_key]
        return record_wake(self._stats, coalesce_key, reason)

    def _wake(self, coalesce_key: str, reason: WakeReason) -> None:
        for future in self._waiters.pop(coalesce_key, set()):
            if not future.done():
                future.set_result(reason)
