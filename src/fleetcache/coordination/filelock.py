"""Populate coordination among the processes of one machine: one byte of a lock file per
key, locked with the operating system's open-file-description locks (Linux)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no fcntl; file_locks_supported() says so
    fcntl = None  # type: ignore[assignment]

from fleetcache._lifecycle import Service
from fleetcache.coordination.base import KeyLock, Reading, WakeReason, lock_id
from fleetcache.coordination.waiters import WaiterRegistry
from fleetcache.errors import ConfigurationError, CoordinationError
from fleetcache.logcontext import get_logger

__all__ = ["FileLockCoordinator", "file_locks_supported"]

logger = get_logger("fleetcache.coordination")

#: How many bytes of the lock file keys are spread over: the largest 31-bit prime, so a
#: lock id's byte is ``lock_id mod SLOTS`` and two keys share one only by chance (they then
#: take turns). The file stays sparse: locking a byte writes nothing.
SLOTS = 2_147_483_647

#: The most lock ids watched at once (one thread each, blocked in the kernel until the
#: holder releases or dies). A key past the cap waits by its wait timeout instead.
MAX_WATCHERS = 64

# struct flock on Linux (x86_64, aarch64): l_type, l_whence, l_start, l_len, l_pid (0 for
# OFD locks), padded to 32 bytes.
_FLOCK = "hhqqixxxx"
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)


def file_locks_supported() -> bool:
    """Whether this platform has open-file-description byte-range locks (Linux does;
    macOS and Windows do not)."""
    return _OFD_SETLK is not None and _OFD_SETLKW is not None


def _flock(kind: int, offset: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)


class FileLockCoordinator(Service):
    """A :class:`~fleetcache.coordination.base.PopulateCoordinator` for the processes of one
    machine sharing a sqlite file, with no server: a key's lock is an exclusive lock on one
    byte (``lock_id mod slots``) of ``path``, a sparse lock file beside the database.

    Open-file-description locks (``F_OFD_SETLK``), not classic ``lockf`` ones: they belong
    to the open file, not the process, so two coordinators of one process exclude each other
    and a watcher's own descriptor can be closed without dropping the process's other locks.
    A dead process's locks vanish with it, so its waiters take over at once.

    A loser registers a waiter and makes sure one watcher thread is blocked in
    ``F_OFD_SETLKW`` on the byte (one thread per contended byte, at most ``max_watchers``):
    the kernel returns it exactly when the holder releases (after its write committed) or
    dies; the watcher lets go of the byte at once and wakes the byte's waiters. No polling,
    and no sqlite lock held while waiting. A waiter's wait is bounded on the event loop;
    a watcher whose holder is frozen stays blocked (a daemon thread, never joined) until
    that holder goes. ``close()`` wakes every waiter.
    """

    def __init__(
        self, path: str | Path, *, slots: int = SLOTS, max_watchers: int = MAX_WATCHERS
    ) -> None:
        super().__init__()
        if not file_locks_supported():
            raise ConfigurationError(
                "cross-process coordination on a sqlite file needs open-file-description "
                f"locks (Linux); this platform ({os.name}) has none: open with coordinate=False"
            )
        if slots < 1:
            raise ConfigurationError(f"slots must be at least 1, got {slots}")
        self.path = str(path)
        self._slots = slots
        self._max_watchers = max_watchers
        # The descriptor holding this coordinator's won locks: opened by _on_start, closed by
        # _on_close (which drops every lock on it). Used on the event loop only.
        self._fd: int | None = None
        # Bytes this coordinator holds, and bytes a watcher thread is blocked on. Both are
        # written and read on the event loop only (watchers report through
        # call_soon_threadsafe), never across an await: no lock. A byte in _held is lost at
        # once to the other tasks here (our own descriptor would grant it again).
        self._held: set[int] = set()
        self._watching: set[int] = set()
        self._registry = WaiterRegistry()
        # Set by close(): watchers finishing afterwards have nobody to wake.
        self._stopping = threading.Event()
        self._pid = 0  # the process that opened the lock file (set by _on_start)

    async def _on_start(self) -> None:
        self._pid = os.getpid()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CoordinationError(f"opening lock file {self.path!r} failed: {exc}") from exc

    async def _on_close(self) -> None:
        self._stopping.set()
        self._registry.wake_all(WakeReason.CLOSE)
        fd, self._fd = self._fd, None
        self._held.clear()
        if fd is not None:
            os.close(fd)  # drops every lock this coordinator still holds

    def stats(self) -> dict[str, int]:
        """A copy of the counters (the same keys as the Postgres coordinator's)."""
        return dict(self._registry.stats)

    def slot(self, coalesce_key: str) -> int:
        """The byte of the lock file that stands for ``coalesce_key``."""
        return lock_id(coalesce_key) % self._slots

    @contextlib.asynccontextmanager
    async def lock(
        self, coalesce_key: str, reading: Reading | None = None
    ) -> AsyncIterator[KeyLock]:
        """The key's lock, held until the block ends (see
        :meth:`~fleetcache.coordination.base.PopulateCoordinator.lock`); nothing is read
        with the try (``reading`` is ignored: the caller reads the store)."""
        self.check_started(f"the lock of key {coalesce_key}")
        if os.getpid() != self._pid:
            # A forked child shares the parent's open file, hence its locks: it would never
            # be excluded by its parent or its siblings.
            raise CoordinationError(
                f"the lock file {self.path!r} was opened by process {self._pid}, before a "
                f"fork; process {os.getpid()} must open its own cache"
            )
        fd = self._fd
        assert fd is not None
        slot = self.slot(coalesce_key)
        # Registered before the try, so a release between the try and the wait is not missed.
        waiter = self._registry.register(coalesce_key, slot)
        won = slot not in self._held and self._try(fd, slot, coalesce_key)
        if not won:
            self._registry.stats["lock_lost"] += 1
            if slot not in self._held:
                self._watch(slot)  # held by another process: the kernel says when it goes
            try:
                yield KeyLock(coalesce_key, won=False, _waiter=waiter)
            finally:
                waiter.cancel()
            return
        waiter.cancel()
        self._held.add(slot)
        self._registry.stats["lock_won"] += 1
        try:
            yield KeyLock(coalesce_key, won=True)
        finally:
            # Synchronous, so a cancellation cannot skip it; other processes' watchers wake.
            self._held.discard(slot)
            try:
                if self._fd == fd:
                    fcntl.fcntl(fd, _OFD_SETLK, _flock(fcntl.F_UNLCK, slot))  # type: ignore[arg-type]
            finally:
                self._registry.wake(slot, WakeReason.NOTIFY)

    def _try(self, fd: int, slot: int, coalesce_key: str) -> bool:
        """Try the byte's lock without blocking: a syscall, no disk I/O."""
        try:
            fcntl.fcntl(fd, _OFD_SETLK, _flock(fcntl.F_WRLCK, slot))  # type: ignore[arg-type]
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise CoordinationError(
                f"locking byte {slot} of lock file {self.path!r} for key {coalesce_key} "
                f"failed: {exc}"
            ) from exc
        return True

    def _watch(self, slot: int) -> None:
        """Make sure a watcher thread waits for ``slot``'s holder in another process."""
        if slot in self._watching or len(self._watching) >= self._max_watchers:
            return
        self._watching.add(slot)
        loop = asyncio.get_running_loop()

        def done() -> None:
            # On the loop: the byte was free a moment ago; wake whoever waits for it.
            self._watching.discard(slot)
            if not self._stopping.is_set():
                self._registry.wake(slot, WakeReason.NOTIFY)

        def watch() -> None:
            try:
                # Our own descriptor: the wait never grants, nor its close drops, a lock of
                # the coordinator's descriptor.
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.fcntl(fd, _OFD_SETLKW, _flock(fcntl.F_WRLCK, slot))  # type: ignore[arg-type]
                finally:
                    os.close(fd)  # lets go of the byte at once
            except OSError:
                logger.exception("watching byte %d of lock file %s failed", slot, self.path)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(done)

        threading.Thread(target=watch, name=f"fleetcache-lock-{slot}", daemon=True).start()
