"""What a cache's database holds right now, read from outside the fleet, and a purge of
its dead entries: :func:`inspect` (the ``fleetcache inspect`` command) and :func:`purge`
(``fleetcache purge``). Inspection only reads, in one read-only transaction; it never
creates or migrates anything.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from fleetcache import _pg
from fleetcache.errors import (
    ConfigurationError,
    SchemaMissingError,
    SchemaVersionError,
    StoreError,
)
from fleetcache.factory import is_postgres_url
from fleetcache.lookup.caching import PURGE_MARGIN_MS
from fleetcache.stores import queries as q
from fleetcache.stores.postgres import PostgresStore, namespace_lock
from fleetcache.stores.sqlite import SqliteStore

__all__ = [
    "AdvisoryLock",
    "CacheReport",
    "ConnectionGroup",
    "MarkUsage",
    "NamespaceUsage",
    "Purged",
    "ServerActivity",
    "inspect",
    "purge",
]

#: How many namespaces a report lists by default (the largest by entries).
TOP_NAMESPACES = 10
#: What ``purge`` leaves by default past an entry's stale window (seconds): the same
#: margin the fleet's own purge keeps, since the fleet's clocks may disagree a little.
PURGE_MARGIN = PURGE_MARGIN_MS / 1000
#: How many entries one purge statement deletes at most.
PURGE_BATCH = 1000
#: The application_name prefix of fleetcache's own connections (store pool
#: ``fleetcache``, the session ``fleetcache-session``, ...), unless the URL sets one.
APPLICATION_PREFIX = "fleetcache"

_MARK_KINDS: dict[str, Literal["global", "namespace", "name"]] = {
    "g": "global",
    "n": "namespace",
    "k": "name",
}
_STORE_LOCKS: dict[int, Literal["schema", "global", "namespace"]] = {
    q.LOCK_SCHEMA: "schema",
    q.LOCK_GLOBAL: "global",
    q.LOCK_NAMESPACE: "namespace",
}


@dataclass(frozen=True, slots=True)
class NamespaceUsage:
    """One namespace's share of the table."""

    namespace: str
    entries: int
    #: The values' bytes as stored.
    value_bytes: int
    #: Entries past their expiry, inside their stale window (served while refreshed).
    stale: int
    #: Entries past their stale window (misses, waiting to be purged).
    dead: int


@dataclass(frozen=True, slots=True)
class MarkUsage:
    """The invalidation marks of one kind: ``global`` (``clear_all``), ``namespace``
    (``clear_namespace``) or ``name`` (``invalidate``, ``set``), and the ages (seconds) of
    the oldest and the newest. Marks older than the retention (1 h) are pruned."""

    kind: Literal["global", "namespace", "name"]
    count: int
    oldest_age_seconds: float
    newest_age_seconds: float


@dataclass(frozen=True, slots=True)
class AdvisoryLock:
    """One of fleetcache's advisory locks, held or awaited by one backend.

    ``kind``: ``key`` (the coordinator's lock on a key being computed; ``lock`` is its
    lock id, :func:`fleetcache.coordination.lock_id` of the key), ``namespace`` (taken by
    invalidations exclusively and by writes shared; ``lock`` is the namespace's 32-bit
    hash, ``namespace`` its name when an entry or a mark names it), ``global``
    (``clear_all`` exclusively, every write shared) or ``schema`` (migrations).
    """

    kind: Literal["key", "namespace", "global", "schema"]
    lock: int
    namespace: str | None
    mode: Literal["exclusive", "shared"]
    pid: int
    application_name: str | None
    #: The backend's state (``active``, ``idle``, ``idle in transaction``...).
    state: str | None
    client_addr: str | None
    #: A waiter: how long its statement has been running (its wait). None when held.
    waiting_seconds: float | None
    #: A waiter: the backends it waits for. Empty when held.
    blocked_by: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConnectionGroup:
    """The client backends of the database with one ``application_name``."""

    application_name: str
    total: int
    active: int
    idle: int
    idle_in_transaction: int
    #: Waiting for a lock of any kind (``wait_event_type = 'Lock'``).
    waiting_for_lock: int


