"""The Postgres store: the fleet's shared cache, on psycopg 3 and psycopg_pool.

Why an invalidation closes every window
=======================================

The guarantee: after ``invalidate(ns, [X])`` returns, no entry that depends (transitively)
on X and was computed from X's old content exists. A populate computing such an entry D
took its stamp S (a snapshot) before it read X; its write is one statement, the function
``fleetcache_write_v3``, whose transaction first share-locks the global and the namespace
lock, then, in the function's *next* statement (a VOLATILE PL/pgSQL function takes a fresh
snapshot per statement in READ COMMITTED, so this one is taken after the lock wait), runs
the guarded INSERT that checks the marks against S. The invalidation is one transaction
that takes the namespace lock *exclusively*, then computes the closure in rounds (each
round a new statement, each seeing every write committed before it), marks every name of
the closure with its own transaction id, deletes every entry named or aliased by one, and
commits. Since the two
locks conflict, D's write transaction either

* committed before the invalidation got its lock: the closure rounds then see D (D's
  deps meet the closure, or D is named by it) and delete it; or
* started its guarded INSERT after the invalidation committed: that INSERT's snapshot sees
  the marks, which S did not see (they were set after S was taken, by a transaction S
  found in progress or had not yet begun), so the write is refused.

There is no third case: a write cannot hold the shared lock while the invalidation holds
the exclusive one. (The order "compute the closure, then lock and mark" would leave one:
a D committed after the scan and before the marks.) Writes of the same namespace share
their lock, so they do not wait for each other; a namespace clear takes the same locks as
an invalidation of names, and ``clear_all`` takes the global lock exclusively.

The first release retried invalidations that Postgres aborted as deadlocks (two
invalidations reaching the same rows, one by name and one by alias, in opposite orders).
There is no such retry any more because there is no such deadlock: invalidations of one
namespace now run one at a time (the exclusive namespace lock), every transaction takes
the advisory locks in one order (global, then namespace), marks of different namespaces
are different rows, and the one statement that touches other namespaces' rows (pruning)
skips any row another transaction holds instead of waiting for it.

Pruning
=======

Marks would otherwise accumulate forever. A write whose stamp is older than
``max_stamp_age`` (half the retention) is refused outright, and every invalidation deletes
marks older than the retention. That never removes a mark M that could still refuse a
write W under stamp S: M could refuse W only if M's transaction committed after S was
taken, so M was set (``clock_timestamp()``) at most ``T`` before S, where ``T`` bounds the
time from the marking statement to its transaction's commit; W is only accepted while S is
younger than ``max_stamp_age``; so when W runs, M is younger than ``max_stamp_age + T``,
which is less than the retention as long as ``T`` < retention - ``max_stamp_age``. ``T`` is
kept short: the marking statement, the pruning statement and the COMMIT go to the server
in one pipeline (no client pause between them), and each statement of an invalidation
after its locks runs under ``statement_timeout`` = a quarter of that margin (450 s with
the defaults; the margin is 1800 s). Every time here is the server's clock.

The pool
========

An owned pool starts small (``min_size``, default 1: what ``open()`` waits for) and grows
on demand up to ``max_size`` (default 10), so a process that can get only some connections
from a server near its ``max_connections`` starts and works within them; a pool that
cannot grow makes callers wait for a connection to come back, and an open that cannot get
even ``min_size`` fails naming the cause (``too-many-connections``). Connections are
not checked on checkout (that costs a round trip per request); instead a connection found
dead when used (after a server restart, or a terminated backend) makes the pool check all
its idle connections and the operation run once more on a fresh one (``_pg.pooled``): each
operation here may run twice (reads only read; a write is an upsert whose second run under
the same stamp is refused or rewrites the same row; an invalidation marks and deletes
again). The coordinator and the publisher share the pool (:attr:`PostgresStore.pool`).

Every statement on the pool is safe behind a transaction pooler (PgBouncer in transaction
mode): it leaves no session state (advisory locks are transaction locks, settings are
``SET LOCAL``, no LISTEN, no temporary table), and with ``prepared_statements=False`` no
server-side prepared statement either (psycopg's ``prepare_threshold=None``), since a
pooler may run the next statement on a server connection that never saw it prepared.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

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
from fleetcache.stores.closure import Closure
from fleetcache.stores.codecs import JSON_VALUES, ValueCodec
from fleetcache.stores.migrations import migrate_postgres
from fleetcache.stores.validation import (
    check_name,
    encode_entry,
    names_to_invalidate,
    stamped_names,
    validate_key,
)

logger = get_logger("fleetcache.stores")

#: The application_name of the store's connections (what pg_stat_activity shows).
APPLICATION_NAME = "fleetcache"
#: The default number of pooled connections the pool may grow to.
POOL_SIZE = 10
#: The default number of pooled connections made by ``open()`` (and kept when idle).
POOL_MIN_SIZE = 1
#: The most old marks one invalidation prunes, besides twice the marks it sets: enough to
#: outpace any rate of invalidations, small enough to keep its transaction short.
PRUNE_BATCH = 10_000


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
        prepared_statements: bool = True,
    ) -> None:
        if (conninfo is None) == (pool is None):
            raise ConfigurationError("PostgresStore needs exactly one of conninfo or pool")
        if mark_retention <= 0:
            raise ConfigurationError(f"mark_retention must be positive, got {mark_retention}")
        self.values = values
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
        # psycopg's own default (prepare after 5 runs), or never.
        self._prepare_threshold: int | None = 5 if prepared_statements else None
        self._opened = False

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The connection pool (the coordinator and the publisher share it)."""
        if self._pool is None or not self._opened:
            raise NotOpenError("PostgresStore is not open: call await store.open() first")
        return self._pool

    def connection_stats(self) -> dict[str, int]:
        """The pool right now: ``size`` connections (``in_use`` lent out, ``idle``), its
        ``min_size`` and ``max_size``, and ``waiting`` (callers waiting for one)."""
        stats = self.pool.get_stats()
        size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
        return {
            "size": size,
            "in_use": size - idle,
            "idle": idle,
            "min_size": stats.get("pool_min", 0),
            "max_size": stats.get("pool_max", 0),
            "waiting": stats.get("requests_waiting", 0),
        }

    @property
    def mark_retention(self) -> float:
        """How long (seconds) marks are kept."""
        return self._retention

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
        finally:
            await conn.close()
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": self._prepare_threshold,
        }
        params = conninfo_to_dict(conninfo)
        if "application_name" not in params:
            kwargs["application_name"] = self._application_name
        if "connect_timeout" not in params:  # else a growth attempt may hang for minutes
            kwargs["connect_timeout"] = _pg.CONNECT_TIMEOUT
        failures = _pg.ConnectFailures()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            connection_class=failures.connection_class,
            min_size=self._min_size,
            max_size=self._max_size,
            kwargs=kwargs,
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

    async def _migrate_on_injected(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
        # Every transaction here is sent as BEGIN ... COMMIT on an autocommit connection;
        # on a connection that opens transactions by itself they would nest wrongly.
        if not conn.autocommit:
            raise ConfigurationError(
                "PostgresStore needs a pool of autocommit connections: "
                'AsyncConnectionPool(..., kwargs={"autocommit": True})'
            )
        return await migrate_postgres(conn, self._where)

    async def close(self) -> None:
        """Close the pool if this store created it. Idempotent."""
        self._opened = False
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=5.0)

    # ------------------------------------------------------------------------- reads

    async def read(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """The entry under ``key``, else (with ``by_alias``) the most recently created one
        aliased ``key.name`` in the key's namespace, scope and user. One statement."""
        validate_key(key)
        pool = self.pool
        query = q.PG_READ_BY_ALIAS if by_alias else q.PG_READ
        params = _key_params(key)
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

    async def stamp_and_read(
        self, key: Key, names: Sequence[str], *, by_alias: bool = False
    ) -> tuple[GenerationStamp, Entry | None]:
        """A stamp and ``read(key, by_alias=...)`` in one statement, under one snapshot."""
        stamped = stamped_names(key, names)
        query = q.PG_STAMP_AND_READ_BY_ALIAS if by_alias else q.PG_STAMP_AND_READ
        params = _key_params(key)
        row = await _pg.pooled(
            self.pool,
            f"stamping and reading {key.coalesce_key}",
            lambda c: _fetchone(c, query, params),
        )
        assert row is not None  # the LEFT JOIN always answers one row
        stamp = GenerationStamp(key.namespace, stamped, PostgresPoint(row[0], row[1]))
        return stamp, (None if row[2] is None else _entry(key, row[2:], self.values))

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

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool:
            row = await (await conn.execute(q.PG_WRITE, params)).fetchone()
            return bool(row and row[0])

        return await _pg.pooled(self.pool, f"writing {key.coalesce_key}", run)

    async def purge_expired(self, before_ms: int, limit: int = 1000) -> int:
        """Delete up to ``limit`` entries whose stale window ended before ``before_ms``
        (ms since the epoch); return how many went. Not an invalidation: nothing is marked."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await conn.execute(q.PG_PURGE_EXPIRED, {"before": before_ms, "limit": limit})
            return cursor.rowcount

        return await _pg.pooled(self.pool, "purging expired entries", run)

    # ----------------------------------------------------------------- invalidations

    async def invalidate(
        self, namespace: str, names: Sequence[str], *, expand: Expand | None = None
    ) -> list[str]:
        """Invalidate ``names`` and every entry depending on them, in one transaction
        serialised with every write of the namespace (see the module docstring)."""
        given = names_to_invalidate(namespace, names, expand)
        if not given:
            return []
        ns_params = {"ns": namespace, "ns_lock": namespace_lock(namespace)}

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[str]:
            async with _pg.pipelined_transaction(conn):
                await conn.execute(q.PG_LOCK_NAMESPACE, ns_params)
                await conn.execute(q.PG_BOUND_STATEMENTS, {"timeout": self._statement_timeout})
                closure = Closure(given, expand)
                frontier = list(closure.names)
                while frontier:
                    cursor = await conn.execute(
                        q.PG_CLOSURE_ROUND, {"ns": namespace, "names": frontier}
                    )
                    frontier = closure.add(
                        field for row in await cursor.fetchall() for field in row
                    )
                await self._prune(conn, len(closure.names))
                await conn.execute(
                    q.PG_MARK_AND_DELETE_NAMES,
                    {"kind": "k", "ns": namespace, "names": closure.names},
                )
            return closure.names

        return await _pg.pooled(self.pool, f"invalidating names in namespace {namespace!r}", run)

    async def clear_namespace(self, namespace: str) -> None:
        """Mark the namespace invalidated and delete its entries, in one transaction."""
        check_name("the namespace to clear", namespace, allow_empty=False)
        ns_params = {"ns": namespace, "ns_lock": namespace_lock(namespace)}

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            async with _pg.pipelined_transaction(conn):
                await conn.execute(q.PG_LOCK_NAMESPACE, ns_params)
                await conn.execute(q.PG_BOUND_STATEMENTS, {"timeout": self._statement_timeout})
                await self._prune(conn, 1)
                await conn.execute(
                    q.PG_MARK_AND_DELETE_NAMESPACE, {"kind": "n", "ns": namespace, "names": [""]}
                )

        await _pg.pooled(self.pool, f"clearing namespace {namespace!r}", run)

    async def clear_all(self) -> None:
        """Mark the whole store invalidated and delete every entry, in one transaction."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            async with _pg.pipelined_transaction(conn):
                await conn.execute(q.PG_LOCK_ALL)
                await conn.execute(q.PG_BOUND_STATEMENTS, {"timeout": self._statement_timeout})
                await self._prune(conn, 1)
                await conn.execute(q.PG_MARK_AND_DELETE_ALL, {"kind": "g", "ns": "", "names": [""]})

        await _pg.pooled(self.pool, "clearing the whole cache", run)

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


async def _fetchone(
    conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
) -> tuple[Any, ...] | None:
    # Rows come in binary format: a value's bytes arrive as they are, where the text format
    # would send them hex-encoded (twice the bytes, and a parse).
    return await (await conn.execute(query, params, binary=True)).fetchone()
