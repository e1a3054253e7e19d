"""The waiter registry both coordinators share: callers parked on a lost lock, by lock id.

Waiters are registered before the try-lock; whoever learns that a key's holder is done (a
release here, a NOTIFY, the crash probe, a LISTEN gap, close) wakes them through it.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from dataclasses import dataclass, field

from fleetcache.coordination.base import WakeReason
from fleetcache.logcontext import get_logger

logger = get_logger("fleetcache.coordination")

#: The counters every coordinator's ``stats()`` reports.
STAT_KEYS = (
    "lock_won",
    "lock_lost",
    "woken_notify",
    "woken_timeout",
    "woken_probe",
    "woken_gap",
    "woken_close",
    "notifies",
    "notify_failures",
)


@dataclass(eq=False, slots=True)
class Waiter:
    """One caller parked on a key: ``await waiter.wait(timeout)``, or ``cancel()``.

    Behind a lost :class:`~fleetcache.coordination.base.KeyLock`. It is registered before
    the try, so a wake that happened since the lost try is not missed.
    """

    coalesce_key: str
    lock_id: int
    _registry: WaiterRegistry = field(repr=False)
    _future: asyncio.Future[WakeReason] = field(repr=False)
    # Registration order; a crash probe judges only waiters armed before its query began
    # (sys.maxsize until the caller's try-lock has lost).
    seq: int = sys.maxsize

    async def wait(self, timeout: float) -> WakeReason:
        """Wait until the key's holder is done, or ``timeout`` seconds pass; say which.
        Never raises (but for cancellation); the waiter is forgotten afterwards."""
        try:
            async with asyncio.timeout(timeout):
                reason = await self._future
        except TimeoutError:
            # A wake may land in the same loop iteration as the timeout; it wins.
            done = self._future.done() and not self._future.cancelled()
            reason = self._future.result() if done else WakeReason.TIMEOUT
        finally:
            self._registry.remove(self)
        return self._registry.record(self.coalesce_key, reason)

    def cancel(self) -> None:
        """Forget this waiter without waiting (idempotent)."""
        self._registry.remove(self)

    def wake(self, reason: WakeReason) -> bool:
        """Resolve the wait with ``reason`` unless it already ended; True if it did now."""
        if self._future.done():
            return False
        self._future.set_result(reason)
        return True


class WaiterRegistry:
    """Parked waiters by lock id, and the wake counters.

    Shared state, all on one event loop and never mutated across an await, so no lock:
    ``_waiters`` is written by ``register`` (add), ``remove`` (a waiter leaving) and the
    ``wake*`` methods (which pop whole sets); it is read by the coordinator's NOTIFY
    handler, crash probe and close. ``waiting`` is set exactly while ``_waiters`` is
    non-empty (the probe sleeps on it). ``stats`` is incremented on the loop only.
    """

    def __init__(self) -> None:
        self._waiters: dict[int, set[Waiter]] = {}
        self._seq = itertools.count(1)
        self.last_seq = 0
        self.waiting = asyncio.Event()
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    def register(self, coalesce_key: str, lock_id: int, *, armed: bool = True) -> Waiter:
        """Park a new waiter for ``lock_id``. One registered before its caller's try-lock
        (``armed=False``) is not judged by a crash probe until :meth:`arm`: a free lock says
        nothing about a key its caller may be about to take itself."""
        future: asyncio.Future[WakeReason] = asyncio.get_running_loop().create_future()
        waiter = Waiter(coalesce_key, lock_id, self, future)
        if armed:
            self.arm(waiter)
        self._waiters.setdefault(lock_id, set()).add(waiter)
        self.waiting.set()
        return waiter

    def arm(self, waiter: Waiter) -> None:
        """Let crash probes that start from now on judge ``waiter``."""
        waiter.seq = self.last_seq = next(self._seq)

    def remove(self, waiter: Waiter) -> None:
        """Forget ``waiter`` (idempotent)."""
        waiters = self._waiters.get(waiter.lock_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[waiter.lock_id]
        if not self._waiters:
            self.waiting.clear()

    def wake(self, lock_id: int, reason: WakeReason) -> int:
        """Wake every waiter of ``lock_id``; return how many."""
        waiters = self._waiters.pop(lock_id, set())
        if not self._waiters:
            self.waiting.clear()
        return sum(waiter.wake(reason) for waiter in waiters)

    def wake_all(self, reason: WakeReason) -> int:
        """Wake every waiter; return how many."""
        return sum(self.wake(lock_id, reason) for lock_id in list(self._waiters))

    def parked(self) -> int:
        """How many waiters are registered now (from any thread)."""
        # A copy first: a scrape may call this from another thread while the loop adds.
        return sum(map(len, list(self._waiters.values())))

    def lock_ids(self) -> list[int]:
        """The lock ids somebody waits on."""
        return list(self._waiters)

    def judged_by(self, cutoff: int) -> list[int]:
        """The lock ids with a waiter armed at or before ``cutoff``."""
        return [lid for lid, ws in self._waiters.items() if any(w.seq <= cutoff for w in ws)]

    def wake_judged(self, lock_id: int, cutoff: int, reason: WakeReason) -> int:
        """Wake the waiters of ``lock_id`` armed at or before ``cutoff``; return how many."""
        due = [w for w in self._waiters.get(lock_id, ()) if w.seq <= cutoff]
        for waiter in due:
            self.remove(waiter)
        return sum(waiter.wake(reason) for waiter in due)

    def record(self, coalesce_key: str, reason: WakeReason) -> WakeReason:
        """Count a finished wait under ``woken_<reason>`` and log it; return the reason."""
        self.stats[f"woken_{reason.value}"] += 1
        logger.debug("waiter of key %s woken: %s", coalesce_key, reason.value)
        return reason
