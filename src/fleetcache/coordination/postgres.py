"""Populate coordination across a fleet: session advisory locks on the process's one
session connection (the notification hub's, which also LISTENs), NOTIFY to wake the waiters
of other processes, and a crash probe over ``pg_locks``. Why, and how a silent holder loses
its locks, is argued in ``docs/design.md`` ("The lock discipline").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from fleetcache._lifecycle import Service
from fleetcache._pg import pooled
from fleetcache.coordination.base import KeyLock, Reading, WakeReason, lock_id
from fleetcache.coordination.waiters import Waiter, WaiterRegistry
from fleetcache.errors import (
    ConfigurationError,
    CoordinationError,
    NotificationError,
    SessionLostError,
)
from fleetcache.logcontext import get_logger
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME, NotificationHub
from fleetcache.stores.postgres import PostgresStore, StampAndRead

__all__ = ["POPULATED_CHANNEL", "PostgresCoordinator", "advisory_lock_tag"]

logger = get_logger("fleetcache.coordination")

#: The channel winners notify on; the payload is the key's lock id in decimal.
POPULATED_CHANNEL = "fleetcache_populated_v1"
#: Shown in ``pg_stat_activity`` for the connection holding the locks: the session's.
LOCK_APPLICATION_NAME = DEFAULT_APPLICATION_NAME
#: How long (seconds) the server keeps a silent session, and its locks, by default.
LOCK_IDLE_TIMEOUT = 10.0
#: How long (seconds) a try-lock waits for a session that is down (reconnecting) before
#: its key is computed without the fleet's lock.
SESSION_WAIT = 2.0
#: The generation of a "won" try made without a lock (never a live connection's).
UNLOCKED = 0

# --------------------------------------------------------------------------- SQL
# Every statement the coordinator runs. Values are always bound as parameters.

#: Takes the key's session lock without blocking; true when won.
_TRY_LOCK = "SELECT pg_try_advisory_lock(%(id)s)"
#: Tells the key's waiters and releases its lock, in one statement: the release of a winner
#: whose write did not notify (it failed, stored nothing, or was refused).
_NOTIFY_AND_UNLOCK = "SELECT pg_notify(%(channel)s, %(payload)s), pg_advisory_unlock(%(id)s)"
#: Releases the key's lock: its write's NOTIFY already woke the waiters as it committed.
_UNLOCK = "SELECT pg_advisory_unlock(%(id)s)"
#: Tells the key's waiters when the lock already died with its connection.
_NOTIFY = "SELECT pg_notify(%(channel)s, %(payload)s)"
#: The crash probe: which of the given (classid, objid) pairs, i.e. one-bigint advisory
#: locks (objsubid 1) of this database, some session holds now. Bound as two bigint arrays
#: of the unsigned halves (see ``advisory_lock_tag``).
_HELD_LOCKS = """
    SELECT DISTINCT l.classid::bigint, l.objid::bigint
    FROM pg_locks AS l
    JOIN unnest(%(classids)s::bigint[], %(objids)s::bigint[]) AS w(classid, objid)
        ON l.classid::bigint = w.classid AND l.objid::bigint = w.objid
    WHERE l.locktype = 'advisory'
        AND l.objsubid = 1
        AND l.granted
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

_UINT32 = 0xFFFF_FFFF
_UINT64 = 0xFFFF_FFFF_FFFF_FFFF


def advisory_lock_tag(lock_id: int) -> tuple[int, int]:
    """Where ``pg_locks`` shows the one-bigint advisory lock ``lock_id``: its
    ``(classid, objid)``, the high and the low 32 bits of the id's two's complement, both
    unsigned (``oid``). The row also has ``locktype = 'advisory'`` and ``objsubid = 1``.

    >>> advisory_lock_tag(-1)
    (4294967295, 4294967295)
    >>> advisory_lock_tag(2**32 + 5)
    (1, 5)
    """
    unsigned = lock_id & _UINT64
    return unsigned >> 32, unsigned & _UINT32


