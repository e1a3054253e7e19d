"""The sqlite store: the embedded default; one file, WAL mode, shareable by the processes
of one machine. Writes and invalidations run under ``BEGIN IMMEDIATE`` (the file's one
write lock), reads take no lock; the closure and pruning arguments are in
``docs/design.md``."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleetcache._json import compact
from fleetcache.errors import (
    ConfigurationError,
    InvalidInputError,
    NotOpenError,
    StoreError,
)
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
from fleetcache.stores.migrations import migrate_sqlite
from fleetcache.stores.validation import (
    check_name,
    encode_entry,
    names_to_invalidate,
    stamped_names,
    validate_key,
)

logger = get_logger("fleetcache.stores")

T = TypeVar("T")

#: How much of the file sqlite maps into memory (bytes): reads of a warm cache copy nothing.
MMAP_SIZE = 256 * 1024 * 1024

#: The most old marks one invalidation prunes, besides twice the marks it sets.
PRUNE_BATCH = 10_000

#: How many writes on the calling thread between two checkpoints on the worker thread
#: (those connections never checkpoint themselves; a write adds about 5 pages to the WAL,
#: so the WAL stays near sqlite's own threshold of 1000 pages).
CHECKPOINT_EVERY = 200


@dataclass(frozen=True, slots=True)
class SqlitePoint:
    """What a sqlite stamp holds: the invalidation clock's reading and the time then."""

    seq: int
    taken_at: float


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _entry(key: Key, row: Sequence[Any], values: ValueCodec) -> Entry:
    name, value, codec, deps, error, created_at, alias, diagnostics, expires, stale, compute = row
    if name != key.name:
        key = key.with_name(name)
    return Entry(
        key=key,
        value=values.decode(key, codec, value),
        deps=tuple(json.loads(deps)),
        error=_loads(error),
        created_at=created_at,
        alias=alias,
        diagnostics=_loads(diagnostics),
        expires_at=expires,
        stale_until=stale,
        compute_ms=compute,
    )


def _key_params(key: Key) -> dict[str, Any]:
    return {"ns": key.namespace, "name": key.name, "scope": key.scope, "user": key.user}


