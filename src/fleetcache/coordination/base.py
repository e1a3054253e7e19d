"""The populate-coordination contract (layer 3) and the lock id every implementation uses."""

from __future__ import annotations

import enum
import hashlib
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fleetcache.stores.base import Entry, GenerationStamp, Key

if TYPE_CHECKING:
    from fleetcache.coordination.waiters import Waiter

#: A stamp and the entry stored under a key (``Store.stamp_and_read``'s answer).
Found = tuple[GenerationStamp, Entry | None]


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
class Reading:
    """What the try of a key's lock may read in the same round trip, where its coordinator
    can (the Postgres one, on its session): ``stamp_and_read(key, names, by_alias=...)``."""

    key: Key
    names: tuple[str, ...]
    by_alias: bool


class Answer(Protocol):
    """Makes the stamp and entry out of the row a lock's reading returned."""

    def answer(self, row: tuple[Any, ...] | None) -> Found: ...


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
    the release wakes the waiters of every other process only if no write did; a winner
    that found the key already filled by another process sets ``quiet`` (that fill's own
    write woke them, and a waiter that came later found the row before it parked).
    :meth:`found` is what the try read, when the coordinator read with it (won or lost).
    Lost: ``await lock.wait(timeout)`` parks until the holder is done (see
    :class:`WakeReason`); the waiter was registered before the try, so nothing that happens
    after the lost try is missed.
    """

    coalesce_key: str
    won: bool
    notify: tuple[str, str] | None = None
    notified: bool = False
    quiet: bool = False
    _waiter: Waiter | None = field(default=None, repr=False)
    _read: tuple[Answer, tuple[Any, ...] | None] | None = field(default=None, repr=False)

    def found(self) -> Found | None:
        """The stamp and entry the try of the lock read (taken after the try, in the same
        round trip), or None when it read nothing: then the caller reads the store."""
        if self._read is None:
            return None
        answer, row = self._read
        return answer.answer(row)

    async def wait(self, timeout: float) -> WakeReason:
        """Park until the key's holder is done, or ``timeout`` seconds pass; say which.
        Holds no connection; never raises (but for cancellation). Only for a lost lock."""
        if self._waiter is None:
            raise RuntimeError(f"the lock of key {self.coalesce_key} was won: nothing to wait for")
        return await self._waiter.wait(timeout)


class PopulateCoordinator(Protocol):
    """Lets one process of a fleet compute a key while the others wait without a connection."""

    def lock(
        self, coalesce_key: str, reading: Reading | None = None
    ) -> AbstractAsyncContextManager[KeyLock]:
        """The key's lock, tried without blocking when the block is entered; see
        :class:`KeyLock`. ``reading``: what the try may read in the same round trip (a
        coordinator that cannot ignores it). A won lock is released when the block ends,
        however it ends (an exception or a cancellation included: the release is shielded),
        and the release wakes the key's waiters in this process, and in the others unless
        the winner's write already did."""

    def stats(self) -> dict[str, int]:
        """Counters: locks won and lost, waits by how they ended, NOTIFYs sent for keys
        (``notifies``, in a write or at a release) and NOTIFYs that could not be sent."""
