"""Populate coordination across a fleet on Postgres advisory locks and LISTEN/NOTIFY.

How a key is coordinated (the seed's ``ModuleCacheCoordinator``, plus what it left open):

* **Winner.** Check out one pooled connection; ``BEGIN``;
  ``pg_try_advisory_xact_lock(lock_id)``. Lost: roll back, give the connection back at once,
  return ``NOT_ACQUIRED``. Won: ``fn(conn)`` runs inside that transaction (so a winner needs
  exactly one connection), then ``pg_notify(channel, lock_id)`` and ``COMMIT``: peers see the
  NOTIFY only on commit, when the row is visible. If anything fails the transaction is rolled
  back and the NOTIFY is sent anyway on its own autocommit statement, so losers wake at once
  instead of sleeping out their wait.
* **Losers** park on a future keyed by lock id, holding no connection. They wake on the
  NOTIFY (delivered by the process's :class:`~fleetcache.notifications.hub.NotificationHub`),
  on a LISTEN gap (the hub reconnected, so a NOTIFY may be lost), on close, on timeout, or on
  the **crash probe**: a winner whose process dies releases its lock with its session but
  never notifies, so once per ``probe_interval``, while anyone waits, one query over
  ``pg_locks`` finds the waited-on locks that nobody holds any more and wakes their waiters.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from fleetcache.coordination.base import (
    NOT_ACQUIRED,
    STAT_KEYS,
    Acquired,
    NotAcquired,
    WakeReason,
    lock_id,
    record_wake,
)
from fleetcache.errors import CoordinationError, NotOpenError
from fleetcache.notifications.hub import NotificationHub, Subscription

__all__ = ["POPULATED_CHANNEL", "PostgresCoordinator", "advisory_lock_tag"]

T = TypeVar("T")

logger = logging.getLogger("fleetcache.coordination")

#: The channel winners notify on; the payload is the key's lock id in decimal.
POPULATED_CHANNEL = "module_cache_populated"

# --------------------------------------------------------------------------- SQL
# Every statement the coordinator runs. Values are always bound as parameters.

#: Opens the winner's transaction; the advisory lock below lives until it ends.
_BEGIN = "BEGIN"
#: Takes the key's lock without blocking; true when won.
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%(id)s)"
#: Tells the key's waiters (delivered to LISTENers when the transaction commits).
_NOTIFY = "SELECT pg_notify(%(channel)s, %(payload)s)"
#: Ends the winner's transaction, releasing the lock and delivering the NOTIFY.
_COMMIT = "COMMIT"
#: Ends a lost try-lock's or a failed winner's transaction.
_ROLLBACK = "ROLLBACK"
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


@dataclass(eq=False, slots=True)
class _Waiter:
    """One parked ``wait_for_key`` call."""

    coalesce_key: str
    future: asyncio.Future[WakeReason]
    # Registration order; the probe wakes only waiters registered before its query began.
    seq: int


_State = Literal["new", "started", "closed"]


class PostgresCoordinator:
    """A :class:`~fleetcache.coordination.base.PopulateCoordinator` for a fleet sharing one
    Postgres database.

    ``pool`` must hand out autocommit connections (``kwargs={"autocommit": True}``) and
    ``hub`` delivers this process's notifications; both belong to the caller, who opens
    and starts them and closes them after :meth:`close`. ``fn`` receives the winner's
    ``psycopg.AsyncConnection``, inside the lock's transaction: wrap statements in
    ``conn.transaction()`` (a savepoint) so one failing query does not doom the others,
    and never commit or roll back that transaction yourself (it holds the lock).

    Use it between ``await start()`` and ``await close()`` (or ``async with``).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        hub: NotificationHub,
        *,
        channel: str = POPULATED_CHANNEL,
        probe_interval: float = 1.0,
    ) -> None:
        self._pool = pool
        self._hub = hub
        self._channel = channel
        self._probe_interval = probe_interval
        # The lifecycle. Written by start()/_start() (new -> started) and close() (-> closed),
        # read by every public method; all on the event loop, so no lock.
        self._state: _State = "new"
        self._start_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        # Parked waiters by lock id. Written by wait_for_key (adds its waiter, and removes it
        # when it returns or is cancelled) and by _wake_id/_wake_all (which pop whole sets);
        # read by the hub's callbacks, the probe task and close(). Everything runs on the
        # one event loop and no mutation spans an await, so it needs no lock.
        self._waiters: dict[int, set[_Waiter]] = {}
        # Set while _waiters is non-empty, so the probe task sleeps when nobody waits.
        # Written with _waiters (same rules), awaited by the probe task.
        self._waiting = asyncio.Event()
        # Registration numbers: wait_for_key takes the next and records it in _last_seq;
        # the probe reads _last_seq before its query as the cutoff of whom it may judge.
        self._seq = itertools.count(1)
        self._last_seq = 0
        # Waiters registered by try_acquire_and_run *before* its try-lock, handed to the same
        # task's wait_for_key after a lost try-lock, so that a NOTIFY arriving between the
        # two (the winner committed in that gap) is not lost. Written by both methods on the
        # event loop (entries of finished tasks are pruned on insert); no lock needed.
        self._pending: dict[tuple[int, asyncio.Task[Any]], _Waiter] = {}
        # Counters; incremented on the event loop only, copied by stats().
        self._stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to the populated channel on the hub and start the crash probe.

        Idempotent and safe to call concurrently. Raises :class:`NotOpenError` once
        :meth:`close` has been called (also when it was called during this start)."""
        if self._state == "closed":
            raise NotOpenError("PostgresCoordinator is closed; it cannot be started again")
        if self._state == "started":
            return
        if self._start_task is None:
            self._start_task = asyncio.create_task(
                self._start(), name="fleetcache-coordinator-start"
            )
        task = self._start_task
        # asyncio.wait: a caller cancelled here does not cancel the shared start; close()
        # is what ends it.
        await asyncio.wait({task})
        if task.cancelled() or self.closed:
            raise NotOpenError("PostgresCoordinator was closed while it was starting")
        exc = task.exception()
        if exc is not None:
            if self._start_task is task:
                self._start_task = None  # let a later start() try again
            raise exc

    async def _start(self) -> None:
        subscription = await self._hub.subscribe(
            self._channel, self._on_notify, on_gap=self._on_gap
        )
        # No await from here on: close() either cancelled us during subscribe() (and the
        # hub's subscribe cleans up after itself) or runs after we are fully started.
        if self._state == "closed":  # only if subscribe() swallowed our cancellation
            subscription.unsubscribe()
            return
        self._subscription = subscription
        self._probe_task = asyncio.create_task(
            self._probe_loop(), name="fleetcache-coordinator-probe"
        )
        self._state = "started"
        self._start_task = None

    async def close(self) -> None:
        """Wake every parked waiter (reason CLOSE), unsubscribe, and end the background
        tasks. Idempotent; the pool and the hub stay open (they are the caller's)."""
        self._state = "closed"
        woken = self._wake_all(WakeReason.CLOSE)
        if woken:
            logger.info(
                "coordinator closing: woke %d waiter(s)", woken, extra={"coalesce_key": None}
            )
        tasks = [t for t in (self._start_task, self._probe_task) if t is not None]
        for task in tasks:
            task.cancel()
        if self._subscription is not None:
            self._subscription.unsubscribe()
            self._subscription = None
        if tasks:
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    logger.error(
                        "coordinator task %s failed",
                        task.get_name(),
                        exc_info=task.exception(),
                        extra={"coalesce_key": None},
                    )
        self._start_task = None
        self._probe_task = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._state == "closed"

    async def __aenter__(self) -> PostgresCoordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stats(self) -> dict[str, int]:
        """A copy of the counters: lock_won, lock_lost, woken_notify, woken_timeout,
        woken_probe, woken_gap, woken_close, notify_failures."""
        return dict(self._stats)

    def _check_started(self, what: str) -> None:
        if self._state != "started":
            if self._state == "closed":
                raise NotOpenError(f"PostgresCoordinator is closed: {what} refused")
            raise NotOpenError(
                f"PostgresCoordinator is not started: call await coordinator.start() before {what}"
            )

    # ------------------------------------------------------------------ winner

    async def try_acquire_and_run(
        self,
        coalesce_key: str,
        fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    ) -> Acquired[T] | NotAcquired:
        """Take the key's advisory lock without blocking and, if won, run ``fn(conn)``
        inside the lock's transaction, then notify the key's waiters and commit.

        Returns ``NOT_ACQUIRED`` at once (``fn`` not run) when another session holds the
        lock. Exceptions from ``fn`` propagate unchanged, and driver errors from the
        coordinator's own statements leave as :class:`CoordinationError`; either way the
        transaction is rolled back and the waiters are notified first."""
        self._check_started("try_acquire_and_run")
        lid = lock_id(coalesce_key)
        # Listen for the key before trying its lock: if we lose, the holder may commit and
        # notify before our wait_for_key registers, and that NOTIFY must still count.
        early = self._register(coalesce_key, lid, judged_by_probe=False)
        lost = False
        try:
            try:
                conn = await self._pool.getconn()
            except psycopg.Error as exc:
                raise CoordinationError(
                    f"no pooled connection to take the lock of key {coalesce_key!r}: {exc}"
                ) from exc
            try:
                result = await self._run_locked(conn, coalesce_key, lid, fn)
            finally:
                await self._pool.putconn(conn)
            if isinstance(result, NotAcquired):
                lost = True
                self._hand_over(lid, early)
            return result
        finally:
            if not lost:
                self._remove(lid, early)

    async def _run_locked(
        self,
        conn: psycopg.AsyncConnection[Any],
        coalesce_key: str,
        lid: int,
        fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    ) -> Acquired[T] | NotAcquired:
        """BEGIN, try the lock; lost: roll back; won: fn, NOTIFY, COMMIT."""
        extra = {"coalesce_key": coalesce_key}
        try:
            await self._execute(conn, coalesce_key, "BEGIN", _BEGIN)
            row = await self._fetch(conn, coalesce_key, "try-lock", _TRY_LOCK, {"id": lid})
            if not (row and row[0]):
                self._stats["lock_lost"] += 1
                await self._rollback_quietly(conn, coalesce_key)
                logger.debug("lost the lock of key %r", coalesce_key, extra=extra)
                return NOT_ACQUIRED
            self._stats["lock_won"] += 1
            logger.debug("won the lock of key %r (id %d)", coalesce_key, lid, extra=extra)
            try:
                result = await fn(conn)
                await self._execute(
                    conn,
                    coalesce_key,
                    "pg_notify",
                    _NOTIFY,
                    {"channel": self._channel, "payload": str(lid)},
                )
                await self._execute(conn, coalesce_key, "COMMIT", _COMMIT)
            except BaseException as exc:
                # Includes cancellation: the lock dies with the transaction, so tell the
                # waiters now rather than leave them to their timeout or the probe.
                await self._after_failure(conn, coalesce_key, lid, exc)
                raise
            # This process's own waiters need not wait for the round trip through LISTEN.
            self._wake_id(lid, WakeReason.NOTIFY)
            return Acquired(result)
        except BaseException:
            await self._rollback_quietly(conn, coalesce_key)
            raise

    async def _after_failure(
        self,
        conn: psycopg.AsyncConnection[Any],
        coalesce_key: str,
        lid: int,
        exc: BaseException,
    ) -> None:
        """After the winner failed: roll back, then NOTIFY on an autocommit statement."""
        extra = {"coalesce_key": coalesce_key}
        logger.warning(
            "the computation of key %r failed (%s: %s); rolling back and waking its waiters",
            coalesce_key,
            type(exc).__name__,
            exc,
            extra=extra,
        )
        await self._rollback_quietly(conn, coalesce_key)
        try:
            await conn.execute(_NOTIFY, {"channel": self._channel, "payload": str(lid)})
        except psycopg.Error as notify_exc:
            # The waiters still wake: the lock is gone, so the probe finds it free.
            self._stats["notify_failures"] += 1
            logger.warning(
                "could not notify the waiters of key %r after its failure: %s; "
                "they will be woken by the probe",
                coalesce_key,
                notify_exc,
                extra=extra,
            )
        self._wake_id(lid, WakeReason.NOTIFY)

    async def _rollback_quietly(
        self, conn: psycopg.AsyncConnection[Any], coalesce_key: str
    ) -> None:
        """Roll back if a transaction is open; a failure is logged (the pool discards a
        broken connection when it comes back)."""
        if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return
        try:
            await conn.execute(_ROLLBACK)
        except psycopg.Error as exc:
            logger.warning(
                "rolling back the lock transaction of key %r failed: %s",
                coalesce_key,
                exc,
                extra={"coalesce_key": coalesce_key},
            )

    async def _execute(
        self,
        conn: psycopg.AsyncConnection[Any],
        coalesce_key: str,
        what: str,
        query: str,
        params: dict[str, Any] | None = None,
    ) -> None:
        """Run one of the coordinator's statements; driver errors become CoordinationError."""
        await self._fetch(conn, coalesce_key, what, query, params, fetch=False)

    async def _fetch(
        self,
        conn: psycopg.AsyncConnection[Any],
        coalesce_key: str,
        what: str,
        query: str,
        params: dict[str, Any] | None = None,
        *,
        fetch: bool = True,
    ) -> tuple[Any, ...] | None:
        try:
            cursor = await conn.execute(query, params)
            return await cursor.fetchone() if fetch else None
        except psycopg.Error as exc:
            raise CoordinationError(
                f"{what} for the lock of key {coalesce_key!r} failed: {exc}"
            ) from exc

    # ------------------------------------------------------------------ losers

    async def wait_for_key(self, coalesce_key: str, timeout: float) -> WakeReason:
        """Park until the key's holder notifies, or ``timeout`` seconds pass, or a probe
        finds its lock free, or the LISTEN connection had a gap, or the coordinator closes;
        return which. Holds no connection; never raises (except :class:`NotOpenError`
        before :meth:`start`; after :meth:`close` it returns CLOSE at once)."""
        if self._state == "closed":
            self._stats["woken_close"] += 1
            return WakeReason.CLOSE
        self._check_started("wait_for_key")
        lid = lock_id(coalesce_key)
        task = asyncio.current_task()
        early = self._pending.pop((lid, task), None) if task is not None else None
        waiter = early if early is not None else self._register(coalesce_key, lid)
        try:
            async with asyncio.timeout(timeout):
                reason = await waiter.future
        except TimeoutError:
            # A wake may land in the same loop iteration as the timeout; it wins.
            done = waiter.future.done() and not waiter.future.cancelled()
            reason = waiter.future.result() if done else WakeReason.TIMEOUT
        finally:
            self._remove(lid, waiter)
        return record_wake(self._stats, coalesce_key, reason)

    def _hand_over(self, lid: int, waiter: _Waiter) -> None:
        """Keep ``waiter`` for this task's next ``wait_for_key(lid)``; forget the ones of
        finished tasks and this task's previous one for the same id (never waited on)."""
        task = asyncio.current_task()
        for (old_lid, old_task), old in list(self._pending.items()):
            if old_task.done() or (old_lid, old_task) == (lid, task):
                del self._pending[old_lid, old_task]
                self._remove(old_lid, old)
        if task is None:
            self._remove(lid, waiter)
        else:
            # From now on it has lost the try-lock, so the probe may judge it.
            waiter.seq = self._last_seq = next(self._seq)
            self._pending[lid, task] = waiter

    def _register(self, coalesce_key: str, lid: int, *, judged_by_probe: bool = True) -> _Waiter:
        """Park a new waiter for ``lid`` (it wakes with the others of its id). One
        registered before its try-lock is not judged by the probe until it has lost: a
        free lock says nothing about a key we may be about to take ourselves."""
        if judged_by_probe:
            seq = self._last_seq = next(self._seq)
        else:
            seq = sys.maxsize
        waiter = _Waiter(coalesce_key, asyncio.get_running_loop().create_future(), seq)
        self._waiters.setdefault(lid, set()).add(waiter)
        self._waiting.set()
        return waiter

    def _remove(self, lid: int, waiter: _Waiter) -> None:
        waiters = self._waiters.get(lid)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[lid]
        if not self._waiters:
            self._waiting.clear()

    def _wake_id(self, lid: int, reason: WakeReason) -> int:
        """Wake every waiter of one lock id; returns how many."""
        waiters = self._waiters.pop(lid, set())
        if not self._waiters:
            self._waiting.clear()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_result(reason)
        return len(waiters)

    def _wake_all(self, reason: WakeReason) -> int:
        """Wake every waiter; one log record per key. Returns how many."""
        woken = 0
        for lid in list(self._waiters):
            keys = {w.coalesce_key for w in self._waiters.get(lid, ())}
            count = self._wake_id(lid, reason)
            woken += count
            for key in sorted(keys):
                logger.debug(
                    "woke the waiters of key %r: %s",
                    key,
                    reason.value,
                    extra={"coalesce_key": key},
                )
        return woken

    def _on_notify(self, payload: str) -> None:
        """The hub's callback for the populated channel: wake the waiters of that id."""
        try:
            lid = int(payload)
        except ValueError:
            logger.warning(
                "ignoring a malformed %s payload %r (expected a lock id)",
                self._channel,
                payload[:100],
                extra={"coalesce_key": None},
            )
            return
        waiters = self._waiters.get(lid)
        if waiters:
            key = next(iter(waiters)).coalesce_key
            count = self._wake_id(lid, WakeReason.NOTIFY)
            logger.debug(
                "NOTIFY for key %r woke %d waiter(s)", key, count, extra={"coalesce_key": key}
            )

    def _on_gap(self) -> None:
        """The hub reconnected: a NOTIFY may have been lost, so every waiter re-reads."""
        woken = self._wake_all(WakeReason.GAP)
        logger.info(
            "LISTEN connection had a gap; woke %d waiter(s) to re-read",
            woken,
            extra={"coalesce_key": None},
        )

    # ------------------------------------------------------------------ crash probe

    async def held_lock_ids(self, lock_ids: Iterable[int]) -> set[int]:
        """Which of ``lock_ids`` some session of this database holds as a one-bigint
        advisory lock right now (one query over ``pg_locks``, on a briefly borrowed pooled
        connection). Driver errors leave as :class:`CoordinationError`."""
        tags = [advisory_lock_tag(lid) for lid in set(lock_ids)]
        if not tags:
            return set()
        params = {"classids": [c for c, _ in tags], "objids": [o for _, o in tags]}
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_HELD_LOCKS, params)
                rows = await cursor.fetchall()
        except psycopg.Error as exc:
            raise CoordinationError(
                f"probing pg_locks for {len(tags)} lock(s) failed: {exc}"
            ) from exc
        return {_lock_id_of_tag(classid, objid) for classid, objid in rows}

    async def _probe_loop(self) -> None:
        """Every ``probe_interval`` while anyone waits: wake the waiters of every lock
        that nobody holds any more (its holder died without notifying)."""
        while True:
            await self._waiting.wait()
            await asyncio.sleep(self._probe_interval)
            if not self._waiters:
                continue
            try:
                await self._probe_once()
            except Exception:  # the probe is the safety net: it must outlive any failure
                logger.exception("the crash probe failed", extra={"coalesce_key": None})

    async def _probe_once(self) -> None:
        # Only waiters registered before the query began may be judged by its answer: one
        # that registered later may have lost its try-lock to a holder that took the lock
        # after the snapshot, and a spurious wake would cost it a round.
        cutoff = self._last_seq
        ids = [lid for lid, ws in self._waiters.items() if any(w.seq <= cutoff for w in ws)]
        if not ids:
            return
        try:
            held = await self.held_lock_ids(ids)
        except CoordinationError as exc:
            logger.warning(
                "crash probe over %d lock(s) failed: %s",
                len(ids),
                exc,
                extra={"coalesce_key": None},
            )
            return
        for lid in ids:
            if lid in held:
                continue
            due = [w for w in self._waiters.get(lid, ()) if w.seq <= cutoff]
            for waiter in due:
                if not waiter.future.done():
                    waiter.future.set_result(WakeReason.PROBE)
            if due:
                key = due[0].coalesce_key
                logger.info(
                    "the lock of key %r is free but no NOTIFY came (its holder may have "
                    "died); woke %d waiter(s)",
                    key,
                    len(due),
                    extra={"coalesce_key": key},
                )