@dataclass(frozen=True, slots=True)
class ServerActivity:
    """Postgres only: locks and backends right now (``pg_locks``, ``pg_stat_activity``)."""

    #: fleetcache's advisory locks held, then those awaited.
    held: tuple[AdvisoryLock, ...]
    waiting: tuple[AdvisoryLock, ...]
    #: This database's client backends by application_name (the inspecting one left out).
    connections: tuple[ConnectionGroup, ...]
    #: Client backends of the whole server, and its ``max_connections``.
    server_connections: int
    max_connections: int
    #: Key locks are reported for backends whose application_name starts with this.
    key_lock_prefix: str


@dataclass(frozen=True, slots=True)
class CacheReport:
    """What a cache's database holds at ``now_ms``; :meth:`to_json` for a JSON object.

    Entry states follow the fleet's own reading (``fleetcache.lookup.expiry``): ``fresh``
    (no expiry, or before it; ``without_expiry`` of them never expire), ``stale`` (past
    the expiry, inside the stale window) and ``dead`` (past the stale window). The times
    are the inspecting process's clock, as the fleet's entries carry their writers'.
    """

    #: Where (no password).
    target: str
    backend: Literal["postgres", "sqlite"]
    server_version: str
    schema_version: int
    now_ms: int
    entries: int
    #: The values' bytes as stored (octet length of the value column).
    value_bytes: int
    #: Postgres: ``fleetcache_entries`` on disk with its TOAST and indexes; sqlite: the
    #: file (every table).
    storage_bytes: int
    namespaces: int
    #: The largest namespaces by entries (then bytes), at most ``top``.
    top_namespaces: tuple[NamespaceUsage, ...]
    #: ``created_at`` of the oldest and the newest entry (ms since the epoch).
    oldest_created_at_ms: int | None
    newest_created_at_ms: int | None
    without_expiry: int
    fresh: int
    stale: int
    dead: int
    #: Entries holding a cached error.
    errors: int
    marks: tuple[MarkUsage, ...]
    #: Locks and backends; None on sqlite, where they do not apply.
    activity: ServerActivity | None

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON data (lists, dicts, numbers, strings, null)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Purged:
    """What :func:`purge` deleted: ``entries`` whose stale window ended before
    ``before_ms`` (ms since the epoch)."""

    target: str
    entries: int
    before_ms: int


# ------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class _Target:
    backend: Literal["postgres", "sqlite"]
    url: str  # the conninfo, or the sqlite path
    where: str


def _target(url: str) -> _Target:
    if url.startswith("memory:"):
        raise ConfigurationError(
            "memory:// lives inside one process: there is nothing to inspect from outside "
            "it (use cache.stats() in that process)"
        )
    if is_postgres_url(url):
        return _Target("postgres", url, _pg.describe_target(url))
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite://").removeprefix("/")
        if not path:
            raise ConfigurationError(f"a sqlite URL needs a path, like sqlite:///cache.db: {url!r}")
    elif "://" in url:
        raise ConfigurationError(
            f"unsupported cache URL {url!r}: use sqlite:///path or postgresql://..."
        )
    else:
        path = url
    return _Target("sqlite", path, f"sqlite file {path!r}")


def _key_lock_prefix(conninfo: str) -> str:
    # A URL that names its application_name gives it to every fleetcache connection.
    try:
        name = conninfo_to_dict(conninfo).get("application_name")
    except psycopg.ProgrammingError:
        name = None
    return str(name) if name else APPLICATION_PREFIX


def _check_version(where: str, found: int) -> None:
    if found > q.SCHEMA_VERSION:
        raise SchemaVersionError(where, found, q.SCHEMA_VERSION)
    if found < q.SCHEMA_VERSION:
        raise SchemaMissingError(where, found, q.SCHEMA_VERSION)


# ------------------------------------------------------------------------ inspect