def _lock_id_of_tag(classid: int, objid: int) -> int:
    """The inverse of :func:`advisory_lock_tag`."""
    unsigned = (classid << 32) | objid
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


class _LockLine:
    """Where the locks live: statements on the hub's session connection. ``gen`` (the
    hub's :attr:`~fleetcache.notifications.hub.NotificationHub.generation`) names the
    connection a lock was taken on: locks taken on an older one died with it. Stateless
    beyond the hub: the hub serialises the statements and replaces a lost connection."""

    def __init__(self, hub: NotificationHub) -> None:
        self._hub = hub

    def is_current(self, gen: int) -> bool:
        """Whether locks taken on the session's connection ``gen`` are still held."""
        return self._hub.holds_session(gen)

    async def statement(
        self,
        what: str,
        query: str,
        params: dict[str, Any],
        *,
        retry: bool = True,
        wait: float | None = None,
        binary: bool = False,
    ) -> tuple[tuple[Any, ...] | None, int]:
        """Run one statement on the session; return its row and the connection's
        generation. A lost connection is replaced by the hub and (with ``retry``) the
        statement run once more on the new one: whatever the lost one held died with it.
        ``wait``: how long to wait for a session that is down (default: the hub's connect
        budget); a session lost for good raises CoordinationError from SessionLostError."""
        for attempt in (1, 2):
            try:
                return await self._hub.execute(query, params, wait=wait, binary=binary)
            except SessionLostError as exc:
                if not (retry and attempt == 1):
                    raise CoordinationError(f"{what} failed: {exc}") from exc
                logger.warning(
                    "the session connection was lost (%s); the server released the locks it "
                    "held: peers may compute those keys too (their results are still checked "
                    "by the store)",
                    exc,
                )
            except NotificationError as exc:
                raise CoordinationError(f"{what} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


class PostgresCoordinator(Service):
    """A :class:`~fleetcache.coordination.base.PopulateCoordinator` for a fleet sharing one
    Postgres database.

    ``hub`` is the process's session: it delivers the notifications (it must listen on
    ``channel``) and carries the locks, on its one connection; ``pool`` (autocommit
    connections) serves the crash probe. ``lock_idle_timeout`` bounds how long a silent
    holder (stopped, partitioned) keeps its keys locked (it becomes the session's
    ``idle_session_timeout``). ``reads``: the store whose stamp-and-read a try-lock sends
    in its own round trip when asked (see :class:`~fleetcache.coordination.base.Reading`).
    The pool, the hub and the store belong to the caller, who starts them before and
    closes them after this coordinator. Use it between ``await start()`` and
    ``await close()`` (or ``async with``).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        hub: NotificationHub,
        *,
        channel: str = POPULATED_CHANNEL,
        probe_interval: float = 1.0,
        lock_idle_timeout: float = LOCK_IDLE_TIMEOUT,
        reads: PostgresStore | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(lock_idle_timeout, bool)
            or not isinstance(lock_idle_timeout, int | float)
            or not 0.1 <= lock_idle_timeout <= 86_400
        ):
            raise ConfigurationError(
                f"lock_idle_timeout must be from 0.1 to 86400 seconds, got {lock_idle_timeout!r}"
            )
        self._lock_idle_timeout = float(lock_idle_timeout)
        self._pool = pool
        self._hub = hub
        self._reads = reads
        self._channel = channel
        self._probe_interval = probe_interval
        self._registry = WaiterRegistry()
        # Lock ids held by a task of this process, each with the generation of the session
        # connection it was taken on. Written by lock() (insert before its try-lock, remove
        # after a lost try) and _release/_abandon (remove); read by lock(). Event loop
        # only, never mutated across an await by two tasks for one id: no lock.
        self._held: dict[int, int] = {}
        # Where every lock goes: the hub's session (see _line).
        self._session = _LockLine(hub)
        # Keys computed without the lock while the session was down (_try_statement).
        self._unlocked = 0

    # ------------------------------------------------------------------ lifecycle

    async def _on_start(self) -> None:
        self._hub.add_handler(self._channel, self._on_notify)
        self._hub.add_gap_handler(self._on_gap)
        try:
            await self._hub.bound_idleness(self._lock_idle_timeout)
        except NotificationError as exc:
            raise CoordinationError(f"bounding the session's idleness failed: {exc}") from exc
        self.spawn(self._probe_loop(), "coordinator probe")

    async def _on_close(self) -> None:
        woken = self._registry.wake_all(WakeReason.CLOSE)
        if woken:
            logger.info("coordinator closing: woke %d waiter(s)", woken)

    def waiters(self) -> int:
        """How many callers are parked on a lost lock now (or about to try one)."""
        return self._registry.parked()

    def lock_connections(self) -> int:
        """How many connections this coordinator holds of its own: none (the locks live on
        the hub's session)."""
        return 0

    def stats(self) -> dict[str, int]:
        """A copy of the counters: lock_won, lock_lost, woken_notify, woken_timeout,
        woken_probe, woken_gap, woken_close, notifies (NOTIFYs sent for keys, by a
        winner's write or its release: one per won lock, none for a winner that found the
        key filled), notify_failures, and computed_unlocked (keys won without the fleet's
        lock while the session was down)."""
        return {**self._registry.stats, "computed_unlocked": self._unlocked}

    # ------------------------------------------------------------------ winner

    @contextlib.asynccontextmanager
    async def lock(
        self, coalesce_key: str, reading: Reading | None = None
    ) -> AsyncIterator[KeyLock]:
        """The key's session lock, tried without blocking as the block is entered and
        held, with no transaction and no pooled connection, until it ends; see
        :meth:`~fleetcache.coordination.base.PopulateCoordinator.lock`. The release is
        shielded: a cancelled winner still gives the lock back and wakes the waiters
        (with a NOTIFY unless its write sent one). Driver errors of the coordinator's own
        statements leave as :class:`CoordinationError`."""
        self.check_started(f"the lock of key {coalesce_key}")
        lid = lock_id(coalesce_key)
        read = self._statement(reading)  # before the claim: it checks the names
        # Registered before the try: if we lose, the holder may finish before we wait.
        waiter = self._registry.register(coalesce_key, lid, armed=False)
        line = self._line(lid)
        if lid in self._held:  # a task of this process holds it: lost, without a query
            won, gen, found = False, UNLOCKED, None
        else:
            self._held[lid] = -1  # claimed locally before the await: other tasks lose here
            try:
                won, gen, found = await self._try_lock(coalesce_key, lid, line, read)
            except BaseException as exc:
                waiter.cancel()
                if not isinstance(exc, asyncio.CancelledError):  # else _abandon owns the claim
                    self._held.pop(lid, None)
                raise
            if not won:
                del self._held[lid]
        if not won:
            self._lost(waiter)
            try:
                yield KeyLock(coalesce_key, won=False, _waiter=waiter, _read=found)
            finally:
                waiter.cancel()
            return
        waiter.cancel()
        self._held[lid] = gen
        self._registry.stats["lock_won"] += 1
        logger.debug("won the lock of key %s (id %d)", coalesce_key, lid)
        held = KeyLock(coalesce_key, won=True, notify=(self._channel, str(lid)), _read=found)
        try:
            yield held
        except asyncio.CancelledError:
            logger.info("the computation of key %s was cancelled; waking its waiters", coalesce_key)
            raise
        except BaseException as exc:
            logger.warning(
                "the computation of key %s failed (%s: %s); waking its waiters",
                coalesce_key,
                type(exc).__name__,
                exc,
            )
            raise
        finally:
            if held.notified:
                self._registry.stats["notifies"] += 1  # sent by the winner's write
            # Shielded: a cancelled winner must still release and notify.
            await asyncio.shield(
                self._release(
                    coalesce_key, lid, line, gen, notify=not (held.notified or held.quiet)
                )
            )

    def _lost(self, waiter: Waiter) -> None:
        self._registry.stats["lock_lost"] += 1
        self._registry.arm(waiter)  # from now on the probe may judge it
        logger.debug("lost the lock of key %s", waiter.coalesce_key)

    def _statement(self, reading: Reading | None) -> StampAndRead | None:
        """The stamp-and-read to send with a try-lock (None: the caller reads the store)."""
        if reading is None or self._reads is None:
            return None
        return self._reads.stamp_and_read_statement(
            reading.key, reading.names, by_alias=reading.by_alias
        )

    async def _try_lock(
        self, coalesce_key: str, lid: int, line: _LockLine, read: StampAndRead | None
    ) -> tuple[bool, int, tuple[StampAndRead, tuple[Any, ...]] | None]:
        """Whether the lock was won, the generation of the connection it was tried on, and
        what ``read`` found (in the same statement; None without one). The statement runs
        in its own task: a caller cancelled mid-statement must not leave a lock taken for
        nobody, so the task finishes and gives such a lock back."""
        task = asyncio.ensure_future(self._try_statement(coalesce_key, lid, line, read))
        try:
            row, gen = await asyncio.shield(task)
        except asyncio.CancelledError:
            self.spawn(self._abandon(task, coalesce_key, lid, line), f"abandon {lid}")
            raise
        won = bool(row and row[0])
        found = (read, row[1:]) if read is not None and row and gen != UNLOCKED else None
        return won, gen, found

    async def _try_statement(
        self, coalesce_key: str, lid: int, line: _LockLine, read: StampAndRead | None
    ) -> tuple[tuple[Any, ...] | None, int]:
        """The try-lock's row (with ``read``: ``won`` and then the stamp-and-read's row,
        taken after the try in the same statement) and the generation. While the session
        is down for longer than ``SESSION_WAIT``, a win on no lock (generation
        ``UNLOCKED``, nothing read): this process computes the key without the fleet's
        lock rather than fail its callers (peers may compute it too; the store still
        refuses a stale write)."""
        what = f"the try-lock of key {coalesce_key}"
        if read is None:
            query, params = _TRY_LOCK, {"id": lid}
        else:
            query, params = read.with_try_lock(lid)
        try:
            return await line.statement(what, query, params, wait=SESSION_WAIT, binary=True)
        except CoordinationError as exc:
            if not isinstance(exc.__cause__, SessionLostError):
                if read is not None:
                    # The try may have won before the read failed, and no rollback gives a
                    # session lock back: unlock (a no-op if it was not won; no other task
                    # of ours holds it, see lock()).
                    with contextlib.suppress(CoordinationError):
                        await line.statement(what, _UNLOCK, {"id": lid}, retry=False)
                raise
            self._unlocked += 1
            logger.warning(
                "computing key %s without the fleet's lock: %s (peers may compute it too; "
                "the store still checks the write)",
                coalesce_key,
                exc,
            )
            return (True,), UNLOCKED

    async def _abandon(
        self,
        task: asyncio.Future[tuple[tuple[Any, ...] | None, int]],
        coalesce_key: str,
        lid: int,
        line: _LockLine,
    ) -> None:
        """Finish a try whose caller was cancelled: give back a lock it won, then drop the
        local claim (kept until now, so no other task of ours could take the same lock
        re-entrantly meanwhile) and wake this process's waiters of the key."""
        try:
            row, gen = await task
        except Exception:  # noqa: BLE001 - the try failed, so it took nothing
            row, gen = None, 0
        if row and row[0]:
            await self._release(coalesce_key, lid, line, gen, notify=True)
        else:
            self._held.pop(lid, None)
            self._registry.wake(lid, WakeReason.NOTIFY)

    async def _release(
        self, coalesce_key: str, lid: int, line: _LockLine, gen: int, *, notify: bool
    ) -> None:
        """Give the key's lock back on ``line``, where it was taken, and wake its waiters:
        this process's always, the other processes' with a NOTIFY in the same statement
        when ``notify`` (the winner's write did not send one). Never raises (a failure is
        logged: the lock then died with its connection, and the probe wakes the peers)."""
        params = {"channel": self._channel, "payload": str(lid), "id": lid}
        try:
            if line.is_current(gen):
                try:
                    await line.statement(
                        f"the release of key {coalesce_key}",
                        _NOTIFY_AND_UNLOCK if notify else _UNLOCK,
                        params,
                        retry=False,
                    )
                    if notify:
                        self._registry.stats["notifies"] += 1
                    return
                except CoordinationError:
                    if line.is_current(gen):
                        raise  # the connection is fine: the statement itself failed
            # The lock died with the connection it was taken on (or was never had); the
            # waiters still wait unless the write told them. A NOTIFY needs no session: the
            # pool sends it.
            if notify:
                await pooled(
                    self._pool,
                    f"the NOTIFY of key {coalesce_key}",
                    lambda conn: conn.execute(_NOTIFY, params),
                    error=CoordinationError,
                )
                self._registry.stats["notifies"] += 1
        except Exception as exc:  # noqa: BLE001 - logged; the probe is the safety net
            self._registry.stats["notify_failures"] += 1
            logger.warning(
                "could not release the lock of key %s or notify its waiters: %s; the crash "
                "probe will wake them",
                coalesce_key,
                exc,
            )
        finally:
            self._held.pop(lid, None)
            self._registry.wake(lid, WakeReason.NOTIFY)  # this process's own waiters

    def _line(self, lid: int) -> _LockLine:
        """Where a new lock on ``lid`` goes: the session (one per process, whatever the
        lock id)."""
        return self._session

    # ------------------------------------------------------------------ losers

    def _on_notify(self, payload: str) -> None:
        """The hub's handler for the populated channel: wake the waiters of that id. A
        forged payload can only wake waiters early: they re-read and try again."""
        if self.closed:
            return
        try:
            lid = int(payload)
        except ValueError:
            logger.warning(
                "ignoring a malformed %s payload %r (expected a lock id)",
                self._channel,
                payload[:100],
            )
            return
        self._registry.wake(lid, WakeReason.NOTIFY)

    def _on_gap(self) -> None:
        """The hub reconnected: a NOTIFY may have been lost, so every waiter re-reads."""
        if self.closed:
            return
        woken = self._registry.wake_all(WakeReason.GAP)
        logger.info("LISTEN connection had a gap; woke %d waiter(s) to re-read", woken)

    # ------------------------------------------------------------------ crash probe

    async def held_lock_ids(self, lock_ids: Iterable[int]) -> set[int]:
        """Which of ``lock_ids`` some session of this database holds as a one-bigint
        advisory lock right now (one query over ``pg_locks`` on a pooled connection)."""
        tags = [advisory_lock_tag(lid) for lid in set(lock_ids)]
        if not tags:
            return set()
        params = {"classids": [c for c, _ in tags], "objids": [o for _, o in tags]}

        async def probe(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await conn.execute(_HELD_LOCKS, params)).fetchall()

        rows = await pooled(
            self._pool, f"probing pg_locks for {len(tags)} lock(s)", probe, error=CoordinationError
        )
        return {_lock_id_of_tag(classid, objid) for classid, objid in rows}

    async def _probe_loop(self) -> None:
        """Every ``probe_interval`` while anyone waits: wake the waiters of every lock that
        nobody holds any more (its holder died without notifying)."""
        while True:
            await self._registry.waiting.wait()
            await asyncio.sleep(self._probe_interval)
            try:
                await self._probe_once()
            except Exception:  # the probe is the safety net: it must go on
                logger.exception("the crash probe failed")

    async def _probe_once(self) -> None:
        # Only waiters armed before the query began may be judged by its answer: one armed
        # later may have lost its try-lock to a holder that took the lock after the
        # query's snapshot, and a spurious wake would cost it a round.
        cutoff = self._registry.last_seq
        ids = self._registry.judged_by(cutoff)
        if not ids:
            return
        try:
            held = await self.held_lock_ids(ids)
        except CoordinationError as exc:
            logger.warning("crash probe over %d lock(s) failed: %s", len(ids), exc)
            return
        for lid in ids:
            if lid not in held and self._registry.wake_judged(lid, cutoff, WakeReason.PROBE):
                logger.info(
                    "lock %d is free but no NOTIFY came (its holder may have died); "
                    "woke its waiters",
                    lid,
                )
