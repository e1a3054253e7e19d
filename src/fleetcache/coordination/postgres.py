"""Populate coordination across a fleet on Postgres session advisory locks and NOTIFY.

How a key is coordinated (the seed's ``ModuleCacheCoordinator``, with a different lock
discipline and what the seed left open):

* **The process's one session.** Locks are *session* advisory locks
  (``pg_try_advisory_lock(lock_id)``) taken on the process's session connection, the
  :class:`~fleetcache.notifications.hub.NotificationHub`'s, which LISTENs on the same
  connection: a process holds one direct backend for both (its pool aside). No
  transaction is open while a winner computes, so it pins no snapshot (the server's xmin
  horizon and vacuum are not held back, whatever the computation's length) and
  ``idle_in_transaction_session_timeout`` cannot kill it; and no pooled connection is
  held either, so hits and a computation's own nested lookups never queue behind
  computations. Many keys' locks live on the session at once; its statements are short,
  run one after another, and interleave with the hub's waits for notifications.
* **Single flight.** A key's lock is held by at most one session, and within a process by
  at most one task: the ``_held`` map answers a second local try for the same lock id
  ("lost") without asking the server, since a session lock is re-entrant for its own
  session. So at most one task of the fleet computes a key at a time.
* **NOTIFY after visible.** The winner's write carries the NOTIFY in its own transaction
  (``announcement`` and ``Store.write(notify=...)``): it is delivered as the row commits,
  so a waiter woken by it finds the row. Then the winner runs ``pg_notify(channel,
  lock_id)`` and ``pg_advisory_unlock(lock_id)`` in one statement, which wakes the waiters
  on every other outcome too (a failed or cancelled computation, a missing key, a result
  not stored); a waiter woken by it, or by the free lock, re-reads and tries again.
* **Losers** get a :class:`~fleetcache.coordination.waiters.Waiter` registered before the
  try-lock, holding no connection. They wake on the NOTIFY (delivered by the process's
  :class:`~fleetcache.notifications.hub.NotificationHub`), on a LISTEN gap, on close, on
  their timeout, or on the **crash probe**: a winner whose process dies loses its session
  and so its locks, but never notifies; once per ``probe_interval``, while anyone waits,
  one query over ``pg_locks`` finds the waited-on locks nobody holds any more.
* **A lost session** releases every lock it held, on the server's side, and loses the
  LISTENs with them: the hub reconnects, and its gap wakes every waiter of the process.
  The computations under way here go on (their writes are still checked by the store,
  so nothing stale lands); peers may compute the same keys meanwhile. The locks taken on
  the lost connection are known lost (the hub's ``generation``), so their release only
  notifies.
* **A silent holder loses its locks within ``lock_idle_timeout``** (10 s by default).
  The coordinator has the hub set the server's ``idle_session_timeout`` to it on the
  session, and the hub sends a statement at least every third of it, so a healthy
  session is never idle that long. A holder that stops (SIGSTOP, an event loop blocked
  that long) or whose network path froze sends nothing, so the server ends its session
  and the locks go with it — which TCP keepalives could not do: a stopped process's
  kernel still answers them. Its waiters' crash probe then finds the lock free. A probe
  unanswered for ``liveness_timeout`` makes this side give the session up too. Needs
  PostgreSQL 14 or later (older servers: logged once, no bound).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from fleetcache._lifecycle import Service
from fleetcache._pg import pooled
from fleetcache.coordination.base import Acquired, WakeReason, lock_id
from fleetcache.coordination.waiters import Waiter, WaiterRegistry
from fleetcache.errors import (
    ConfigurationError,
    CoordinationError,
    NotificationError,
    SessionLostError,
)
from fleetcache.logcontext import get_logger
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME, NotificationHub

__all__ = ["POPULATED_CHANNEL", "PostgresCoordinator", "advisory_lock_tag"]

T = TypeVar("T")

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
#: Tells the key's waiters and releases its lock, in one statement (the NOTIFY is
#: delivered when this statement commits; the row was committed before).
_NOTIFY_AND_UNLOCK = "SELECT pg_notify(%(channel)s, %(payload)s), pg_advisory_unlock(%(id)s)"
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
    ) -> tuple[tuple[Any, ...] | None, int]:
        """Run one statement on the session; return its row and the connection's
        generation. A lost connection is replaced by the hub and (with ``retry``) the
        statement run once more on the new one: whatever the lost one held died with it.
        ``wait``: how long to wait for a session that is down (default: the hub's connect
        budget); a session lost for good raises CoordinationError from SessionLostError."""
        for attempt in (1, 2):
            try:
                return await self._hub.execute(query, params, wait=wait)
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
    ``idle_session_timeout``). The pool and the hub belong to the caller, who starts them
    before and closes them after this coordinator. Use it between ``await start()`` and
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
        self._channel = channel
        self._probe_interval = probe_interval
        self._registry = WaiterRegistry()
        # Lock ids held by a task of this process, each with the generation of the session
        # connection it was taken on. Written by try_acquire_and_run (insert before its
        # try-lock, remove after the unlock or a lost try); read by the same. Event loop
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

    def stats(self) -> dict[str, int]:
        """A copy of the counters: lock_won, lock_lost, woken_notify, woken_timeout,
        woken_probe, woken_gap, woken_close, notify_failures, and computed_unlocked (keys
        won without the fleet's lock while the session was down)."""
        return {**self._registry.stats, "computed_unlocked": self._unlocked}

    # ------------------------------------------------------------------ winner

    async def try_acquire_and_run(
        self, coalesce_key: str, fn: Callable[[], Awaitable[T]]
    ) -> Acquired[T] | Waiter:
        """Take the key's lock without blocking; if won, run ``fn()`` (holding no
        transaction and no pooled connection), then notify the key's waiters and release
        the lock. Lost: a :class:`Waiter`, registered before the try. ``fn``'s exceptions
        propagate after the waiters are told; driver errors of the coordinator's own
        statements leave as :class:`CoordinationError`."""
        self.check_started(f"try_acquire_and_run for {coalesce_key}")
        lid = lock_id(coalesce_key)
        # Registered before the try: if we lose, the holder may finish before we wait.
        waiter = self._registry.register(coalesce_key, lid, armed=False)
        if lid in self._held:  # a task of this process holds it: lost, without a query
            return self._lost(waiter)
        self._held[lid] = -1  # claimed locally before the await: other tasks lose here
        try:
            won = await self._try_lock(coalesce_key, lid)
        except BaseException as exc:
            waiter.cancel()
            if not isinstance(exc, asyncio.CancelledError):  # else _abandon owns the claim
                self._held.pop(lid, None)
            raise
        if won is None:
            del self._held[lid]
            return self._lost(waiter)
        line, gen = won
        waiter.cancel()
        self._held[lid] = gen
        self._registry.stats["lock_won"] += 1
        logger.debug("won the lock of key %s (id %d)", coalesce_key, lid)
        try:
            result = await fn()
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
            # Shielded: a cancelled winner must still release and notify.
            await asyncio.shield(self._release(coalesce_key, lid, line, gen))
        return Acquired(result)

    def announcement(self, coalesce_key: str) -> tuple[str, str]:
        """The NOTIFY (channel, lock id) a winner may send as its write commits, so its
        waiters in every process wake then; the release notifies again, harmlessly."""
        return self._channel, str(lock_id(coalesce_key))

    def _lost(self, waiter: Waiter) -> Waiter:
        self._registry.stats["lock_lost"] += 1
        self._registry.arm(waiter)  # from now on the probe may judge it
        logger.debug("lost the lock of key %s", waiter.coalesce_key)
        return waiter

    async def _try_lock(self, coalesce_key: str, lid: int) -> tuple[_LockLine, int] | None:
        """The line and its connection's generation if the lock was won, None if lost.
        The statement runs in its own task: a caller cancelled mid-statement must not
        leave a lock taken for nobody, so the task finishes and gives such a lock back."""
        line = self._line(lid)
        task = asyncio.ensure_future(self._try_statement(coalesce_key, lid, line))
        try:
            row, gen = await asyncio.shield(task)
        except asyncio.CancelledError:
            self.spawn(self._abandon(task, coalesce_key, lid, line), f"abandon {lid}")
            raise
        return (line, gen) if row and row[0] else None

    async def _try_statement(
        self, coalesce_key: str, lid: int, line: _LockLine
    ) -> tuple[tuple[Any, ...] | None, int]:
        """The try-lock's row and generation. While the session is down for longer than
        ``SESSION_WAIT``, a win on no lock (generation ``UNLOCKED``): this process
        computes the key without the fleet's lock rather than fail its callers (peers may
        compute it too; the store still refuses a stale write)."""
        try:
            return await line.statement(
                f"the try-lock of key {coalesce_key}", _TRY_LOCK, {"id": lid}, wait=SESSION_WAIT
            )
        except CoordinationError as exc:
            if not isinstance(exc.__cause__, SessionLostError):
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
            await self._release(coalesce_key, lid, line, gen)
        else:
            self._held.pop(lid, None)
            self._registry.wake(lid, WakeReason.NOTIFY)

    async def _release(self, coalesce_key: str, lid: int, line: _LockLine, gen: int) -> None:
        """Notify the key's waiters and give its lock back on ``line``, where it was taken;
        never raises (a failure is logged: the lock then died with its connection, and the
        probe wakes the peers)."""
        params = {"channel": self._channel, "payload": str(lid), "id": lid}
        try:
            if line.is_current(gen):
                try:
                    await line.statement(
                        f"the release of key {coalesce_key}",
                        _NOTIFY_AND_UNLOCK,
                        params,
                        retry=False,
                    )
                    return
                except CoordinationError:
                    if line.is_current(gen):
                        raise  # the connection is fine: the statement itself failed
            # The lock died with the connection it was taken on (or was never had); the
            # waiters still wait. A NOTIFY needs no session: the pool sends it.
            await pooled(
                self._pool,
                f"the NOTIFY of key {coalesce_key}",
                lambda conn: conn.execute(_NOTIFY, params),
                error=CoordinationError,
            )
        except Exception as exc:  # noqa: BLE001 - logged; the probe is the safety net
            self._registry.stats["notify_failures"] += 1
            logger.warning(
                "could not notify the waiters of key %s: %s; the crash probe will wake them",
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

    async def wait_for_key(self, coalesce_key: str, timeout: float) -> WakeReason:
        """Park until the key's holder notifies, ``timeout`` passes, a probe finds its lock
        free, the LISTEN connection had a gap, or the coordinator closes; return which.
        Holds no connection; never raises (CLOSE at once when closed)."""
        if self.closed:
            return self._registry.record(coalesce_key, WakeReason.CLOSE)
        self.check_started("wait_for_key")
        return await self._registry.register(coalesce_key, lock_id(coalesce_key)).wait(timeout)

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
