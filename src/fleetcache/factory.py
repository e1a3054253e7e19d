"""The front door: ``fleetcache.open(url)`` builds and starts what a URL needs (a store, and
on Postgres the LISTEN hub, the coordinator, the invalidation broadcast and its listener),
and returns a :class:`Fleetcache`; ``close()`` stops it all in the reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from fleetcache import _pg
from fleetcache.coordination.filelock import FileLockCoordinator, file_locks_supported
from fleetcache.coordination.postgres import (
    LOCK_IDLE_TIMEOUT,
    POPULATED_CHANNEL,
    PostgresCoordinator,
)
from fleetcache.errors import ConfigurationError, DatabaseConnectError
from fleetcache.logcontext import get_logger
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.codec import Codec
from fleetcache.lookup.decorator import CachedFunction, cached
from fleetcache.lookup.expiry import DEFAULT, Expiry, Setting
from fleetcache.lookup.near import NearCache
from fleetcache.lookup.options import (
    DEFAULT_COMPUTE_TIMEOUT,
    DEFAULT_ERROR_TTL,
    DEFAULT_MAX_ROUNDS,
    DEFAULT_WAIT_TIMEOUT,
    LookupOptions,
)
from fleetcache.lookup.populate import Produce
from fleetcache.notifications.hub import NotificationHub, SessionCheck
from fleetcache.notifications.listener import InvalidationListener
from fleetcache.stores.base import Entry, Expand, Key, Store
from fleetcache.stores.bounds import Bounds
from fleetcache.stores.codecs import JSON_VALUES, ValueCodec
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.payloads import INVALIDATED_CHANNEL
from fleetcache.stores.postgres import POOL_MIN_SIZE, POOL_SIZE, PostgresStore
from fleetcache.stores.sqlite import SqliteStore

logger = get_logger("fleetcache.factory")

P = ParamSpec("P")
R = TypeVar("R")

#: How long ``close()`` gives each component by default (seconds).
DEFAULT_CLOSE_TIMEOUT = 10.0

_ignored_logged = False


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a Postgres database (a URL or a libpq key=value string)."""
    return url.startswith(("postgresql://", "postgres://")) or ("://" not in url and "=" in url)


def store_for_url(
    url: str,
    *,
    pool_size: int = POOL_SIZE,
    pool_min_size: int = POOL_MIN_SIZE,
    connect_budget: float = _pg.CONNECT_BUDGET,
    values: ValueCodec = JSON_VALUES,
    invalidated_channel: str = INVALIDATED_CHANNEL,
    prepared_statements: bool = True,
    max_entries: int | None = None,
    max_bytes: int | None = None,
    unlogged: bool = False,
) -> Store:
    """An unopened store for ``url``, encoding values with ``values`` (a Postgres one
    announces its invalidations on ``invalidated_channel``), bounded by ``max_entries``
    and ``max_bytes`` (None: unbounded)."""
    if url == "memory://":
        return MemoryStore(values=values, max_entries=max_entries, max_bytes=max_bytes)
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://").removeprefix("/")
        if not path:
            raise ConfigurationError(f"a sqlite URL needs a path, like sqlite:///cache.db: {url!r}")
        return SqliteStore(Path(path), values=values, max_entries=max_entries, max_bytes=max_bytes)
    if is_postgres_url(url):
        return PostgresStore(
            url,
            max_size=pool_size,
            min_size=pool_min_size,
            connect_budget=connect_budget,
            values=values,
            invalidated_channel=invalidated_channel,
            prepared_statements=prepared_statements,
            max_entries=max_entries,
            max_bytes=max_bytes,
            unlogged=unlogged,
        )
    raise ConfigurationError(
        f"unsupported cache URL {url!r}: use memory://, sqlite:///path or postgresql://..."
    )