async def inspect(
    url: str,
    *,
    top: int = TOP_NAMESPACES,
    now: float | None = None,
    key_lock_prefix: str | None = None,
) -> CacheReport:
    """Report what the cache at ``url`` (``postgresql://…`` or ``sqlite:///path``) holds.

    Reads only, in one read-only transaction (one snapshot for every figure); never
    creates or migrates anything. ``top``: how many namespaces to list; ``now``: the time
    (seconds since the epoch) entry states are judged at (default: this clock);
    ``key_lock_prefix``: whose one-bigint advisory locks count as key locks (default: the
    URL's application_name, else ``fleetcache``).

    Raises :class:`~fleetcache.errors.ConfigurationError` for ``memory://`` (nothing to
    inspect from outside its process) or an unsupported URL,
    :class:`~fleetcache.errors.SchemaMissingError` when the database holds no schema (or
    an older one), :class:`~fleetcache.errors.SchemaVersionError` when it is newer than
    this release, :class:`~fleetcache.errors.DatabaseConnectError` when it cannot be
    reached, :class:`~fleetcache.errors.StoreError` when a statement fails.
    """
    if top < 0:
        raise ConfigurationError(f"top must be >= 0, got {top}")
    target = _target(url)
    now_s = time.time() if now is None else now
    if target.backend == "sqlite":
        return await asyncio.to_thread(_inspect_sqlite, target, top, now_s)
    prefix = key_lock_prefix if key_lock_prefix is not None else _key_lock_prefix(url)
    return await _inspect_postgres(target, top, now_s, prefix)


async def _pg_schema_version(conn: psycopg.AsyncConnection[Any], where: str) -> int:
    row = await (await conn.execute(q.PG_HAS_SCHEMA_TABLE)).fetchone()
    if row is None or not row[0]:
        raise SchemaMissingError(where, 0, q.SCHEMA_VERSION)
    row = await (await conn.execute(q.PG_GET_SCHEMA_VERSION)).fetchone()
    if row is None:
        raise StoreError(f"{where}: fleetcache_schema exists but holds no version")
    return int(row[0])


async def _pg_read_only(conninfo: str) -> psycopg.AsyncConnection[Any]:
    """A connection whose transactions are read-only and see one snapshot throughout."""
    conn = await _pg.connect(conninfo, application_name="fleetcache-inspect")
    try:
        await conn.set_read_only(True)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _inspect_postgres(target: _Target, top: int, now_s: float, prefix: str) -> CacheReport:
    now_ms = int(now_s * 1000)
    conn = await _pg_read_only(target.url)
    try:
        with _pg.translate(f"inspecting {target.where}"):
            async with conn.transaction(force_rollback=True):
                version = await _pg_schema_version(conn, target.where)
                _check_version(target.where, version)
                row = await (await conn.execute(q.PG_INSPECT_VALUE_TYPE)).fetchone()
                sizes = "jsonb" if row is not None and row[0] == "jsonb" else "octets"
                params = {"now": now_ms, "top": top}
                totals = await (await conn.execute(q.PG_INSPECT_TOTALS[sizes], params)).fetchone()
                assert totals is not None  # an aggregate always answers one row
                spaces = await (
                    await conn.execute(q.PG_INSPECT_NAMESPACES[sizes], params)
                ).fetchall()
                marks = await (await conn.execute(q.PG_INSPECT_MARKS)).fetchall()
                activity = await _pg_activity(conn, prefix)
    finally:
        await conn.close()
    return _report(
        target,
        version=version,
        now_ms=now_ms,
        totals=totals,
        spaces=spaces,
        marks=marks,
        activity=activity,
    )