class SqliteStore:
    """A :class:`~fleetcache.stores.base.Store` in a sqlite file.

    ``busy_timeout`` (seconds) is how long a write waits for another process's transaction;
    ``mark_retention`` (seconds) must be the same in every process sharing the file.
    ``values``: how values are encoded (see :class:`~fleetcache.stores.codecs.ValueCodec`;
    JSON by default).

    Where the statements run: the event loop never waits for a lock. ``read_on_loop``:
    :meth:`read` and :meth:`stamp_and_read` run on the calling thread (the event loop's);
    ``write_on_loop``: :meth:`write` too. They use that thread's own connection, which has
    no busy timeout: in WAL mode a read takes no lock and waits for no writer, and a
    write's ``BEGIN IMMEDIATE`` either gets the file's write lock at once or fails at once
    (another connection holds it), and then the statement goes to the store's worker
    thread, which waits up to ``busy_timeout``. What the loop runs is thus bounded by the
    statements themselves: one-row indexed reads, and a write's few indexed statements on
    its key's rows and a commit that appends to the WAL without syncing it
    (``synchronous=NORMAL``) and never checkpoints (the worker does, every
    :data:`CHECKPOINT_EVERY` such writes). Invalidations, clears, purges and evictions
    (whose size has no bound) run on the worker thread. A read or a write on the loop
    costs less than the hop to a thread and back that it saves.

    ``max_entries``/``max_bytes`` (value bytes as encoded) bound the file: a write that
    finds it over a bound (the counts are kept by triggers, read in the write's own
    transaction) evicts, right after its commit and in a transaction of its own, the least
    recently written entries and their dependents until it is 5% under.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 30.0,
        mark_retention: float = MARK_RETENTION,
        values: ValueCodec = JSON_VALUES,
        read_on_loop: bool = True,
        write_on_loop: bool = True,
        max_entries: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if mark_retention <= 0:
            raise ConfigurationError(f"mark_retention must be positive, got {mark_retention}")
        self.values = values
        self.bounds = Bounds(max_entries, max_bytes)
        self._path = str(path)
        self._read_on_loop = read_on_loop
        self._write_on_loop = write_on_loop
        self._busy_timeout = busy_timeout
        self._retention = float(mark_retention)
        self._max_age = self._retention / 2
        # Touched only on the worker thread (opened there, used there, closed there).
        self._conn: sqlite3.Connection | None = None
        # Set and cleared by open() and close() on the event loop.
        self._executor: ThreadPoolExecutor | None = None
        # Statements on the calling thread: per thread, a read-only connection for
        # read_here ("reader") and a connection with no busy timeout for the async methods
        # ("nowait"), in _local; every one is also in _connections with its thread
        # (appended by that thread, pruned of ended threads' by the next one made, emptied
        # by close(); all under _connections_lock), so that close() closes them all and
        # ended threads leak none.
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._connections_lock = threading.Lock()
        # Writes committed on "nowait" connections, which never checkpoint: every
        # CHECKPOINT_EVERY-th one hands a checkpoint to the worker. Counted on the event
        # loop's thread; a lost increment would only delay a checkpoint.
        self._writes_here = 0

    @property
    def path(self) -> str:
        """The database file's path."""
        return self._path

    @property
    def mark_retention(self) -> float:
        """How long (seconds) marks are kept."""
        return self._retention

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor = self._executor
        if executor is None:
            raise NotOpenError("SqliteStore is not open: call await store.open() first")
        return await asyncio.get_running_loop().run_in_executor(executor, self._call, what, fn)

    def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        # On the worker thread. Whatever fn raises, no transaction survives it.
        conn = self._conn
        assert conn is not None
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            _rollback(conn)
            raise StoreError(f"{what} in sqlite file {self._path!r} failed: {exc}") from exc
        except BaseException:
            _rollback(conn)
            raise

    async def open(self) -> None:
        """Open the file (creating it if needed) in WAL mode and create or upgrade the
        schema. Idempotent."""
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetcache-sqlite")
        self._executor = executor
        where = f"sqlite file {self._path!r}"

        def connect() -> None:
            try:
                conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout,
                    isolation_level=None,
                )
            except sqlite3.Error as exc:
                raise StoreError(f"opening {where} failed: {exc}") from exc
            self._conn = conn
            try:
                _enable_wal(conn, self._busy_timeout)
                _tune(conn)
                migrate_sqlite(conn, where)
            except sqlite3.Error as exc:
                raise StoreError(f"opening {where} failed: {exc}") from exc

        try:
            await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the file and stop the worker thread. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def disconnect() -> None:
            if self._conn is not None:
                _rollback(self._conn)
                self._conn.close()
                self._conn = None

        try:
            await asyncio.get_running_loop().run_in_executor(executor, disconnect)
        finally:
            executor.shutdown(wait=True)
            with self._connections_lock:
                connections, self._connections = self._connections, []
                self._local = threading.local()
            for _, conn in connections:
                conn.close()

    def read_here(self, key: Key, by_alias: bool = False) -> Entry | None:
        """:meth:`read` on the calling thread, with that thread's own read-only connection
        (made on its first read): a hit without a thread hop. In WAL mode a read takes no
        lock and waits for no writer (this one waits up to ``busy_timeout`` in the rare
        moments it must: another process opening a new file, or recovering a crashed
        writer's WAL)."""
        validate_key(key)
        query = q.SQLITE_READ_BY_ALIAS if by_alias else q.SQLITE_READ
        params = _key_params(key)
        conn: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if conn is None:
            conn = self._connect_here("reader")
        try:
            row = conn.execute(query, params).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(
                f"reading {key.coalesce_key} in sqlite file {self._path!r} failed: {exc}"
            ) from exc
        return None if row is None else _entry(key, row, self.values)

    async def _nowait_first(
        self,
        verb: str,
        key: Key,
        fn: Callable[[sqlite3.Connection], T],
        *,
        write: bool = False,
    ) -> T:
        """``fn`` (in a ``BEGIN IMMEDIATE`` transaction if ``write``; it commits) on the
        calling thread's "nowait" connection; on the worker thread, which waits for locks,
        when sqlite answers "busy" (nothing was done then: a busy statement does nothing,
        and a transaction that met one is rolled back)."""
        conn: sqlite3.Connection | None = getattr(self._local, "nowait", None)
        if conn is None:
            conn = self._connect_here("nowait")
        try:
            if write:
                conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
        except sqlite3.Error as exc:
            _rollback(conn)
            if not (isinstance(exc, sqlite3.OperationalError) and _busy(exc)):
                raise StoreError(
                    f"{verb} {key.coalesce_key} in sqlite file {self._path!r} failed: {exc}"
                ) from exc
        except BaseException:
            _rollback(conn)
            raise
        else:
            if write:
                self._writes_here += 1
                if self._writes_here % CHECKPOINT_EVERY == 0 and self._executor is not None:
                    self._executor.submit(self._checkpoint)
            return result
        return await self._run(f"{verb} {key.coalesce_key}", _immediate(fn) if write else fn)

    def _checkpoint(self) -> None:
        """On the worker thread: copy the WAL's committed pages into the file, waiting for
        no reader or writer (``PASSIVE``), so that the WAL stays small."""
        try:
            self._call("checkpointing", lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)"))
        except StoreError as exc:
            logger.warning("%s", exc)

    def _connect_here(self, kind: str) -> sqlite3.Connection:
        """This thread's ``reader`` (read-only, busy timeout) or ``nowait`` (no busy
        timeout, no checkpoints) connection, made now."""
        if self._executor is None:
            raise NotOpenError("SqliteStore is not open: call await store.open() first")
        reader = kind == "reader"
        try:
            # check_same_thread=False only so that close() may close it from its thread.
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout if reader else 0,
                isolation_level=None,
                check_same_thread=False,
            )
            _tune(conn)
            conn.execute("PRAGMA query_only=ON" if reader else "PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error as exc:
            raise StoreError(
                f"opening a connection to sqlite file {self._path!r} failed: {exc}"
            ) from exc
        with self._connections_lock:
            ended = [c for thread, c in self._connections if not thread.is_alive()]
            self._connections = [(t, c) for t, c in self._connections if t.is_alive()]
            self._connections.append((threading.current_thread(), conn))
            local = self._local
        for c in ended:
            c.close()
        setattr(local, kind, conn)
        return conn

    # ------------------------------------------------------------------------- reads

    async def read(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """The entry under ``key``, else (with ``by_alias``) the most recently created one
        aliased ``key.name`` in the key's namespace, scope and user. One statement, no
        lock."""
        validate_key(key)
        query = q.SQLITE_READ_BY_ALIAS if by_alias else q.SQLITE_READ
        params = _key_params(key)

        def read(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(query, params).fetchone()
            return None if row is None else _entry(key, row, self.values)

        if self._read_on_loop:
            return await self._nowait_first("reading", key, read)
        return await self._run(f"reading {key.coalesce_key}", read)

    async def stamp_and_read(
        self, key: Key, names: Sequence[str], *, by_alias: bool = False
    ) -> tuple[GenerationStamp, Entry | None]:
        """The clock's reading and ``read(key, by_alias=...)`` in one statement."""
        stamped = stamped_names(key, names)
        query = q.SQLITE_STAMP_AND_READ_BY_ALIAS if by_alias else q.SQLITE_STAMP_AND_READ
        params = _key_params(key)

        def stamp_and_read(conn: sqlite3.Connection) -> tuple[GenerationStamp, Entry | None]:
            # The time first: the stamp is then no younger than the clock reading it holds.
            taken_at = time.time()
            row = conn.execute(query, params).fetchone()
            stamp = GenerationStamp(key.namespace, stamped, SqlitePoint(int(row[0]), taken_at))
            return stamp, (None if row[1] is None else _entry(key, row[1:], self.values))

        if self._read_on_loop:
            return await self._nowait_first("stamping and reading", key, stamp_and_read)
        return await self._run(f"stamping and reading {key.coalesce_key}", stamp_and_read)

    # ------------------------------------------------------------------------ writes

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        notify: tuple[str, str] | None = None,
    ) -> bool:
        """Upsert ``entry``; with ``stamp``, only if nothing it depends on was invalidated
        since (under ``BEGIN IMMEDIATE``)."""
        encoded = encode_entry(entry, self.values)
        key = entry.key
        params = _key_params(key)
        params.update(encoded.columns())
        params["deps"] = compact(encoded.deps)
        query = q.SQLITE_WRITE
        taken_at = 0.0
        if stamp is not None:
            point = _check_stamp(stamp, key)
            query = q.SQLITE_GUARDED_WRITE
            taken_at = point.taken_at
            params.update(
                names=compact(guarded_names(entry, stamp)),
                point=point.seq,
            )

        bounds = self.bounds

        def write(conn: sqlite3.Connection) -> tuple[bool, bool]:
            # Inside BEGIN IMMEDIATE; (written, over a bound).
            if stamp is not None and time.time() - taken_at > self._max_age:
                conn.execute("ROLLBACK")
                return False, False
            written = conn.execute(query, params).rowcount > 0
            if written:
                conn.execute(q.SQLITE_FORGET_DEPS, params)
                if encoded.deps:
                    conn.execute(q.SQLITE_LIST_DEPS, params)
            over = False
            if written and bounds.bounded:
                entries, nbytes = conn.execute(q.SQLITE_TABLE_SIZE).fetchone()
                over = bounds.over(entries, nbytes)
            conn.execute("COMMIT")
            return written, over

        if self._write_on_loop:
            outcome = await self._nowait_first("writing", key, write, write=True)
        else:
            outcome = await self._run(f"writing {key.coalesce_key}", _immediate(write))
        written, over = outcome
        if over:
            # After the commit: the write stands whatever the eviction meets (a failed
            # eviction is logged; the next write over the bound tries again).
            try:
                await self.evict()
            except StoreError as exc:
                logger.warning("%s", exc)
        return written

    async def table_size(self) -> tuple[int, int]:
        """The entries and value bytes the file holds now (from the counts, no scan)."""

        def size(conn: sqlite3.Connection) -> tuple[int, int]:
            entries, nbytes = conn.execute(q.SQLITE_TABLE_SIZE).fetchone()
            return int(entries), int(nbytes)

        return await self._run("reading the table's size", size)

    async def evict(self) -> int:
        """Evict while the file is over a bound (see the class); return how many entries
        went. Writes call this themselves; it is here for tests and maintenance."""
        bounds = self.bounds
        return await self._run("evicting entries", lambda conn: _evict(conn, bounds))

    async def purge_expired(self, before_ms: int, limit: int = 1000) -> int:
        """Delete up to ``limit`` entries whose stale window ended before ``before_ms``
        (ms since the epoch); return how many went. Not an invalidation: nothing is marked."""

        def purge(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(q.SQLITE_EXPIRED, {"before": before_ms, "limit": limit}).fetchall()
            keys = [
                {"ns": ns, "name": name, "scope": scope, "user": user}
                for ns, name, scope, user in rows
            ]
            for statement in q.SQLITE_DELETE_KEY:
                conn.executemany(statement, keys)
            conn.execute("COMMIT")
            return len(keys)

        return await self._run("purging expired entries", purge)

    # ----------------------------------------------------------------- invalidations

    async def invalidate(
        self, namespace: str, names: Sequence[str], *, expand: Expand | None = None
    ) -> list[str]:
        """Invalidate ``names`` and every entry depending on them, in one ``BEGIN
        IMMEDIATE`` transaction (docs/design.md, "The invalidation closure")."""
        given = names_to_invalidate(namespace, names, expand)
        if not given:
            return []

        def invalidate(conn: sqlite3.Connection) -> list[str]:
            conn.execute("BEGIN IMMEDIATE")
            closure = Closure(given, expand)
            frontier = list(closure.names)
            while frontier:
                rows = conn.execute(
                    q.SQLITE_CLOSURE_ROUND,
                    {"ns": namespace, "names": compact(frontier)},
                ).fetchall()
                frontier = closure.add(field for row in rows for field in row)
            all_names = compact(closure.names)
            params = {"ns": namespace, "names": all_names}
            for statement in q.SQLITE_DELETE_NAMES:
                conn.execute(statement, params)
            self._mark_and_prune(conn, "k", namespace, all_names, len(closure.names))
            conn.execute("COMMIT")
            return closure.names

        return await self._run(f"invalidating names in namespace {namespace!r}", invalidate)

    async def clear_namespace(self, namespace: str) -> None:
        """Mark the namespace invalidated and delete its entries, in one transaction."""
        check_name("the namespace to clear", namespace, allow_empty=False)

        def clear(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            for statement in q.SQLITE_DELETE_NAMESPACE:
                conn.execute(statement, {"ns": namespace})
            self._mark_and_prune(conn, "n", namespace, '[""]', 1)
            conn.execute("COMMIT")

        await self._run(f"clearing namespace {namespace!r}", clear)

    async def clear_all(self) -> None:
        """Mark the whole store invalidated and delete every entry, in one transaction."""

        def clear(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            for statement in q.SQLITE_DELETE_ALL:
                conn.execute(statement)
            self._mark_and_prune(conn, "g", "", '[""]', 1)
            conn.execute("COMMIT")

        await self._run("clearing the whole cache", clear)

    def _mark_and_prune(
        self, conn: sqlite3.Connection, kind: str, namespace: str, names: str, count: int
    ) -> None:
        # The last statements before COMMIT, so a mark's time is its commit's, give or take
        # microseconds (docs/design.md, on pruning marks).
        now = time.time()
        conn.execute(
            q.SQLITE_PRUNE_MARKS,
            {"cutoff": now - self._retention, "limit": PRUNE_BATCH + 2 * count},
        )
        conn.execute(q.SQLITE_TICK)
        conn.execute(q.SQLITE_MARK, {"kind": kind, "ns": namespace, "names": names, "now": now})


def _check_stamp(stamp: GenerationStamp, key: Key) -> SqlitePoint:
    if stamp.namespace != key.namespace:
        raise InvalidInputError(
            f"a stamp of namespace {stamp.namespace!r} cannot guard a write of {key.coalesce_key}"
        )
    if not isinstance(stamp.point, SqlitePoint):
        raise InvalidInputError(f"the stamp for {key.coalesce_key} was not made by a sqlite store")
    return stamp.point


def _immediate(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """``fn`` in a ``BEGIN IMMEDIATE`` transaction (which ``fn`` ends)."""

    def immediate(conn: sqlite3.Connection) -> T:
        conn.execute("BEGIN IMMEDIATE")
        return fn(conn)

    return immediate


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether sqlite answered "busy" (another connection holds a lock this one needs)."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode (once per file; a no-op after). Switching needs the file to
    itself, and sqlite answers "database is locked" at once, without its busy handler, while
    another process opening it at the same moment holds a lock: retried for ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _tune(conn: sqlite3.Connection) -> None:
    """The pragmas a cache wants on every connection (journal_mode=WAL is the file's, set
    once): commits made durable at checkpoints rather than at each commit (a power loss
    may lose the last commits, never corrupt the file: a cache can recompute), and the
    file mapped into memory so that a warm read copies no page."""
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA mmap_size={MMAP_SIZE}")


def _evict(conn: sqlite3.Connection, bounds: Bounds) -> int:
    # Batch by batch, each its own BEGIN IMMEDIATE transaction (the file's write lock is
    # held for one batch at a time), until under the bounds; a delete, never a mark.
    evicted = 0
    while bounds.bounded:
        conn.execute("BEGIN IMMEDIATE")
        entries, nbytes = conn.execute(q.SQLITE_TABLE_SIZE).fetchone()
        want = bounds.excess(entries, nbytes)
        if want == 0:
            conn.execute("COMMIT")
            return evicted
        keys = [
            {"ns": ns, "name": name, "scope": scope, "user": user}
            for ns, name, scope, user in conn.execute(q.SQLITE_EVICTION, {"limit": want})
        ]
        for statement in q.SQLITE_DELETE_KEY:
            conn.executemany(statement, keys)
        conn.execute("COMMIT")
        if not keys:
            return evicted
        evicted += len(keys)
    return evicted


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.rollback()
