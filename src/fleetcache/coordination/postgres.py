"""Populate coordination across a fleet on Postgres session advisory locks and NOTIFY.

How a key is coordinated (the seed's ``ModuleCacheCoordinator``, with a different lock
discipline and what the seed left open):

* **A few lock connections per process.** Each process keeps ``lock_connections``
  (default 2) dedicated, autocommit, non-pooled connections and takes *session* advisory
  locks on them: ``pg_try_advisory_lock(lock_id)``, a lock id always on the same one
  (``lock_id mod n``). No transaction is open while a winner computes, so it pins no
  snapshot (the server's xmin horizon and vacuum are not held back, whatever the
  computation's length) and ``idle_in_transaction_session_timeout`` cannot kill it; and no
  pooled connection is held either, so hits and a computation's own nested lookups never
  queue behind computations. Many keys' locks live on one connection at once; its
  statements are short and psycopg runs them one after another.
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
* **A lost lock connection** releases every lock it held, on the server's side. The
  computations under way here go on (their writes are still checked by the store, so
  nothing stale lands); peers may compute the same keys meanwhile. It is logged, and the
  next statement opens a new connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from fleetcache._lifecycle import Service
from fleetcache._pg import connect, is_connection_lost, pooled
from fleetcache.coordination.base import Acquired, WakeReason, lock_id
from fleetcache.coordination.waiters import Waiter, WaiterRegistry
from fleetcache.errors import ConfigurationError, CoordinationError
from fleetcache.logcontext import get_logger
from fleetcache.notifications.hub import NotificationHub

__all__ = ["POPULATED_CHANNEL", "PostgresCoordinator", "advisory_lock_tag"]

T = TypeVar("T")

logger = get_logger("fleetcache.coordination")

#: The channel winners notify on; the payload is the key's lock id in decimal.
POPULATED_CHANNEL = "fleetcache_populated_v1"
#: Shown in ``pg_stat_activity`` for the lock connections.
LOCK_APPLICATION_NAME = "fleetcache-locks"
#: How many lock connections a process keeps by default (lock ids are spread over them, so
#: one process's try-locks and releases do not all queue on one connection).
LOCK_CONNECTIONS = 2

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
    """One lock connection: a dedicated, autocommit, non-pooled connection holding session
    advisory locks, replaced when it is lost. ``gen`` counts its connections: locks taken
    on an older one died with it. Its statements run one after another (psycopg
    serialises them), which is why a coordinator keeps a few lines and spreads the lock
    ids over them.

    Shared state: ``conn`` and ``gen`` are replaced only under ``_connecting`` (one
    reconnect at a time); read by every statement. Event loop only."""

    def __init__(self, conninfo: str, index: int) -> None:
        self._conninfo = conninfo
        self.index = index
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.gen = 0
        self._connecting = asyncio.Lock()

    def is_current(self, gen: int) -> bool:
        """Whether locks taken on this line's connection ``gen`` are still held."""
        return self.conn is not None and gen == self.gen

    async def connection(self) -> tuple[psycopg.AsyncConnection[Any], int]:
        """The live connection (made now if there is none) and its generation."""
        conn = self.conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn, self.gen
        async with self._connecting:
            conn = self.conn
            if conn is None or conn.closed or conn.broken:
                conn = await connect(self._conninfo, application_name=LOCK_APPLICATION_NAME)
                self.conn = conn
                self.gen += 1
            return conn, self.gen

    async def statement(
        self, what: str, query: str, params: dict[str, Any], *, retry: bool = True
    ) -> tuple[tuple[Any, ...] | None, int]:
        """Run one statement; return its row and the connection's generation. A lost
        connection is replaced and (with ``retry``) the statement run once more: whatever
        the lost one held died with it."""
        for attempt in (1, 2):
            conn, gen = await self.connection()
            try:
                cursor = await conn.execute(query, params)
                return await cursor.fetchone(), gen
            except psycopg.Error as exc:
                lost = is_connection_lost(exc, conn)
                if lost and self.conn is conn:
                    self.conn = None
                    logger.warning(
                        "lock connection %d was lost (%s); the server released the locks it "
                        "held: peers may compute those keys too (their results are still "
                        "checked by the store)",
                        self.index,
                        exc,
                    )
                if not (lost and retry and attempt == 1):
                    raise CoordinationError(f"{what} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Close the connection (its locks go with it)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


class PostgresCoordinator(Service):
    """A :class:`~fleetcache.coordination.base.PopulateCoordinator` for a fleet sharing one
    Postgres database.

    ``conninfo`` is where the lock connections go; ``pool`` (autocommit connections)
    serves the crash probe; ``hub`` delivers this process's notifications and must listen
    on ``channel``. The pool and the hub belong to the caller, who starts them before and
    closes them after this coordinator. Use it between ``await start()`` and
    ``await close()`` (or ``async with``).
    """

    def __init__(
        self,
        conninfo: str,
        pool: AsyncConnectionPool[Any],
        hub: NotificationHub,
        *,
        channel: str = POPULATED_CHANNEL,
        probe_interval: float = 1.0,
        lock_connections: int = LOCK_CONNECTIONS,
    ) -> None:
        super().__init__()
        if lock_connections < 1:
            raise ConfigurationError(f"lock_connections must be >= 1, got {lock_connections}")
        self._conninfo = conninfo
        self._pool = pool
        self._hub = hub
        self._channel = channel
        self._probe_interval = probe_interval
        self._registry = WaiterRegistry()
        # Lock ids held by a task of this process, each with the generation of its line's
        # connection it was taken on. Written by try_acquire_and_run (insert before its
        # try-lock, remove after the unlock or a lost try); read by the same. Event loop
        # only, never mutated across an await by two tasks for one id: no lock.
        self._held: dict[int, int] = {}
        # The lock connections; a lock id always goes to the same line (lid mod n), so its
        # lock, its release and the local re-entrancy check all meet on one session.
        self._lines = [_LockLine(conninfo, i) for i in range(lock_connections)]

    # ------------------------------------------------------------------ lifecycle

    async def _on_start(self) -> None:
        self._hub.add_handler(self._channel, self._on_notify)
        self._hub.add_gap_handler(self._on_gap)
        await asyncio.gather(*(line.connection() for line in self._lines))
        self.spawn(self._probe_loop(), "coordinator probe")

    async def _on_close(self) -> None:
        woken = self._registry.wake_all(WakeReason.CLOSE)
        if woken:
            logger.info("coordinator closing: woke %d waiter(s)", woken)
        await asyncio.gather(*(line.close() for line in self._lines))

    def stats(self) -> dict[str, int]:
        """A copy of the counters: lock_won, lock_lost, woken_notify, woken_timeout,
        woken_probe, woken_gap, woken_close, notify_failures."""
        return dict(self._registry.stats)

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
            gen = await self._try_lock(coalesce_key, lid)
        except BaseException as exc:
            waiter.cancel()
            if not isinstance(exc, asyncio.CancelledError):  # else _abandon owns the claim
                self._held.pop(lid, None)
            raise
        if gen is None:
            del self._held[lid]
            return self._lost(waiter)
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
            await asyncio.shield(self._release(coalesce_key, lid, gen))
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

    async def _try_lock(self, coalesce_key: str, lid: int) -> int | None:
        """The lock connection's generation if the lock was won, None if lost. The
        statement runs in its own task: a caller cancelled mid-statement must not leave a
        lock taken for nobody, so the task finishes and gives such a lock back."""
        task = asyncio.ensure_future(
            self._line(lid).statement(f"the try-lock of key {coalesce_key}", _TRY_LOCK, {"id": lid})
        )
        try:
            row, gen = await asyncio.shield(task)
        except asyncio.CancelledError:
            self.spawn(self._abandon(task, coalesce_key, lid), f"abandon {lid}")
            raise
        return gen if row and row[0] else None

    async def _abandon(
        self, task: asyncio.Future[tuple[tuple[Any, ...] | None, int]], coalesce_key: str, lid: int
    ) -> None:
        """Finish a try whose caller was cancelled: give back a lock it won, then drop the
        local claim (kept until now, so no other task of ours could take the same lock
        re-entrantly meanwhile) and wake this process's waiters of the key."""
        try:
            row, gen = await task
        except Exception:  # noqa: BLE001 - the try failed, so it took nothing
            row, gen = None, 0
        if row and row[0]:
            await self._release(coalesce_key, lid, gen)
        else:
            self._held.pop(lid, None)
            self._registry.wake(lid, WakeReason.NOTIFY)

    async def _release(self, coalesce_key: str, lid: int, gen: int) -> None:
        """Notify the key's waiters and give its lock back; never raises (a failure is
        logged: the lock then died with its connection, and the probe wakes the peers)."""
        params = {"channel": self._channel, "payload": str(lid), "id": lid}
        line = self._line(lid)
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
            # The lock died with the connection it was taken on; the waiters still wait.
            await line.statement(f"the NOTIFY of key {coalesce_key}", _NOTIFY, params)
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
        return self._lines[lid % len(self._lines)]

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