async def _pg_activity(conn: psycopg.AsyncConnection[Any], prefix: str) -> ServerActivity:
    cursor = await conn.execute(
        q.PG_INSPECT_LOCKS, {"classes": list(_STORE_LOCKS), "prefix": prefix}
    )
    rows = await cursor.fetchall()
    names: dict[int, str | None] = {}
    if any(row[0] == 2 and row[1] == q.LOCK_NAMESPACE for row in rows):
        known = await (await conn.execute(q.PG_INSPECT_KNOWN_NAMESPACES)).fetchall()
        for (namespace,) in known:
            lock = namespace_lock(namespace)
            # Two namespaces sharing a lock: the lock does not tell which one it is.
            names[lock] = None if lock in names else namespace
    locks = [_advisory_lock(row, names) for row in rows]
    groups = await (await conn.execute(q.PG_INSPECT_CONNECTIONS)).fetchall()
    server = await (await conn.execute(q.PG_INSPECT_SERVER_CONNECTIONS)).fetchone()
    assert server is not None
    return ServerActivity(
        held=tuple(lock for lock in locks if lock.waiting_seconds is None),
        waiting=tuple(lock for lock in locks if lock.waiting_seconds is not None),
        connections=tuple(ConnectionGroup(*group) for group in groups),
        server_connections=int(server[0]),
        max_connections=int(server[1]),
        key_lock_prefix=prefix,
    )


def _signed(unsigned: int, bits: int) -> int:
    return unsigned - (1 << bits) if unsigned >= 1 << (bits - 1) else unsigned


def _advisory_lock(row: Sequence[Any], names: dict[int, str | None]) -> AdvisoryLock:
    objsubid, classid, objid, mode, granted, pid, app, state, client, seconds, blockers = row
    namespace = None
    if objsubid == 1:
        # A one-bigint lock: pg_locks splits the id into its high and low 32 bits.
        kind: Literal["key", "namespace", "global", "schema"] = "key"
        lock = _signed((classid << 32) | objid, 64)
    else:
        kind = _STORE_LOCKS[classid]
        lock = _signed(objid, 32)
        if kind == "namespace":
            namespace = names.get(lock)
    return AdvisoryLock(
        kind=kind,
        lock=lock,
        namespace=namespace,
        mode="exclusive" if mode == "ExclusiveLock" else "shared",
        pid=pid,
        application_name=app,
        state=state,
        client_addr=client,
        waiting_seconds=None if granted else max(0.0, seconds or 0.0),
        blocked_by=tuple(blockers or ()),
    )


def _report(
    target: _Target,
    *,
    version: int,
    now_ms: int,
    totals: Sequence[Any],
    spaces: Sequence[Sequence[Any]],
    marks: Sequence[Sequence[Any]],
    activity: ServerActivity | None,
) -> CacheReport:
    (
        entries,
        value_bytes,
        namespaces,
        oldest,
        newest,
        without_expiry,
        fresh_until,
        stale,
        dead,
        errors,
        storage,
        server_version,
    ) = totals
    return CacheReport(
        target=target.where,
        backend=target.backend,
        server_version=str(server_version),
        schema_version=version,
        now_ms=now_ms,
        entries=int(entries),
        value_bytes=int(value_bytes),
        storage_bytes=int(storage),
        namespaces=int(namespaces),
        top_namespaces=tuple(
            NamespaceUsage(str(ns), int(n), int(size), int(st), int(dd))
            for ns, n, size, st, dd in spaces
        ),
        oldest_created_at_ms=None if oldest is None else int(oldest),
        newest_created_at_ms=None if newest is None else int(newest),
        without_expiry=int(without_expiry),
        fresh=int(without_expiry) + int(fresh_until),
        stale=int(stale),
        dead=int(dead),
        errors=int(errors),
        marks=tuple(
            MarkUsage(_MARK_KINDS[kind], int(n), max(0.0, oldest_age), max(0.0, newest_age))
            for kind, n, oldest_age, newest_age in marks
        ),
        activity=activity,
    )


# -------------------------------------------------------------------------- sqlite


