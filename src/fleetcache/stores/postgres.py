"""The Postgres store: the fleet's shared cache, on psycopg 3 and psycopg_pool."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from fleetcache.errors import ConfigurationError, NotOpenError, SchemaVersionError, StoreError
from fleetcache.stores import queries as q
from fleetcache.stores.base import (
    Entry,
    GenerationStamp,
    Key,
    stamp_names,
    validate_entry,
    write_params,
)

# Advisory-lock classes (the two-int form, a key space apart from the coordinator's
# one-bigint locks) for the generation counters: global, namespace, name.
_LOCK_GLOBAL = 0x4643_0001
_LOCK_NAMESPACE = 0x4643_0002
_LOCK_NAME = 0x4643_0003


logger = logging.getLogger("fleetcache.stores")

# How often an invalidation that Postgres aborted as a deadlock is tried in all.
_DEADLOCK_ATTEMPTS = 3


def _lock_id(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


def _locks(namespace: str, names: Sequence[str]) -> tuple[list[int], list[int]]:
    """Advisory locks (classes, ids) for namespace and names in the one global order."""
    name_ids = sorted({_lock_id(namespace, name) for name in names})
    classes = [_LOCK_GLOBAL, _LOCK_NAMESPACE] + [_LOCK_NAME] * len(name_ids)
    return classes, [0, _lock_id(namespace), *name_ids]


def _entry(row: tuple[Any, ...]) -> Entry:
    url, scope, user, ns, value, deps, error, created_at, alias, diagnostics = row
    return Entry(
        key=Key(ns, url, scope, user),
        value=value,
        deps=tuple(deps),
        error=error,
        created_at=created_at,
        alias=alias,
        diagnostics=diagnostics,
    )


class PostgresStore:
    """A :class:`~fleetcache.stores.base.Store` on a Postgres ``modules`` table.

    Give it a ``conninfo`` (it then owns and closes its pool) or an open ``pool`` of
    autocommit connections (which it never closes). ``open()`` creates the schema once,
    idempotently and safely when many processes start together.
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        pool: AsyncConnectionPool[Any] | None = None,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        if (conninfo is None) == (pool is None):
            raise ConfigurationError("PostgresStore needs exactly one of conninfo or pool")
        self._conninfo = conninfo
        self._pool = pool
        self._owns_pool = pool is None
        self._min_size = min_size
        self._max_size = max_size
        self._opened = False

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The connection pool (the coordinator may share it)."""
        if self._pool is None or not self._opened:
            raise NotOpenError("PostgresStore is not open: call await store.open() first")
        return self._pool

    async def open(self) -> None:
        """Open the pool (if this store owns it) and create or check the schema."""
        if self._opened:
            return
        try:
            if self._pool is None:
                self._pool = AsyncConnectionPool(
                    self._conninfo or "",
                    min_size=self._min_size,
                    max_size=self._max_size,
                    kwargs={"autocommit": True},
                    open=False,
                )
            if self._owns_pool:
                await self._pool.open(wait=True)
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(q.PG_LOCK_SCHEMA, {"id": q.PG_SCHEMA_LOCK_ID})
                for statement in q.PG_CREATE_SCHEMA:
                    await conn.execute(statement)
                await conn.execute(q.PG_SET_SCHEMA_VERSION, {"version": q.SCHEMA_VERSION})
                row = await (await conn.execute(q.PG_GET_SCHEMA_VERSION)).fetchone()
        except psycopg.Error as exc:
            if self._owns_pool and self._pool is not None:
                await self._pool.close()
                self._pool = None
            raise StoreError(f"opening the Postgres store failed: {exc}") from exc
        version = row[0] if row else None
        if version != q.SCHEMA_VERSION:
            if self._owns_pool:
                await self._pool.close()
                self._pool = None
            raise SchemaVersionError(
                f"database schema version is {version}, this fleetcache knows "
                f"{q.SCHEMA_VERSION}; upgrade fleetcache"
            )
        self._opened = True

    async def close(self) -> None:
        """Close the pool if this store created it."""
        if self._owns_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._opened = False

    @asynccontextmanager
    async def _transaction(
        self, what: str, session: object | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection in a transaction; driver errors leave as :class:`StoreError`
        naming ``what``. A ``session`` already in a transaction (a coordinator's lock
        transaction) is used as it is: its statements join that transaction, whose commit
        releases their locks, and a failure raises, so the holder rolls it all back."""
        try:
            if isinstance(session, psycopg.AsyncConnection):
                if session.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                    yield session
                else:
                    async with session.transaction():
                        yield session
            else:
                async with self.pool.connection() as conn, conn.transaction():
                    yield conn
        except psycopg.Error as exc:
            raise StoreError(f"{what} failed: {exc}") from exc

    @asynccontextmanager
    async def _connection(
        self, what: str, session: object | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection for one autocommit statement (``session`` when one is given)."""
        try:
            if isinstance(session, psycopg.AsyncConnection):
                yield session
            else:
                async with self.pool.connection() as conn:
                    yield conn
        except psycopg.Error as exc:
            raise StoreError(f"{what} failed: {exc}") from exc

    async def read(self, key: Key, *, session: object | None = None) -> Entry | None:
        """The entry named or aliased ``key.name`` under the key's namespace, scope and user."""
        params = {"ns": key.namespace, "scope": key.scope, "user": key.user, "name": key.name}
        # The hot path of every hit: no helper context manager, one checkout, one query.
        try:
            if isinstance(session, psycopg.AsyncConnection):
                row = await (await session.execute(q.PG_READ, params)).fetchone()
            else:
                async with self.pool.connection() as conn:
                    row = await (await conn.execute(q.PG_READ, params)).fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"reading {key.coalesce_key!r} failed: {exc}") from exc
        return None if row is None else _entry(row)

    async def stamp(
        self, namespace: str, names: Sequence[str], *, session: object | None = None
    ) -> GenerationStamp:
        """Now, as a snapshot of which transactions have committed."""
        async with self._connection(f"stamping {namespace!r}", session) as conn:
            row = await (await conn.execute(q.PG_STAMP)).fetchone()
        assert row is not None  # pg_current_snapshot() always answers
        return GenerationStamp(namespace, stamp_names(names), str(row[0]))

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        session: object | None = None,
    ) -> bool:
        """Upsert ``entry``; with ``stamp``, only if nothing it depends on was invalidated
        since (one guarded INSERT after share-locking the marks, so a concurrent
        invalidation is serialised with it)."""
        validate_entry(entry)
        key = entry.key
        params = write_params(entry, stamp)
        async with self._transaction(f"writing {key.coalesce_key!r}", session) as conn:
            if stamp is not None:
                classes, ids = _locks(stamp.namespace, params["names"])
                await conn.execute(q.PG_LOCK_SHARED, {"classes": classes, "ids": ids})
            row = await (await conn.execute(q.PG_WRITE, params)).fetchone()
        return row is not None

    async def _invalidate(
        self,
        what: str,
        *,
        shared: tuple[list[int], list[int]],
        exclusive: tuple[list[int], list[int]],
        bump: dict[str, list[str]],
        delete: str,
        params: dict[str, Any],
    ) -> None:
        """One invalidation transaction: take the locks, mark, delete. Two invalidations
        whose names differ but reach the same rows (one by name, one by alias) can lock
        those rows in opposite orders; Postgres then aborts one as a deadlock, which is
        retried a few times."""
        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            try:
                async with self._transaction(what) as conn:
                    if shared[0]:
                        await conn.execute(
                            q.PG_LOCK_SHARED, {"classes": shared[0], "ids": shared[1]}
                        )
                    await conn.execute(
                        q.PG_LOCK_EXCLUSIVE, {"classes": exclusive[0], "ids": exclusive[1]}
                    )
                    await conn.execute(q.PG_BUMP, bump)
                    await conn.execute(delete, params)
                return
            except StoreError as exc:
                deadlock = isinstance(exc.__cause__, psycopg.errors.DeadlockDetected)
                if not deadlock or attempt == _DEADLOCK_ATTEMPTS:
                    raise
                logger.info("%s hit a deadlock (attempt %d); retrying", what, attempt)

    async def delete_names(self, namespace: str, names: Sequence[str]) -> None:
        """Mark each name invalidated and delete the entries named or aliased by ``names``."""
        unique = sorted(set(names))
        if not unique:
            return
        classes, ids = _locks(namespace, unique)
        await self._invalidate(
            f"invalidating names in {namespace!r}",
            shared=(classes[:2], ids[:2]),
            exclusive=(classes[2:], ids[2:]),
            bump={"kinds": ["k"] * len(unique), "nss": [namespace] * len(unique), "names": unique},
            delete=q.PG_DELETE_NAMES,
            params={"ns": namespace, "names": unique},
        )

    async def delete_namespace(self, namespace: str) -> None:
        """Mark the namespace invalidated and delete its entries."""
        classes, ids = _locks(namespace, [])
        await self._invalidate(
            f"clearing namespace {namespace!r}",
            shared=(classes[:1], ids[:1]),
            exclusive=(classes[1:], ids[1:]),
            bump={"kinds": ["n"], "nss": [namespace], "names": [""]},
            delete=q.PG_DELETE_NAMESPACE,
            params={"ns": namespace},
        )

    async def delete_all(self) -> None:
        """Mark the whole store invalidated and delete every entry."""
        await self._invalidate(
            "clearing the whole cache",
            shared=([], []),
            exclusive=([_LOCK_GLOBAL], [0]),
            bump={"kinds": ["g"], "nss": [""], "names": [""]},
            delete=q.PG_DELETE_ALL,
            params={},
        )

    async def find_dependents(self, namespace: str, names: Sequence[str]) -> list[str]:
        """Names of entries of ``namespace`` whose deps meet ``names``."""
        if not names:
            return []
        params = {"ns": namespace, "names": sorted(set(names))}
        async with self._connection(f"finding dependents in {namespace!r}") as conn:
            rows = await (await conn.execute(q.PG_FIND_DEPENDENTS, params)).fetchall()
        return [row[0] for row in rows]