class Fleetcache:
    """An open cache, made by :func:`open`: its verbs (``get``, ``get_value``, ``peek``,
    ``set``, ``delete``, ``invalidate``, ``clear_namespace``, ``clear_all``, ``cached``),
    ``stats()`` and ``close()``, and the parts ``open`` built (``store``, ``lookup``, and
    on Postgres ``hub``, ``coordinator``, ``listener``). Every verb is the
    :class:`~fleetcache.lookup.caching.CachingLookup`'s (``cache.lookup``), whose
    documentation has the details. Closed by ``close()`` or ``async with``."""

    def __init__(
        self,
        url: str,
        store: Store,
        lookup: CachingLookup[Any],
        *,
        hub: NotificationHub | None = None,
        coordinator: PostgresCoordinator | FileLockCoordinator | None = None,
        listener: InvalidationListener | None = None,
        closers: Sequence[tuple[str, Callable[[float], Awaitable[None]]]] = (),
    ) -> None:
        self.url = url
        self.store = store
        self.lookup = lookup
        self.hub = hub
        self.coordinator = coordinator
        self.listener = listener
        # What close() runs, in order (the reverse of the start order).
        self._closers = list(closers)
        self._closed = False

    async def get(
        self,
        key: Key,
        produce: Produce[Any],
        *,
        candidates: Sequence[str] | None = None,
        alias: str | None = None,
        persist_errors: bool = True,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Entry | None:
        """The entry for ``key``, computing it with ``produce(candidate_key)`` on a miss
        (once across the fleet on Postgres); None when every candidate is missing.

        ``candidates``: the names to try in order (default: the key's own); ``alias``:
        another name the entry answers to; ``persist_errors=False``: a produced error is
        neither stored nor returned. ``ttl``, ``stale_ttl`` and ``early_refresh`` override
        the cache's expiry for this call. See :meth:`CachingLookup.get`."""
        return await self.lookup.get(
            key,
            produce,
            candidates=candidates,
            alias=alias,
            persist_errors=persist_errors,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )

    async def get_value(
        self,
        key: Key,
        produce: Produce[Any],
        *,
        candidates: Sequence[str] | None = None,
        alias: str | None = None,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Any:
        """The value for ``key`` (computed on a miss, as :meth:`get`), None when it is
        missing; raises :class:`~fleetcache.errors.CachedError` carrying the error
        document when the entry is an error."""
        return await self.lookup.get_value(
            key,
            produce,
            candidates=candidates,
            alias=alias,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )

    async def peek(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """The stored entry for ``key`` (or, with ``by_alias``, the one aliased by its
        name), never computing; an expired error entry and a dead value count as absent."""
        return await self.lookup.peek(key, by_alias=by_alias)

    async def set(
        self,
        key: Key,
        value: Any,
        *,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        deps: Sequence[str] = (),
        alias: str | None = None,
    ) -> list[str]:
        """Store ``value`` under ``key`` now, as if just computed; a computation of it that
        began before cannot overwrite it. Returns the names invalidated first (the key and
        its dependents). See :meth:`CachingLookup.set`."""
        return await self.lookup.set(
            key, value, ttl=ttl, stale_ttl=stale_ttl, deps=deps, alias=alias
        )

    async def delete(self, key: Key, *, conn: Any = None) -> list[str]:
        """Invalidate ``key``'s name in its namespace (see :meth:`invalidate`)."""
        return await self.lookup.delete(key, conn=conn)

    async def invalidate(
        self,
        namespace: str,
        names: Sequence[str],
        *,
        expand: Expand | None = None,
        conn: Any = None,
    ) -> list[str]:
        """Invalidate ``names`` of ``namespace`` and, transitively, every entry depending
        on them, in every process; return all the names invalidated. ``expand`` gives
        every name an entry may be stored or depended on under. ``conn`` (Postgres): your
        psycopg ``AsyncConnection`` inside its open transaction, so the invalidation
        commits (or rolls back) with your change. See :meth:`CachingLookup.invalidate`."""
        return await self.lookup.invalidate(namespace, names, expand=expand, conn=conn)

    async def clear_namespace(self, namespace: str, *, conn: Any = None) -> None:
        """Delete every entry of ``namespace``; computations under way there store nothing.
        ``conn``: in your open transaction, as :meth:`invalidate`."""
        await self.lookup.clear_namespace(namespace, conn=conn)

    async def clear_all(self) -> None:
        """Delete every entry; no computation under way stores anything."""
        await self.lookup.clear_all()

    def cached(
        self,
        *,
        namespace: str | None = None,
        key: Callable[..., str] | None = None,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
        """A decorator caching an async function's results here, keyed by its arguments:
        ``@cache.cached(namespace="prices", ttl=60)``. The decorated function also has
        ``invalidate``, ``refresh`` and ``peek``; see
        :class:`~fleetcache.lookup.decorator.CachedFunction`."""
        return cached(
            self.lookup,
            namespace=namespace,
            key=key,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )

    def stats(self) -> dict[str, Any]:
        """The lookup's counters, the coordinator's and listener's when present, and on
        Postgres the connections this process holds right now (``connections``: the pool's
        size, in use, idle, bounds and waiting callers; the session's state; the sync API's
        ``read_pool``, counted as the pool)."""
        stats: dict[str, Any] = {"lookup": self.lookup.stats()}
        if self.coordinator is not None:
            stats["coordinator"] = self.coordinator.stats()
        if self.listener is not None:
            stats["listener"] = self.listener.stats()
        if isinstance(self.store, PostgresStore) and not self._closed:
            stats["connections"] = _connection_stats(self.store, self.hub)
        return stats

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Close everything in reverse start order: every part is closed even if another
        fails or hangs (each gets at most ``timeout`` seconds; a failure is logged and the
        first one raised at the end). Idempotent."""
        if self._closed:
            return
        self._closed = True
        first: BaseException | None = None
        for name, close in self._closers:
            try:
                await asyncio.wait_for(close(timeout), timeout)
            except TimeoutError:
                logger.error("closing the %s took more than %.1f s; left behind", name, timeout)
            except Exception as exc:  # logged; the other parts still close
                logger.error("closing the %s failed: %s", name, exc, exc_info=exc)
                first = first or exc
        if first is not None:
            raise first

    async def __aenter__(self) -> Fleetcache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Opening:
    """What :func:`open` returns: ``await`` it for a :class:`Fleetcache`, or use it as
    ``async with`` (closed on exit)."""

    def __init__(self, opener: Callable[[], Awaitable[Fleetcache]]) -> None:
        self._opener = opener
        self._cache: Fleetcache | None = None

    def __await__(self) -> Generator[Any, None, Fleetcache]:
        return self._opener().__await__()

    async def __aenter__(self) -> Fleetcache:
        self._cache = await self._opener()
        return self._cache

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._cache is not None:
            await self._cache.close()


def open(  # the front door, named as users expect (not in __all__, so * never shadows)
    url: str,
    *,
    coordinate: bool | None = None,
    near: int | None = None,
    near_max_bytes: int | None = None,
    codec: Codec[Any] | None = None,
    values: ValueCodec = JSON_VALUES,
    ttl: float | None = None,
    stale_ttl: float | None = None,
    early_refresh: float | None = None,
    error_ttl: float = DEFAULT_ERROR_TTL,
    compute_timeout: float = DEFAULT_COMPUTE_TIMEOUT,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    pool_size: int = POOL_SIZE,
    pool_min_size: int = POOL_MIN_SIZE,
    session_url: str | None = None,
    prepared_statements: bool | None = None,
    connect_budget: float = _pg.CONNECT_BUDGET,
    probe_interval: float = 1.0,
    lock_idle_timeout: float = LOCK_IDLE_TIMEOUT,
    populated_channel: str = POPULATED_CHANNEL,
    invalidated_channel: str = INVALIDATED_CHANNEL,
    max_entries: int | None = None,
    max_bytes: int | None = None,
    unlogged: bool = False,
) -> Opening:
    """Open a cache for ``url`` and start what it needs. Both forms work (one object that is
    awaitable and an async context manager)::

        async with fleetcache.open("postgresql://localhost/app") as cache:
            entry = await cache.get(Key(ns, name), produce)

        cache = await fleetcache.open("sqlite:///cache.db")
        try: ...
        finally: await cache.close()

    URLs: ``memory://``, ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``,
    ``postgresql://…`` (or ``postgres://…``, or any libpq ``key=value`` string). Every
    option is checked before anything is opened (:class:`~fleetcache.errors.ConfigurationError`).

    On Postgres it also starts the LISTEN hub, the invalidation broadcast and its listener
    and, by default, cross-process populate coordination (it costs nothing on a hit and one
    short statement on a miss). Start order: store, hub, coordinator, listener, lookup;
    ``close()`` runs the reverse, every step even if an earlier one fails, each bounded.
    Opening on Postgres is all or nothing: a process that cannot get every connection it
    starts with releases those it got before it tries again (within ``connect_budget``), so
    processes opening at once at the edge of ``max_connections`` do not starve one another.

    ``coordinate``: cross-process populate coordination (None: on for Postgres and, on
    Linux, for sqlite, whose processes on one machine take a lock file's byte locks beside
    the database; False: off; asking for it on memory is logged once and ignored). ``near``: keep up
    to that many entries in process memory and serve hits from there while this process
    hears the fleet's invalidations (``near_max_bytes`` bounds their size too); Postgres
    only, since only there invalidations are broadcast.
    ``ttl``/``stale_ttl``/``early_refresh``: how values age by default (see
    :class:`~fleetcache.lookup.expiry.Expiry`; None: they never expire). ``values``: how
    values are stored (:class:`~fleetcache.stores.codecs.ValueCodec`: JSON by default;
    pickle, for a trusted database only; compression above a size). ``codec``: typed values
    (:class:`~fleetcache.lookup.codec.Codec`). ``error_ttl``, ``compute_timeout``,
    ``wait_timeout`` and ``max_rounds``: the lookup's bounds
    (:class:`~fleetcache.lookup.options.LookupOptions`). Postgres's own: the pool
    (``pool_min_size`` connections made at open, growing on demand to ``pool_size``),
    ``session_url`` (where the process's one session connection goes — LISTEN and the
    fleet's locks —, default ``url``; give it when ``url`` is a transaction pooler such as
    PgBouncer, which a session is refused through), ``prepared_statements`` (server-side
    prepared statements on the pool; None: on, unless ``session_url`` differs from
    ``url``, i.e. the pool goes through a pooler), ``connect_budget`` (seconds transient
    connection failures are retried while opening), the crash-probe interval,
    ``lock_idle_timeout`` (seconds a frozen or partitioned winner keeps its keys locked,
    at most) and the channel names.

    ``max_entries``/``max_bytes``: bound the shared table (entries; value bytes as stored);
    past a bound the least recently written entries are evicted, with the entries that
    depend on them, in batches (an eviction is a delete: it is a miss, never a stale hit).
    ``unlogged=True`` (Postgres): the entries table becomes UNLOGGED (see
    :class:`~fleetcache.stores.postgres.PostgresStore`; emptied by a crash or a failover).
    """
    Bounds(max_entries, max_bytes)  # checked now, before anything is opened
    _check_seconds("connect_budget", connect_budget, 0.0, 3600.0)
    _check_seconds("lock_idle_timeout", lock_idle_timeout, 0.1, 86_400.0)
    session_target = url if session_url is None else session_url
    if session_url is not None and not (is_postgres_url(url) and is_postgres_url(session_url)):
        raise ConfigurationError(
            f"session_url is for a Postgres url (a direct connection beside a pooler), got "
            f"url={url.split('://', 1)[0]}://… and a session_url that is "
            f"{'' if is_postgres_url(session_url) else 'not '}a Postgres connection string"
        )
    prepared = session_target == url if prepared_statements is None else prepared_statements
    # Every lookup option checked now, before anything is opened.
    options = LookupOptions(
        expiry=Expiry(ttl, stale_ttl, early_refresh),
        error_ttl=error_ttl,
        compute_timeout=compute_timeout,
        wait_timeout=wait_timeout,
        max_rounds=max_rounds,
    )

    async def opener() -> Fleetcache:
        if not isinstance(values, ValueCodec):
            raise ConfigurationError(
                f"values must be a fleetcache.ValueCodec, not a {type(values).__name__}"
            )
        if not is_postgres_url(url):
            return await open_once(connect_budget)
        return await _all_or_nothing(url, open_once, connect_budget)

    async def open_once(budget: float) -> Fleetcache:
        store = store_for_url(
            url,
            pool_size=pool_size,
            pool_min_size=pool_min_size,
            connect_budget=budget,
            values=values,
            invalidated_channel=invalidated_channel,
            prepared_statements=prepared,
            max_entries=max_entries,
            max_bytes=max_bytes,
            unlogged=unlogged,
        )
        closers: list[tuple[str, Callable[[float], Awaitable[None]]]] = []
        try:
            await store.open()
            closers.append(("store", lambda _timeout: store.close()))
            if not isinstance(store, PostgresStore):
                _log_ignored(url, coordinate if isinstance(store, MemoryStore) else None, near)
                local = None
                if isinstance(store, SqliteStore) and _file_locks_wanted(coordinate):
                    # A lock file beside the database: one computation per key among the
                    # processes of this machine sharing the file.
                    local = FileLockCoordinator(f"{store.path}.locks")
                    closers.append(("coordinator", local.close))
                    await local.start()
                lookup: CachingLookup[Any] = CachingLookup(
                    store, options=options, codec=codec, coordinator=local
                )
                closers.append(("lookup", lookup.close))
                return Fleetcache(url, store, lookup, coordinator=local, closers=closers[::-1])
            hub = NotificationHub(
                session_target,
                [populated_channel, invalidated_channel],
                connect_budget=budget,
                session_check=_session_check(session_target, url, store),
            )
            # Closers go in before each start: a failed start may have connected a part.
            closers.append(("notification hub", hub.close))
            await hub.start()
            coordinator = None
            if coordinate is None or coordinate:
                coordinator = PostgresCoordinator(
                    store.pool,
                    hub,
                    channel=populated_channel,
                    probe_interval=probe_interval,
                    lock_idle_timeout=lock_idle_timeout,
                    reads=store,
                )
                closers.append(("coordinator", coordinator.close))
                await coordinator.start()
            near_tier = (
                None
                if near is None
                else NearCache(hub, max_entries=near, max_bytes=near_max_bytes, values=values)
            )
            # The store announces every invalidation in its own transaction (never lost
            # after a commit), carrying its origin, so the listener skips our
            # echoes; every announcement heard also wakes writes waiting for its lock.
            lookup = CachingLookup(
                store, options=options, coordinator=coordinator, codec=codec, near=near_tier
            )
            listener = InvalidationListener(
                hub,
                lookup,
                channel=invalidated_channel,
                origin=store.origin,
                on_heard=store.lock_released,
            )
            await listener.start()
            closers.append(("invalidation listener", listener.close))
            closers.append(("lookup", lookup.close))
            return Fleetcache(
                url,
                store,
                lookup,
                hub=hub,
                coordinator=coordinator,
                listener=listener,
                closers=closers[::-1],
            )
        except BaseException:
            for _, close in reversed(closers):
                with contextlib.suppress(Exception):
                    await close(DEFAULT_CLOSE_TIMEOUT)
            raise

    return Opening(opener)


def _session_check(session_url: str, url: str, store: PostgresStore) -> SessionCheck:
    """Refuses a session connection that goes through a transaction pooler (see
    :func:`fleetcache._pg.refuse_transaction_pooler`); the other client the check needs is
    a pooled connection, so it costs no connection of its own."""

    async def check(conn: Any) -> None:
        await _pg.refuse_transaction_pooler(
            conn, store.pool.connection, conninfo=session_url, same_address=session_url == url
        )

    return check


def _connection_stats(store: PostgresStore, hub: NotificationHub | None) -> dict[str, Any]:
    """What the process holds now: the pool's counts, the session (up or not), and the
    read pool's counts when the sync API opened one."""
    session: dict[str, Any] | None = None
    if hub is not None:
        session = {
            "up": hub.connected,
            "backend_pid": hub.backend_pid,
            "reconnects": hub.reconnects,
            "gaps": hub.gaps,
        }
    stats: dict[str, Any] = {"pool": store.connection_stats(), "session": session}
    read_pool = store.read_pool_stats()
    if read_pool is not None:
        stats["read_pool"] = read_pool
    return stats


def _check_seconds(name: str, value: object, low: float, high: float) -> None:
    """ConfigurationError unless ``value`` is a number of seconds from ``low`` to ``high``
    (NaN, infinity, a bool or a string are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be from {low:g} to {high:g} seconds, got {value!r}")


async def _all_or_nothing(
    url: str, open_once: Callable[[float], Awaitable[Fleetcache]], budget: float
) -> Fleetcache:
    """``open_once(0)`` (every connection tried once), again after a jittered pause while
    the failure is transient and ``budget`` seconds have not passed; each failed try has
    released every connection it got. The last failure is raised, naming its cause."""
    began = time.monotonic()
    delay = 0.05
    tries = 0
    while True:
        tries += 1
        try:
            return await open_once(0.0)
        except DatabaseConnectError as exc:
            spent = time.monotonic() - began
            if _pg.is_permanent(exc.cause) or spent + delay > budget:
                if tries == 1:
                    raise
                raise DatabaseConnectError(
                    f"{exc} (opening was tried {tries} times in {spent:.1f} s, releasing "
                    "every connection between tries)",
                    exc.cause,
                ) from exc
            logger.info(
                "opening %s failed (%s); released every connection, trying again",
                _pg.describe_target(url),
                exc.cause,
            )
        await asyncio.sleep(_pg.jittered(delay))
        delay = min(delay * 2, 1.0)


def _file_locks_wanted(coordinate: bool | None) -> bool:
    """Whether a sqlite cache coordinates its processes through file locks: by default
    where the platform has them; asked for where it has none, a ConfigurationError."""
    if coordinate is False:
        return False
    if file_locks_supported():
        return True
    if coordinate:
        raise ConfigurationError(
            "coordinate=True on sqlite needs open-file-description locks (Linux); this "
            "platform has none: processes sharing the file would each compute a key"
        )
    return False


def _log_ignored(url: str, coordinate: bool | None, near: int | None) -> None:
    """One log line per process for options that need Postgres."""
    global _ignored_logged  # noqa: PLW0603 - one log line per process, by design
    if (coordinate or near is not None) and not _ignored_logged:
        _ignored_logged = True
        logger.info(
            "the near tier (and, on memory://, coordination across processes) is ignored "
            "for %s: the near tier needs Postgres's broadcast of every invalidation to "
            "every process (sqlite coordinates its processes through file locks)",
            url.split("://", 1)[0],
        )
