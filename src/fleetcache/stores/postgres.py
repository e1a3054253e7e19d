"""The Postgres store: the fleet's shared cache, on psycopg 3 and psycopg_pool. Why an
invalidation leaves no stale entry behind, why a write waits for a locked namespace without
a connection, why pruning marks is safe, why a pooled operation may run twice and why every
pooled statement is safe behind a transaction pooler is argued in ``docs/design.md``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from fleetcache import _pg
from fleetcache.errors import ConfigurationError, InvalidInputError, NotOpenError, StoreError
from fleetcache.logcontext import get_logger
from fleetcache.stores import queries as q
from fleetcache.stores.base import (
    MARK_RETENTION,
    Entry,
    Expand,
    GenerationStamp,
    Key,
    guarded_names,
)
from fleetcache.stores.bounds import Bounds
from fleetcache.stores.closure import Closure
from fleetcache.stores.codecs import JSON_VALUES, ValueCodec
from fleetcache.stores.migrations import migrate_postgres
from fleetcache.stores.payloads import (
    INVALIDATED_CHANNEL,
    MAX_ORIGIN_CHARS,
    PAYLOAD_BUDGET,
    invalidation_payloads,
    is_channel,
    is_origin,
    new_origin,
)
from fleetcache.stores.validation import (
    check_name,
    encode_entry,
    names_to_invalidate,
    stamped_names,
    validate_key,
)

logger = get_logger("fleetcache.stores")

T = TypeVar("T")

#: The application_name of the store's connections (what pg_stat_activity shows).
APPLICATION_NAME = "fleetcache"
#: The default number of pooled connections the pool may grow to.
POOL_SIZE = 10
#: The default number of pooled connections made by ``open()`` (and kept when idle).
POOL_MIN_SIZE = 1
#: The most old marks one invalidation prunes, besides twice the marks it sets: enough to
#: outpace any rate of invalidations, small enough to keep its transaction short.
PRUNE_BATCH = 10_000
#: How long (seconds) a write or an invalidation waits, in all, for a namespace (or the
#: whole cache) that invalidations keep locked, before it gives up with a StoreError.
LOCK_WAIT = 600.0
#: How long (seconds) an invalidation's lock statement may wait holding its connection
#: (for the writes under way to finish) before it gives the connection back and waits
#: without one.
LOCK_PATIENCE = 0.2
# Waiting without a connection: the first poll after a miss (and after every wake-up),
# doubling up to the last (a wake-up may come before the lock is released, or be lost).
_FIRST_POLL = 0.02
_LAST_POLL = 1.0
#: How long an eviction's DELETE may wait for a row a writer or an invalidation holds
#: before it gives up (to try again at the next look): never long enough to meet the
#: deadlock detector (1 s by default), so an invalidation is never the one aborted.
EVICT_PATIENCE = "100ms"


@functools.lru_cache(maxsize=8192)  # hot keys are hashed once, not on every hit
def key_hash(key: Key) -> bytes:
    """The primary key of ``key``'s row: sha256 over each field as
    ``b"<UTF-8 byte length>:" + UTF-8 bytes`` (the migration computes the same in SQL)."""
    digest = hashlib.sha256()
    for field in (key.namespace, key.name, key.scope, key.user):
        data = field.encode()
        digest.update(b"%d:" % len(data))
        digest.update(data)
    return digest.digest()


def namespace_lock(namespace: str) -> int:
    """The second int of a namespace's advisory lock (a signed 32-bit hash)."""
    digest = hashlib.sha256(namespace.encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


@dataclass(frozen=True, slots=True)
class PostgresPoint:
    """What a Postgres stamp holds: the read's snapshot and the server's time then."""

    snapshot: str
    taken_at: float


class _LockWaits:
    """Operations waiting, without a connection, for a lock an invalidation holds: keyed
    by the namespace lock's int, or None for the global lock (a clear_all waiting).

    Written and read on the store's event loop only (no await between a check and its
    update). ``wake(lock)`` wakes that lock's waiters and the global ones; ``wake(None)``
    wakes everyone. A waiter always has a timeout too: a wake-up is a hint.
    """

    def __init__(self) -> None:
        self._events: dict[int | None, asyncio.Event] = {}
        self._waiting: dict[int | None, int] = {}
        # This process's invalidations of one lock take turns: (mutex, how many hold or
        # want it).
        self._turns: dict[int | None, tuple[asyncio.Lock, int]] = {}

    def join_turns(self, lock: int | None) -> asyncio.Lock:
        """The mutex of ``lock``'s invalidations in this process; call
        :meth:`leave_turns` once done with it."""
        mutex, users = self._turns.get(lock) or (asyncio.Lock(), 0)
        self._turns[lock] = (mutex, users + 1)
        return mutex

    def leave_turns(self, lock: int | None) -> None:
        """Done with ``lock``'s mutex (forgotten once nobody holds or wants it)."""
        mutex, users = self._turns[lock]
        if users == 1:
            del self._turns[lock]
        else:
            self._turns[lock] = (mutex, users - 1)

    async def wait(self, lock: int | None, timeout: float) -> bool:
        """Wait for a wake-up of ``lock`` at most ``timeout`` seconds; whether one came."""
        event = self._events.get(lock)
        if event is None:
            event = self._events[lock] = asyncio.Event()
        self._waiting[lock] = self._waiting.get(lock, 0) + 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            left = self._waiting.pop(lock) - 1
            if left:
                self._waiting[lock] = left
            else:
                self._events.pop(lock, None)  # nobody waits on this lock any more

    @property
    def waiting(self) -> int:
        """How many operations wait right now."""
        return sum(self._waiting.values())

    def wake(self, lock: int | None) -> None:
        """Wake the waiters of ``lock`` and the global ones (``None``: everyone)."""
        locks = list(self._events) if lock is None else [lock, None]
        for one in locks:
            event = self._events.pop(one, None)
            if event is not None:
                event.set()


def _entry(key: Key, row: Sequence[Any], values: ValueCodec) -> Entry:
    name, value, codec, deps, error, created_at, alias, diagnostics, expires, stale, compute = row
    if name != key.name:
        key = key.with_name(name)
    return Entry(
        key=key,
        value=values.decode(key, codec, value),
        deps=tuple(deps),
        error=None if error is None else json.loads(error),
        created_at=created_at,
        alias=alias,
        diagnostics=None if diagnostics is None else json.loads(diagnostics),
        expires_at=expires,
        stale_until=stale,
        compute_ms=compute,
    )


def _pool_counts(stats: dict[str, int]) -> dict[str, int]:
    """A pool's ``get_stats()`` as the store reports it."""
    size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
    return {
        "size": size,
        "in_use": size - idle,
        "idle": idle,
        "min_size": stats.get("pool_min", 0),
        "max_size": stats.get("pool_max", 0),
        "waiting": stats.get("requests_waiting", 0),
    }


def _read_statement(key: Key, by_alias: bool) -> tuple[str, dict[str, Any]]:
    """The statement of ``read(key, by_alias=...)`` and its parameters (the key checked)."""
    validate_key(key)
    return (q.PG_READ_BY_ALIAS if by_alias else q.PG_READ), _key_params(key)


def _key_params(key: Key) -> dict[str, Any]:
    return {
        "key_hash": key_hash(key),
        "ns": key.namespace,
        "name": key.name,
        "scope": key.scope,
        "user": key.user,
    }


class PostgresStore:
    """A :class:`~fleetcache.stores.base.Store` on Postgres (table ``fleetcache_entries``).

    Give it a ``conninfo`` (it then owns its pool: ``min_size`` connections opened by
    ``open()``, more on demand up to ``max_size``, all closed by ``close()``; see "The
    pool") or an open ``pool`` of autocommit connections
    (which it never closes). ``open()`` first makes one connection of its own, so a wrong
    address, database or role raises :class:`~fleetcache.errors.DatabaseConnectError`
    naming the cause within seconds, then creates or upgrades the schema under an advisory
    lock. ``mark_retention`` (seconds) must be the same in every process sharing the
    database; stamps older than half of it are refused. ``values``: how values are encoded
    (see :class:`~fleetcache.stores.codecs.ValueCodec`; JSON by default).
    ``prepared_statements``: whether psycopg may prepare the statements it runs often on
    the server (faster; turn it off behind a transaction pooler that does not support
    them, such as PgBouncer before 1.21 or without ``max_prepared_statements``).

    ``max_entries``/``max_bytes`` (value bytes as encoded) bound the table, fleet-wide.
    Its size is kept by triggers in ``fleetcache_counts`` (no count of the table); every
    ``check_every`` successful writes (``Bounds.next_check``: 1% of the bound, in entries
    or in entries of the mean size), this process looks at it, and if the table
    is over a bound a background task evicts the least recently written entries (and
    their dependents) in batches until it is 5% under. The writer does not wait for it,
    unless it has written twice ``check_every`` more while the eviction was still running.

    ``unlogged=True`` makes the entries table (and its counts) UNLOGGED at ``open()`` if it
    is not already (a rewrite of the table under an exclusive lock, once): writes skip the
    WAL, but the entries are emptied by a crash and absent on a promoted replica (every key
    a miss after a failover). The marks stay logged. ``False`` leaves the table as it is.
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        pool: AsyncConnectionPool[Any] | None = None,
        max_size: int = POOL_SIZE,
        min_size: int = POOL_MIN_SIZE,
        application_name: str = APPLICATION_NAME,
        mark_retention: float = MARK_RETENTION,
        connect_budget: float = _pg.CONNECT_BUDGET,
        pool_timeout: float = 30.0,
        values: ValueCodec = JSON_VALUES,
        invalidated_channel: str | None = INVALIDATED_CHANNEL,
        origin: str | None = None,
        lock_wait: float = LOCK_WAIT,
        prepared_statements: bool = True,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        unlogged: bool = False,
    ) -> None:
        self.bounds = Bounds(max_entries, max_bytes)
        self._unlogged = unlogged
        if (conninfo is None) == (pool is None):
            raise ConfigurationError("PostgresStore needs exactly one of conninfo or pool")
        if mark_retention <= 0:
            raise ConfigurationError(f"mark_retention must be positive, got {mark_retention}")
        self.values = values
        if invalidated_channel is not None and not is_channel(invalidated_channel):
            raise ConfigurationError(
                "invalidated_channel must be 1 to 63 UTF-8 bytes without NUL, or None, got "
                f"{invalidated_channel!r:.100}"
            )
        if origin is not None and not is_origin(origin):
            raise ConfigurationError(
                f"origin must be a string of 1 to {MAX_ORIGIN_CHARS} characters without NUL "
                f"or lone surrogates, got {origin!r:.100}"
            )
        if not lock_wait > 0:
            raise ConfigurationError(f"lock_wait must be positive seconds, got {lock_wait}")
        self._conninfo = conninfo
        self._pool = pool
        self._owns_pool = pool is None
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigurationError(
                f"need 0 <= min_size <= max_size and max_size >= 1, got min_size={min_size} "
                f"and max_size={max_size}"
            )
        self._max_size = max_size
        self._min_size = min_size
        self._application_name = application_name
        self._retention = float(mark_retention)
        self._max_age = self._retention / 2
        # A quarter of the margin between retention and max stamp age (see "Pruning").
        self._statement_timeout = f"{max(1, int((self._retention - self._max_age) * 250))}ms"
        self._connect_budget = connect_budget
        self._pool_timeout = pool_timeout
        self._where = _pg.describe_target(conninfo) if conninfo else "the pool's database"
        self._channel = invalidated_channel
        self._origin = new_origin() if origin is None else origin
        # Announcements of invalidations made in an application's transaction carry
        # another origin, so this process's listener does not skip them: it applies them
        # (near tier, in-flight map) when they are delivered, at the commit, and never
        # after a rollback.
        self._caller_origin = new_origin()
        self._lock_wait = float(lock_wait)
        self._patience = f"{int(LOCK_PATIENCE * 1000)}ms"
        self._waits = _LockWaits()
        # psycopg's own default (prepare after 5 runs), or never.
        self._prepare_threshold: int | None = 5 if prepared_statements else None
        # The read pool of read_here(): opened by open_read_pool(), closed by close().
        self._here: ConnectionPool[Any] | None = None
        self._opened = False
        # Written and read on the event loop by write(), evict() and close(): successful
        # writes since the last look at the table's size, how many may pass between two
        # looks (Bounds.next_check of the last one), and the eviction running (if any).
        self._since_check = 0
        self._check_every = self.bounds.check_every
        self._evicting: asyncio.Task[None] | None = None

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The connection pool (the coordinator shares it)."""
        if self._pool is None or not self._opened:
            raise NotOpenError("PostgresStore is not open: call await store.open() first")
        return self._pool

    def connection_stats(self) -> dict[str, int]:
        """The pool right now: ``size`` connections (``in_use`` lent out, ``idle``), its
        ``min_size`` and ``max_size``, and ``waiting`` (callers waiting for one)."""
        return _pool_counts(self.pool.get_stats())

    @property
    def read_pool(self) -> ConnectionPool[Any] | None:
        """The pool of :meth:`read_here` (synchronous connections), None when not open."""
        return self._here

    def read_pool_stats(self) -> dict[str, int] | None:
        """The read pool of :meth:`read_here` right now, as :meth:`connection_stats`; None
        when it is not open."""
        pool = self._here
        return None if pool is None else _pool_counts(pool.get_stats())

    @property
    def mark_retention(self) -> float:
        """How long (seconds) marks are kept."""
        return self._retention

    @property
    def invalidated_channel(self) -> str | None:
        """The channel every invalidation is announced on, in its own transaction (None:
        not announced)."""
        return self._channel

    @property
    def origin(self) -> str:
        """The id this store's announcements carry as ``o``: give it to this process's
        :class:`~fleetcache.notifications.listener.InvalidationListener`, which then skips
        their echoes."""
        return self._origin

    #: ``invalidate`` and ``clear_namespace`` take ``conn=``: an application's connection
    #: in its open transaction.
    joins_application_transactions = True

    def change_announcement(self, namespace: str, name: str) -> tuple[str, str] | None:
        """The NOTIFY telling the fleet that ``name`` of ``namespace`` changed in place (a
        rewrite that is no invalidation: peers' near tiers drop their copies), for a write to
        carry (``write(..., notify=...)``); None when this store announces nothing."""
        if self._channel is None:
            return None
        payloads = invalidation_payloads(namespace, [name], origin=self._origin)
        return self._channel, payloads[0]

    @property
    def waiting_for_locks(self) -> int:
        """How many writes and invalidations of this store wait right now, without a
        connection, for a namespace (or the global) lock an invalidation holds."""
        return self._waits.waiting

    def lock_released(self, namespace: str | None) -> None:
        """An invalidation of ``namespace`` (None: of anything, or notifications may have
        been lost) has ended somewhere in the fleet: writes and invalidations waiting for
        its lock try again now instead of at their next poll. (The listener calls this for
        every announcement it hears.)"""
        self._waits.wake(None if namespace is None else namespace_lock(namespace))

    async def open(self) -> None:
        """Connect, create or upgrade the schema, and (if owned) open the pool. Idempotent."""
        if self._opened:
            return
        if not self._owns_pool:
            assert self._pool is not None
            await _pg.pooled(
                self._pool,
                f"creating or upgrading the fleetcache schema in {self._where}",
                self._migrate_on_injected,
            )
            self._opened = True
            return
        conninfo = self._conninfo or ""
        # One connection of our own first: its failure is classified (a pool would retry
        # a refused connection until its timeout and then say only that it timed out).
        conn = await _pg.connect(
            conninfo,
            application_name=self._application_name,
            budget=self._connect_budget,
            prepare_threshold=self._prepare_threshold,
        )
        try:
            with _pg.translate(f"creating or upgrading the fleetcache schema in {self._where}"):
                await migrate_postgres(conn, self._where)
                await self._make_unlogged(conn)
        finally:
            await conn.close()
        failures = _pg.ConnectFailures()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            connection_class=failures.connection_class,
            min_size=self._min_size,
            max_size=self._max_size,
            kwargs=self._connection_kwargs(conninfo),
            timeout=self._pool_timeout,
            # A growth attempt that keeps failing gives up after this, so the next caller
            # who finds no idle connection starts a fresh one (the pool's backoff would
            # otherwise have grown to minutes by the time the server has room again).
            reconnect_timeout=self._connect_budget + _pg.CONNECT_TIMEOUT,
            name=f"fleetcache-store-{self._application_name}",
            open=False,
        )
        # Waits for min_size connections only (see "The pool"); the cause is named.
        await _pg.open_pool(pool, failures, conninfo, budget=self._connect_budget)
        self._pool = pool
        self._opened = True

    def _connection_kwargs(self, conninfo: str) -> dict[str, Any]:
        """How the store's pools connect: autocommit, the prepared-statement setting, and
        the store's application name and connect timeout unless ``conninfo`` has its own."""
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": self._prepare_threshold,
        }
        params = conninfo_to_dict(conninfo)
        if "application_name" not in params:
            kwargs["application_name"] = self._application_name
        if "connect_timeout" not in params:  # else a growth attempt may hang for minutes
            kwargs["connect_timeout"] = _pg.CONNECT_TIMEOUT
        return kwargs

    def open_read_pool(self, max_size: int) -> bool:
        """Open the pool :meth:`read_here` reads through, for callers on their own threads
        (the sync API): synchronous connections made like the store's pool's — the same
        ``conninfo`` (a pooler, if that is where the pool goes; never the session URL),
        autocommit, the same prepared-statement setting. It makes none now and grows on
        demand to ``max_size``; connections idle for 10 minutes are closed (psycopg_pool's
        ``max_idle``), down to none. :meth:`close` closes it. False (and nothing opened)
        when the store was given a pool instead of a ``conninfo``; idempotent."""
        if self._conninfo is None:
            return False
        if not self._opened:
            raise NotOpenError("PostgresStore is not open: call await store.open() first")
        if max_size < 1:
            raise ConfigurationError(f"the read pool needs max_size >= 1, got {max_size}")
        if self._here is None:
            pool: ConnectionPool[Any] = ConnectionPool(
                self._conninfo,
                min_size=0,
                max_size=max_size,
                kwargs=self._connection_kwargs(self._conninfo),
                timeout=self._pool_timeout,
                reconnect_timeout=self._connect_budget + _pg.CONNECT_TIMEOUT,
                name=f"fleetcache-reads-{self._application_name}",
                open=False,
            )
            pool.open(wait=False)  # min_size=0: starts its workers, connects nothing
            self._here = pool
        return True

    async def _migrate_on_injected(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
        # Every transaction here is sent as BEGIN ... COMMIT on an autocommit connection;
        # on a connection that opens transactions by itself they would nest wrongly.
        if not conn.autocommit:
            raise ConfigurationError(
                "PostgresStore needs a pool of autocommit connections: "
                'AsyncConnectionPool(..., kwargs={"autocommit": True})'
            )
        versions = await migrate_postgres(conn, self._where)
        await self._make_unlogged(conn)
        return versions

    async def _make_unlogged(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self._unlogged:
            return
        row = await (await conn.execute(q.PG_IS_UNLOGGED)).fetchone()
        if row is not None and row[0]:
            return
        async with conn.transaction():
            for statement in q.PG_SET_UNLOGGED:
                await conn.execute(statement)
        logger.info("%s: fleetcache_entries is now UNLOGGED", self._where)

    async def close(self) -> None:
        """End a running eviction, and close the pool if this store created it.
        Idempotent."""
        task, self._evicting = self._evicting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._opened = False
        here, self._here = self._here, None
        if here is not None:
            # Inline: it only stops the pool's idle worker threads and closes its idle
            # connections (one in use is closed when given back), and at interpreter exit
            # (the Django backend's atexit close) no executor would take it.
            here.close(timeout=5.0)
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=5.0)

    # ------------------------------------------------------------------------- reads

    async def read(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """The entry under ``key``, else (with ``by_alias``) the most recently created one
        aliased ``key.name`` in the key's namespace, scope and user. One statement."""
        pool = self.pool
        query, params = _read_statement(key, by_alias)
        # The hit path: one checkout, one statement, no closure or message built. A lost
        # connection is retried once like everything else (see "The pool").
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            # getconn/putconn rather than pool.connection(): no context manager per hit.
            conn = await pool.getconn()
            try:
                # Binary rows, as in _fetchone.
                row = await (await conn.execute(query, params, binary=True)).fetchone()
            finally:
                await pool.putconn(conn)
        except psycopg.Error as exc:
            what = f"reading {key.coalesce_key}"
            if conn is None or not _pg.is_connection_lost(exc, conn):
                raise StoreError(f"{what} failed: {_pg.one_line(exc)}") from exc
            _pg.log_lost_connection(what, exc)
            await pool.check()
            row = await _pg.pooled(
                pool, what, lambda conn: _fetchone(conn, query, params), retry=False
            )
        return None if row is None else _entry(key, row, self.values)

    def read_here(self, key: Key, by_alias: bool = False) -> Entry | None:
        """:meth:`read` on the calling thread, through the read pool (see
        :meth:`open_read_pool`): the same statement and rows, no event loop. A lost
        connection is retried once on a fresh one, as :meth:`read` does."""
        query, params = _read_statement(key, by_alias)
        pool = self._here
        if pool is None:
            raise NotOpenError("the read pool is not open: call store.open_read_pool() first")
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = pool.getconn()
            try:
                row = conn.execute(query, params, binary=True).fetchone()
            finally:
                pool.putconn(conn)
        except psycopg.Error as exc:  # a pool timeout too (then conn is None)
            what = f"reading {key.coalesce_key}"
            if conn is None or not _pg.is_connection_lost(exc, conn):
                raise StoreError(f"{what} failed: {_pg.one_line(exc)}") from exc
            _pg.log_lost_connection(what, exc)
            pool.check()
            with _pg.translate(what), pool.connection() as conn:
                row = conn.execute(query, params, binary=True).fetchone()
        return None if row is None else _entry(key, row, self.values)

    async def stamp_and_read(
        self, key: Key, names: Sequence[str], *, by_alias: bool = False
    ) -> tuple[GenerationStamp, Entry | None]:
        """A stamp and ``read(key, by_alias=...)`` in one statement, under one snapshot."""
        reading = self.stamp_and_read_statement(key, names, by_alias=by_alias)
        query = q.PG_STAMP_AND_READ_BY_ALIAS if by_alias else q.PG_STAMP_AND_READ
        row = await _pg.pooled(
            self.pool,
            f"stamping and reading {key.coalesce_key}",
            lambda c: _fetchone(c, query, _key_params(key)),
        )
        return reading.answer(row)

    def stamp_and_read_statement(
        self, key: Key, names: Sequence[str], *, by_alias: bool = False
    ) -> StampAndRead:
        """:meth:`stamp_and_read` as the coordinator sends it with a key's try-lock, in one
        statement (:meth:`StampAndRead.with_try_lock`), and the answer made of its row."""
        return StampAndRead(key, stamped_names(key, names), by_alias, self.values)

    # ------------------------------------------------------------------------ writes

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        notify: tuple[str, str] | None = None,
    ) -> bool:
        """Upsert ``entry``; with ``stamp``, only if nothing it depends on was invalidated
        since; with ``notify``, announce it as it commits. One statement, one round trip
        (``fleetcache_write_v3``: share-locks, then the guarded upsert; see queries.py)."""
        encoded = encode_entry(entry, self.values)
        key = entry.key
        params = _key_params(key)
        params.update(
            encoded.columns(),
            deps=list(encoded.deps),
            ns_lock=namespace_lock(key.namespace),
            guarded=stamp is not None,
            names=None,
            snapshot=None,
            taken_at=None,
            max_age=self._max_age,
            channel=None if notify is None else notify[0],
            payload=None if notify is None else notify[1],
        )
        if stamp is not None:
            point = _check_stamp(stamp, key)
            params.update(
                names=guarded_names(entry, stamp),
                snapshot=point.snapshot,
                taken_at=point.taken_at,
            )

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool | None:
            row = await (await conn.execute(q.PG_WRITE, params)).fetchone()
            return None if row is None or row[0] is None else bool(row[0])  # None: locked

        written = await self._when_unlocked(f"writing {key.coalesce_key}", key.namespace, run)
        if written and self.bounds.bounded:
            await self._after_write()
        return written

    async def _after_write(self) -> None:
        # Every check_every writes (Bounds.next_check of the last look), an eviction in the
        # background (it looks at the size first); the writer waits only if the one under
        # way has let it write twice check_every more meanwhile (so one process cannot
        # outrun eviction).
        self._since_check += 1
        every = self._check_every
        if self._since_check < every:
            return
        task = self._evicting
        if task is not None and not task.done():
            if self._since_check < 2 * every:
                return
            await asyncio.wait({task})  # never raises: the task logs its own failure
        self._since_check = 0
        self._evicting = asyncio.get_running_loop().create_task(
            self._evict_in_background(), name="fleetcache-evict"
        )

    async def _evict_in_background(self) -> None:
        try:
            await self.evict()
        except StoreError as exc:  # logged; the next look tries again
            logger.warning("evicting entries in %s failed: %s", self._where, exc)

    async def table_size(self) -> tuple[int, int]:
        """The entries and value bytes the table holds now (committed), from the counts
        the triggers keep (a few rows read, no scan)."""
        row = await _pg.pooled(
            self.pool, "reading the table's size", lambda c: _fetchone(c, q.PG_TABLE_SIZE, {})
        )
        assert row is not None
        return int(row[0] or 0), int(row[1] or 0)

    async def evict(self) -> int:
        """Evict while the table is over a bound (see the class): batches of the least
        recently written entries with their dependents, each in a short transaction of its
        own; return how many entries went. A batch that finds every candidate locked ends
        it (the next look tries again)."""
        evicted = 0
        while True:
            entries, nbytes = await self.table_size()
            self._check_every = self.bounds.next_check(entries, nbytes)
            want = self.bounds.excess(entries, nbytes)
            if want == 0:
                return evicted

            async def run(conn: psycopg.AsyncConnection[Any], want: int = want) -> int:
                try:
                    async with _pg.pipelined_transaction(conn):
                        await conn.execute(q.PG_EVICT_PATIENCE, {"patience": EVICT_PATIENCE})
                        cursor = await conn.execute(q.PG_EVICT, {"limit": want})
                except psycopg.errors.LockNotAvailable:
                    return 0  # a writer held a dependent: nothing was done
                return cursor.rowcount

            went = await _pg.pooled(self.pool, "evicting entries", run)
            if went <= 0:
                return evicted
            evicted += went

    async def purge_expired(self, before_ms: int, limit: int = 1000) -> int:
        """Delete up to ``limit`` entries whose stale window ended before ``before_ms``
        (ms since the epoch); return how many went. Not an invalidation: nothing is marked."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await conn.execute(q.PG_PURGE_EXPIRED, {"before": before_ms, "limit": limit})
            return cursor.rowcount

        return await _pg.pooled(self.pool, "purging expired entries", run)

    # ----------------------------------------------------------------- invalidations

    async def invalidate(
        self,
        namespace: str,
        names: Sequence[str],
        *,
        expand: Expand | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[str]:
        """Invalidate ``names`` and every entry depending on them, and announce them, in
        one transaction serialised with every write of the namespace (docs/design.md, "The
        invalidation closure").

        With ``conn`` (the application's connection, inside its open transaction) all of
        it runs in that transaction instead: it takes effect, and is announced, when the
        application commits, and never if it rolls back (docs/design.md, "Invalidating
        in the application's transaction")."""
        given = names_to_invalidate(namespace, names, expand)
        if conn is not None:
            return await self._in_caller_transaction(conn, namespace, given, expand)
        if not given:
            return []
        ns_params = {"ns": namespace, "ns_lock": namespace_lock(namespace)}

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[str] | None:
            try:
                async with _pg.pipelined_transaction(conn):
                    await self._lock(conn, q.PG_LOCK_NAMESPACE, ns_params)
                    closure, found = await _closure(conn, namespace, given, expand)
                    await self._prune(conn, len(closure.names))
                    await conn.execute(
                        q.PG_MARK_AND_DELETE_NAMES,
                        {
                            "kind": "k",
                            "ns": namespace,
                            "names": closure.names,
                            "hashes": list(found),
                        },
                    )
                    await self._announce(conn, namespace, closure.names)
            except psycopg.errors.LockNotAvailable:
                return None  # another invalidation holds the namespace: nothing was done
            return closure.names

        return await self._when_unlocked(
            f"invalidating names in namespace {namespace!r}", namespace, run, invalidation=True
        )

    async def clear_namespace(
        self, namespace: str, *, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> None:
        """Mark the namespace invalidated, delete its entries and announce it, in one
        transaction (with ``conn``: in the application's open transaction, as
        :meth:`invalidate`)."""
        check_name("the namespace to clear", namespace, allow_empty=False)
        if conn is not None:
            await self._in_caller_transaction(conn, namespace, None, None)
            return
        ns_params = {"ns": namespace, "ns_lock": namespace_lock(namespace)}

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool | None:
            try:
                async with _pg.pipelined_transaction(conn):
                    await self._lock(conn, q.PG_LOCK_NAMESPACE, ns_params)
                    await self._prune(conn, 1)
                    await conn.execute(
                        q.PG_MARK_AND_DELETE_NAMESPACE,
                        {"kind": "n", "ns": namespace, "names": [""]},
                    )
                    await self._announce(conn, namespace, None)
            except psycopg.errors.LockNotAvailable:
                return None
            return True

        await self._when_unlocked(
            f"clearing namespace {namespace!r}", namespace, run, invalidation=True
        )

    async def clear_all(self) -> None:
        """Mark the whole store invalidated, delete every entry and announce it, in one
        transaction."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool | None:
            try:
                async with _pg.pipelined_transaction(conn):
                    await self._lock(conn, q.PG_LOCK_ALL, {})
                    await self._prune(conn, 1)
                    await conn.execute(
                        q.PG_MARK_AND_DELETE_ALL, {"kind": "g", "ns": "", "names": [""]}
                    )
                    await self._announce(conn, None, None)
            except psycopg.errors.LockNotAvailable:
                return None
            return True

        await self._when_unlocked("clearing the whole cache", None, run, invalidation=True)

    async def _in_caller_transaction(
        self,
        conn: psycopg.AsyncConnection[Any],
        namespace: str,
        given: list[str] | None,
        expand: Expand | None,
    ) -> list[str]:
        """The invalidation of ``given`` (None: the whole namespace) on the application's
        connection, in its open transaction: the same lock, closure rounds, marks, deletes
        and announcement as a pooled invalidation, none of it visible (or delivered)
        before that transaction commits.

        Why this keeps the guarantee (docs/design.md, "Invalidating in the application's
        transaction"): the namespace lock is held exclusively from here until the
        application's commit, so no write of the namespace commits in between; a write
        that committed before the lock is found by the rounds below; a write checked
        after the commit carries a stamp whose snapshot saw this transaction in progress
        or not yet begun (a computation that read the application's old row stamped
        before that read, and the row is only new to snapshots taken after the commit),
        so ``pg_visible_in_snapshot`` is false for the marks' xid and the write is refused.
        Nothing here changes the application's settings: no ``lock_timeout`` (the wait is
        on the application's connection, its choice) and no ``statement_timeout`` (it
        would last until the application's commit)."""
        self._check_caller_connection(conn, namespace)
        what = (
            f"clearing namespace {namespace!r}"
            if given is None
            else f"invalidating names in namespace {namespace!r}"
        )
        what += " in the application's transaction"
        ns_params = {"ns": namespace, "ns_lock": namespace_lock(namespace)}
        with _pg.translate(what):
            row = await (await conn.execute(q.PG_TRANSACTION_ISOLATION)).fetchone()
            self._check_isolation(None if row is None else row[0], namespace)
            # Waits (on the application's connection) for invalidations holding the lock
            # and for writes under way; new writes of the namespace back off meanwhile.
            await conn.execute(q.PG_LOCK_NAMESPACE, ns_params)
            if given is None:
                await conn.execute(
                    q.PG_MARK_AND_DELETE_NAMESPACE, {"kind": "n", "ns": namespace, "names": [""]}
                )
                await self._announce(conn, namespace, None, origin=self._caller_origin)
                return []
            if not given:
                return []
            closure, found = await _closure(conn, namespace, given, expand)
            # No pruning here: it would hold the old marks' row locks until the
            # application commits; the fleet's pooled invalidations prune.
            await conn.execute(
                q.PG_MARK_AND_DELETE_NAMES,
                {"kind": "k", "ns": namespace, "names": closure.names, "hashes": list(found)},
            )
            await self._announce(conn, namespace, closure.names, origin=self._caller_origin)
        return closure.names

    def invalidate_in_sync_transaction(
        self, conn: psycopg.Connection[Any], namespace: str, names: Sequence[str] | None
    ) -> list[str]:
        """The invalidation of ``names`` (None: the namespace's clear) on the application's
        *synchronous* connection, in its open transaction, for the sync API: it calls
        ``fleetcache_invalidate`` (or ``fleetcache_clear_namespace``), the SQL function
        running the same statements as :meth:`invalidate` (without ``expand``). Its
        announcement carries no origin, so this process's listener applies it at the
        commit like every peer's."""
        given = None if names is None else names_to_invalidate(namespace, names, None)
        if names is None:
            check_name("the namespace to clear", namespace, allow_empty=False)
        if not isinstance(conn, psycopg.Connection):
            raise ConfigurationError(
                f"invalidating namespace {namespace!r} in the application's transaction from "
                f"the sync API needs an open psycopg.Connection, got {type(conn).__name__}"
            )
        self._check_status(conn.info.transaction_status, namespace)
        what = f"invalidating namespace {namespace!r} in the application's transaction"
        with _pg.translate(what):
            row = conn.execute(q.PG_TRANSACTION_ISOLATION).fetchone()
            self._check_isolation(None if row is None else row[0], namespace)
            if given is None:
                conn.execute(q.PG_CALL_CLEAR_NAMESPACE, {"ns": namespace, "channel": self._channel})
                return []
            if not given:
                return []
            params = {"ns": namespace, "names": given, "channel": self._channel}
            row = conn.execute(q.PG_CALL_INVALIDATE, params).fetchone()
        return [] if row is None else list(row[0])

    @staticmethod
    def _check_isolation(isolation: str | None, namespace: str) -> None:
        if isolation != "read committed":
            # A transaction snapshot taken before the lock would hide from the closure
            # rounds the writes committed between it and the lock: they would survive.
            raise ConfigurationError(
                f"cannot invalidate namespace {namespace!r} in a {isolation or '?'} "
                "transaction: the closure would miss entries written after its snapshot; "
                "invalidate in a READ COMMITTED transaction (Postgres's default)"
            )

    def _check_caller_connection(self, conn: object, namespace: str) -> None:
        if not isinstance(conn, psycopg.AsyncConnection):
            raise ConfigurationError(
                f"invalidating namespace {namespace!r} in the application's transaction needs "
                f"an open psycopg.AsyncConnection, got {type(conn).__name__}"
            )
        self._check_status(conn.info.transaction_status, namespace)

    @staticmethod
    def _check_status(status: psycopg.pq.TransactionStatus, namespace: str) -> None:
        if status == psycopg.pq.TransactionStatus.INTRANS:
            return
        if status == psycopg.pq.TransactionStatus.INERROR:
            raise ConfigurationError(
                f"cannot invalidate namespace {namespace!r} in the application's "
                "transaction: it has failed (an earlier statement raised); roll it back and "
                "run the change and the invalidation again in a new transaction"
            )
        if status == psycopg.pq.TransactionStatus.IDLE:
            raise ConfigurationError(
                f"cannot invalidate namespace {namespace!r} in the application's "
                "transaction: the connection is not in one; open it first "
                "(async with conn.transaction(): ...) so the change and the invalidation "
                "commit together, or call invalidate without conn="
            )
        raise ConfigurationError(
            f"cannot invalidate namespace {namespace!r} in the application's transaction: "
            f"the connection is {status.name.lower()} (closed, broken or busy)"
        )

    async def _lock(
        self, conn: psycopg.AsyncConnection[Any], statement: str, params: dict[str, Any]
    ) -> None:
        # Wait for the lock at most LOCK_PATIENCE holding this connection (the writes under
        # way finish meanwhile: a waiting invalidation makes new writes back off); then
        # bound every later statement (see "Pruning").
        await conn.execute(q.PG_LOCK_PATIENCE, {"patience": self._patience})
        await conn.execute(statement, params)
        await conn.execute(q.PG_BOUND_STATEMENTS, {"timeout": self._statement_timeout})

    async def _announce(
        self,
        conn: psycopg.AsyncConnection[Any],
        namespace: str | None,
        names: list[str] | None,
        *,
        origin: str | None = None,
    ) -> None:
        # In the invalidation's own transaction: delivered exactly at its commit.
        if self._channel is None:
            return
        payloads = invalidation_payloads(
            namespace, names, origin=origin or self._origin, budget=PAYLOAD_BUDGET
        )
        await conn.execute(q.PG_BROADCAST, {"channel": self._channel, "payloads": payloads})

    async def _when_unlocked(
        self,
        what: str,
        namespace: str | None,
        attempt: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T | None]],
        *,
        invalidation: bool = False,
    ) -> T:
        """Run ``attempt`` on a pooled connection until it answers (None: the namespace,
        or with ``namespace`` None the whole cache, was locked by an invalidation and
        nothing was done), waiting between tries *without* a connection: until a wake-up
        (:meth:`lock_released`, or an invalidation of this process ending) or a poll
        (20 ms doubling to 1 s), for at most ``lock_wait`` seconds in all.

        This process's invalidations of one namespace take turns (the server would run
        them one at a time anyway), so at most one of them holds a connection while it
        waits for the lock (and then at most ``LOCK_PATIENCE`` per try)."""
        lock = None if namespace is None else namespace_lock(namespace)
        deadline = time.monotonic() + self._lock_wait
        if not invalidation:
            return await self._tries(what, namespace, attempt, deadline=deadline)
        turn = self._waits.join_turns(lock)
        try:
            try:
                await asyncio.wait_for(turn.acquire(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise self._locked_out(what, namespace, 0) from None
            try:
                return await self._tries(
                    what, namespace, attempt, deadline=deadline, invalidation=True
                )
            finally:
                turn.release()
        finally:
            self._waits.leave_turns(lock)

    async def _tries(
        self,
        what: str,
        namespace: str | None,
        attempt: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T | None]],
        *,
        deadline: float,
        invalidation: bool = False,
    ) -> T:
        lock = None if namespace is None else namespace_lock(namespace)
        poll = _FIRST_POLL
        tries = 0
        while True:
            try:
                result = await _pg.pooled(self.pool, what, attempt)
            finally:
                if invalidation:  # it held the lock, or was queued for it: both are over
                    self._waits.wake(lock)
            if result is not None:
                return result
            tries += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._locked_out(what, namespace, tries)
            woken = await self._waits.wait(lock, min(poll, left))
            poll = _FIRST_POLL if woken else min(poll * 2, _LAST_POLL)

    def _locked_out(self, what: str, namespace: str | None, tries: int) -> StoreError:
        held = "the whole cache" if namespace is None else f"namespace {namespace!r}"
        return StoreError(
            f"{what} failed: {held} stayed locked by invalidations for {self._lock_wait:g} s "
            f"({tries} tries); nothing was done"
        )

    async def _prune(self, conn: psycopg.AsyncConnection[Any], marking: int) -> None:
        # Before the marks are set, so it never meets a row this transaction marks (one
        # statement may not modify a row twice; and pruning skips locked rows anyway).
        await conn.execute(
            q.PG_PRUNE_MARKS,
            {"retention": self._retention, "limit": PRUNE_BATCH + 2 * marking},
        )


def _check_stamp(stamp: GenerationStamp, key: Key) -> PostgresPoint:
    if stamp.namespace != key.namespace:
        raise InvalidInputError(
            f"a stamp of namespace {stamp.namespace!r} cannot guard a write of {key.coalesce_key}"
        )
    if not isinstance(stamp.point, PostgresPoint):
        raise InvalidInputError(
            f"the stamp for {key.coalesce_key} was not made by a Postgres store"
        )
    return stamp.point


async def _closure(
    conn: psycopg.AsyncConnection[Any],
    namespace: str,
    given: Sequence[str],
    expand: Expand | None,
) -> tuple[Closure, set[bytes]]:
    """The names ``given`` invalidate in ``namespace`` (with ``expand``, round after round
    until nothing new depends on them) and the key hashes of every entry the rounds found,
    read on ``conn`` under the namespace's lock."""
    closure = Closure(given, expand)
    found: set[bytes] = set()
    frontier = list(closure.names)
    while frontier:
        cursor = await conn.execute(q.PG_CLOSURE_ROUND, {"ns": namespace, "names": frontier})
        rows = await cursor.fetchall()
        found.update(row[0] for row in rows)
        frontier = closure.add(field for row in rows for field in row[1:])
    return closure, found


@dataclass(frozen=True, slots=True)
class StampAndRead:
    """A stamp-and-read of ``key`` (the stamp covering ``names``) and its answer."""

    key: Key
    names: tuple[str, ...]
    by_alias: bool
    values: ValueCodec

    def with_try_lock(self, lock_id: int) -> tuple[str, dict[str, Any]]:
        """The statement that tries the session lock ``lock_id`` and then stamps and reads
        (``fleetcache_try_lock_and_read_v1``; binary rows): ``won``, then the row for
        :meth:`answer`."""
        return q.PG_TRY_LOCK_AND_READ, {
            **_key_params(self.key),
            "id": lock_id,
            "by_alias": self.by_alias,
        }

    def answer(self, row: tuple[Any, ...] | None) -> tuple[GenerationStamp, Entry | None]:
        """The stamp and the entry (None: none stored) the statement's row says."""
        assert row is not None  # the LEFT JOIN always answers one row
        stamp = GenerationStamp(self.key.namespace, self.names, PostgresPoint(row[0], row[1]))
        return stamp, (None if row[2] is None else _entry(self.key, row[2:], self.values))


async def _fetchone(
    conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
) -> tuple[Any, ...] | None:
    # Rows come in binary format: a value's bytes arrive as they are, where the text format
    # would send them hex-encoded (twice the bytes, and a parse).
    return await (await conn.execute(query, params, binary=True)).fetchone()