def _sqlite_read_only(target: _Target) -> sqlite3.Connection:
    """The file opened read-only (never created); raises SchemaMissingError if absent."""
    path = Path(target.url)
    if not path.is_file():
        raise SchemaMissingError(
            target.where, 0, q.SCHEMA_VERSION, detail="does not exist (no fleetcache schema)"
        )
    try:
        return sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0, isolation_level=None
        )
    except sqlite3.Error as exc:
        raise StoreError(f"opening {target.where} read-only failed: {exc}") from exc


def _sqlite_schema_version(conn: sqlite3.Connection, where: str) -> int:
    if not conn.execute(q.SQLITE_HAS_SCHEMA_TABLE).fetchone()[0]:
        raise SchemaMissingError(where, 0, q.SCHEMA_VERSION)
    row = conn.execute(q.SQLITE_GET_SCHEMA_VERSION).fetchone()
    if row is None:
        raise StoreError(f"{where}: fleetcache_schema exists but holds no version")
    return int(row[0])


def _inspect_sqlite(target: _Target, top: int, now_s: float) -> CacheReport:
    now_ms = int(now_s * 1000)
    conn = _sqlite_read_only(target)
    try:
        # One read transaction: every statement below sees the same state of the file.
        conn.execute("BEGIN")
        version = _sqlite_schema_version(conn, target.where)
        _check_version(target.where, version)
        params = {"now": now_ms, "top": top, "now_s": now_s}
        totals = conn.execute(q.SQLITE_INSPECT_TOTALS, params).fetchone()
        spaces = conn.execute(q.SQLITE_INSPECT_NAMESPACES, params).fetchall()
        marks = conn.execute(q.SQLITE_INSPECT_MARKS, params).fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"inspecting {target.where} failed: {exc}") from exc
    finally:
        conn.close()
    return _report(
        target,
        version=version,
        now_ms=now_ms,
        totals=totals,
        spaces=spaces,
        marks=marks,
        activity=None,
    )


# --------------------------------------------------------------------------- purge


async def _check_schema(target: _Target) -> None:
    """Raise unless the database holds this release's schema (reading only)."""
    if target.backend == "sqlite":

        def check() -> None:
            conn = _sqlite_read_only(target)
            try:
                _check_version(target.where, _sqlite_schema_version(conn, target.where))
            except sqlite3.Error as exc:
                raise StoreError(f"reading the schema of {target.where} failed: {exc}") from exc
            finally:
                conn.close()

        await asyncio.to_thread(check)
        return
    conn = await _pg_read_only(target.url)
    try:
        with _pg.translate(f"reading the schema of {target.where}"):
            async with conn.transaction(force_rollback=True):
                _check_version(target.where, await _pg_schema_version(conn, target.where))
    finally:
        await conn.close()


async def purge(
    url: str,
    *,
    margin: float = PURGE_MARGIN,
    batch: int = PURGE_BATCH,
    now: float | None = None,
) -> Purged:
    """Delete now every entry of the cache at ``url`` whose stale window ended more than
    ``margin`` seconds before ``now`` (default: this clock), in batches of ``batch``, and
    say how many went. Live entries (fresh, or stale inside their window) are never
    touched, and neither is anything else: it is not an invalidation.

    The schema must be this release's (it is checked first, reading only; nothing is
    created or migrated). Raises as :func:`inspect` does.
    """
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigurationError(f"margin must be a finite number of seconds >= 0, got {margin}")
    if batch < 1:
        raise ConfigurationError(f"batch must be >= 1, got {batch}")
    target = _target(url)
    await _check_schema(target)
    before_ms = int((time.time() if now is None else now) * 1000) - round(margin * 1000)
    store: PostgresStore | SqliteStore
    if target.backend == "postgres":
        store = PostgresStore(target.url, max_size=1, application_name="fleetcache-purge")
    else:
        store = SqliteStore(target.url)
    await store.open()
    purged = 0
    try:
        # Until a batch finds nothing: on Postgres a batch skips rows another transaction
        # holds, so a short batch does not mean the end.
        while deleted := await store.purge_expired(before_ms, batch):
            purged += deleted
    finally:
        await store.close()
    return Purged(target.where, purged, before_ms)
