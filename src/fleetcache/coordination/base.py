"""The populate-coordination contract (layer 3) and the lock id every implementation uses."""

from __future__ import annotations

import enum
import hashlib
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fleetcache.coordination.waiters import Waiter


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


class WakeReason(enum.StrEnum):
    """Why a wait ended."""

    NOTIFY = "notify"  # the holder finished (committed, failed, or released) and said so
    TIMEOUT = "timeout"  # the wait ran out
    PROBE = "probe"  # the holder's lock vanished without a NOTIFY (its process died)
    GAP = "gap"  # the LISTEN connection dropped; notifications may have been lost
    CLOSE = "close"  # the coordinator is closing


@dataclass(eq=False, slots=True)
class KeyLock:
    """One try of a key's lock: what ``async with coordinator.lock(key) as lock`` gives.

    ``won``: this task holds the key's lock until the ``async with`` block ends. A winner's
    write sends ``notify`` (a ``(channel, payload)`` NOTIFY, None when the key's waiters
    are woken by the release alone) in its own transaction and then sets ``notified``, so
    the release wakes the waiters of every other process only if no write did.
    Lost: ``await lock.wait(timeout)`` parks until the holder is done (see
    :class:`WakeReason`); the waiter was registered before the try, so nothing that happens
    after the lost try is missed.
    """

    coalesce_key: str
    won: bool
    notify: tuple[str, str] | None = None
    notified: bool = False
    _waiter: Waiter | None = field(default=None, repr=False)

    async def wait(self, timeout: float) -> WakeReason:
        """Park until the key's holder is done, or ``timeout`` seconds pass; say which.
        Holds no connection; never raises (but for cancellation). Only for a lost lock."""
        if self._waiter is None:
            raise RuntimeError(f"the lock of key {self.coalesce_key} was won: nothing to wait for")
        return await self._waiter.wait(timeout)


class PopulateCoordinator(Protocol):
    """Lets one process of a fleet compute a key while the others wait without a connection."""

    def lock(self, coalesce_key: str) -> AbstractAsyncContextManager[KeyLock]:
        """The key's lock, tried without blocking when the block is entered; see
        :class:`KeyLock`. A won lock is released when the block ends, however it ends
        (an exception or a cancellation included: the release is shielded), and the
        release wakes the key's waiters in this process, and in the others unless the
        winner's write already did."""

    def stats(self) -> dict[str, int]:
        """Counters: locks won and lost, waits by how they ended, NOTIFYs sent for keys
        (``notifies``, in a write or at a release) and NOTIFYs that could not be sent."""
