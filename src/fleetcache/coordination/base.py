"""The populate-coordination contract (layer 3) and the lock id every implementation uses."""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


def lock_id(coalesce_key: str) -> int:
    """The advisory-lock id and NOTIFY payload of a key: the first 8 bytes of
    ``sha256(coalesce_key)`` read as a big-endian signed int64.

    >>> lock_id("coalesce-test-key")
    4042284392742683263
    """
    return int.from_bytes(hashlib.sha256(coalesce_key.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Acquired(Generic[T]):
    """The lock was won; ``value`` is what the function returned."""

    value: T


class NotAcquired(enum.Enum):
    """Another process holds the key's lock; the function did not run."""

    NOT_ACQUIRED = "not-acquired"


NOT_ACQUIRED = NotAcquired.NOT_ACQUIRED


class WakeReason(enum.StrEnum):
    """Why ``wait_for_key`` returned."""

    NOTIFY = "notify"  # the holder committed (or failed) and said so
    TIMEOUT = "timeout"  # the wait ran out
    PROBE = "probe"  # the holder's lock vanished without a NOTIFY (its process died)
    GAP = "gap"  # the LISTEN connection dropped; notifications may have been lost
    CLOSE = "close"  # the coordinator is closing


#: The counters every coordinator's ``stats()`` reports.
STAT_KEYS = (
    "lock_won",
    "lock_lost",
    "woken_notify",
    "woken_timeout",
    "woken_probe",
    "woken_gap",
    "woken_close",
    "notify_failures",
)


def record_wake(stats: dict[str, int], coalesce_key: str, reason: WakeReason) -> WakeReason:
    """Count a finished wait under ``woken_<reason>`` and log it; return the reason."""
    stats[f"woken_{reason.value}"] += 1
    logging.getLogger("fleetcache.coordination").debug(
        "waiter of key %r woken: %s",
        coalesce_key,
        reason.value,
        extra={"coalesce_key": coalesce_key},
    )
    return reason


class PopulateCoordinator(Protocol):
    """Lets one process of a fleet compute a key while the others wait without a connection."""

    async def try_acquire_and_run(
        self, coalesce_key: str, fn: Callable[[object], Awaitable[T]]
    ) -> Acquired[T] | NotAcquired:
        """Take the key's lock without blocking. Lost: return ``NOT_ACQUIRED`` at once,
        without running ``fn``. Won: run ``fn(session)`` while holding it, tell the key's
        waiters, and return ``Acquired(result)``. ``fn``'s exceptions propagate (after the
        waiters are told)."""

    async def wait_for_key(self, coalesce_key: str, timeout: float) -> WakeReason:
        """Wait until the key's holder finishes or ``timeout`` seconds pass. Never raises."""
