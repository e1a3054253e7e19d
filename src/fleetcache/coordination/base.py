"""The populate-coordination contract (layer 3) and the lock id every implementation uses."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from fleetcache.coordination.waiters import Waiter

T = TypeVar("T")


def lock_id(coalesce_key: str) -> int:
    """The advisory-lock id and NOTIFY payload of a key: the first 8 bytes of
    ``sha256(coalesce_key)`` read as a big-endian signed int64.

    Give it an unambiguous encoding of the key (``Key.coalesce_key``). Two keys may share a
    lock id (a 64-bit hash collision, or an alias family on purpose): they then only take
    turns computing. They never share a value: values are keyed by the key's fields.

    >>> lock_id("coalesce-test-key")
    4042284392742683263
    """
    return int.from_bytes(hashlib.sha256(coalesce_key.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Acquired(Generic[T]):
    """The lock was won; ``value`` is what the function returned."""

    value: T


class WakeReason(enum.StrEnum):
    """Why a wait ended."""

    NOTIFY = "notify"  # the holder finished (committed, failed, or released) and said so
    TIMEOUT = "timeout"  # the wait ran out
    PROBE = "probe"  # the holder's lock vanished without a NOTIFY (its process died)
    GAP = "gap"  # the LISTEN connection dropped; notifications may have been lost
    CLOSE = "close"  # the coordinator is closing


class PopulateCoordinator(Protocol):
    """Lets one process of a fleet compute a key while the others wait without a connection."""

    async def try_acquire_and_run(
        self, coalesce_key: str, fn: Callable[[], Awaitable[T]]
    ) -> Acquired[T] | Waiter:
        """Take the key's lock without blocking. Won: run ``fn()`` while holding it (no
        transaction and no connection is held for ``fn``), then tell the key's waiters and
        release it, and return ``Acquired(result)``; ``fn``'s exceptions propagate after
        the waiters are told. Lost: return at once a :class:`Waiter` to wait on (already
        registered, so nothing that happens after the lost try is missed)."""

    async def wait_for_key(self, coalesce_key: str, timeout: float) -> WakeReason:
        """Wait until the key's holder is done or ``timeout`` seconds pass (the seed's
        contract; prefer the waiter ``try_acquire_and_run`` returns). Never raises."""

    def announcement(self, coalesce_key: str) -> tuple[str, str] | None:
        """The ``(channel, payload)`` NOTIFY that wakes the key's waiters, for a winner to
        send in its write's own transaction (``Store.write(..., notify=...)``), so they
        wake as the result commits rather than a round trip later; None when waiters are
        not woken by a NOTIFY. The release still wakes them on every outcome."""
