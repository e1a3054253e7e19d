"""Wiring: build a store, hub, coordinator, publisher, listener and lookup from one URL.

::

    async with await fleetcache.open("postgresql://localhost/app") as cache:
        entry = await cache.lookup.get(Key(ns, name), produce)

URLs: ``memory://``, ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``,
``postgresql://…`` (or ``postgres://…``, or any libpq connection string).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from psycopg_pool import AsyncConnectionPool

from fleetcache.coordination.postgres import PostgresCoordinator
from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import (
    DEFAULT_ERROR_TTL,
    DEFAULT_MAX_ROUNDS,
    DEFAULT_WAIT_TIMEOUT,
    CachingLookup,
)
from fleetcache.notifications.broadcast import PostgresInvalidationPublisher
from fleetcache.notifications.hub import NotificationHub
from fleetcache.notifications.listener import InvalidationListener
from fleetcache.stores.base import Store
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore

logger = logging.getLogger("fleetcache.factory")

#: The environment flag that turns cross-process populate coordination on.
COALESCE_FLAG = "PRERENDER_COALESCE_ACROSS_PROCESSES"

_flag_ignored_logged = False


def coalesce_flag_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether ``PRERENDER_COALESCE_ACROSS_PROCESSES`` is set to true (default off)."""
    value = (environ if environ is not None else os.environ).get(COALESCE_FLAG, "")
    return value.strip().lower() in {"true", "1", "yes", "on"}


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a Postgres database (a URL or a libpq key=value string)."""
    return url.startswith(("postgresql://", "postgres://")) or ("://" not in url and "=" in url)


def store_for_url(url: str, *, pool_size: int = 10) -> Store:
    """An unopened store for ``url``."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://").removeprefix("/")
        if not path:
            raise ConfigurationError(f"a sqlite URL needs a path, like sqlite:///cache.db: {url!r}")
        return SqliteStore(Path(path))
    if is_postgres_url(url):
        return PostgresStore(url, max_size=pool_size)
    raise ConfigurationError(
        f"unsupported cache URL {url!r}: use memory://, sqlite:///path or postgresql://..."
    )


@dataclass
class Fleetcache:
    """Everything ``open`` built, started in order and closed in reverse by ``close``."""

    url: str
    store: Store
    lookup: CachingLookup
    hub: NotificationHub | None = None
    coordinator: PostgresCoordinator | None = None
    publisher: PostgresInvalidationPublisher | None = None
    listener: InvalidationListener | None = None
    _closed: bool = field(default=False, repr=False)

    async def close(self) -> None:
        """Close listener, coordinator (waking its waiters), hub, lookup and store."""
        if self._closed:
            return
        self._closed = True
        if self.listener is not None:
            await self.listener.close()
        if self.coordinator is not None:
            await self.coordinator.close()
        if self.hub is not None:
            await self.hub.close()
        await self.lookup.close()
        await self.store.close()

    def stats(self) -> dict[str, Any]:
        """The lookup's counters, and the coordinator's and listener's when present."""
        stats: dict[str, Any] = {"lookup": self.lookup.stats()}
        if self.coordinator is not None:
            stats["coordinator"] = self.coordinator.stats()
        if self.listener is not None:
            stats["listener"] = self.listener.stats()
        return stats

    async def __aenter__(self) -> Fleetcache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def open_cache(
    url: str,
    *,
    coordinate: bool | None = None,
    error_ttl: float = DEFAULT_ERROR_TTL,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    pool_size: int = 10,
    probe_interval: float = 1.0,
) -> Fleetcache:
    """Open a cache for ``url`` and start what it needs.

    On Postgres it also starts the LISTEN hub, the invalidation broadcast and listener,
    and, when ``coordinate`` is true (default: the ``PRERENDER_COALESCE_ACROSS_PROCESSES``
    flag), cross-process populate coordination. On sqlite and memory the flag is ignored
    (logged once).
    """
    global _flag_ignored_logged  # noqa: PLW0603 - one log line per process, by design
    wanted = coalesce_flag_enabled() if coordinate is None else coordinate
    store = store_for_url(url, pool_size=pool_size)
    await store.open()
    if not isinstance(store, PostgresStore):
        if wanted and not _flag_ignored_logged:
            _flag_ignored_logged = True
            logger.info(
                "%s is ignored for %s: coordination across processes needs Postgres",
                COALESCE_FLAG,
                url.split("://", 1)[0],
            )
        lookup = CachingLookup(
            store, error_ttl=error_ttl, max_rounds=max_rounds, wait_timeout=wait_timeout
        )
        return Fleetcache(url=url, store=store, lookup=lookup)

    cache: Fleetcache | None = None
    hub = NotificationHub(url)
    try:
        await hub.start()
        pool: AsyncConnectionPool[Any] = store.pool
        publisher = PostgresInvalidationPublisher(pool)
        coordinator = (
            PostgresCoordinator(pool, hub, probe_interval=probe_interval) if wanted else None
        )
        lookup = CachingLookup(
            store,
            coordinator=coordinator,
            publisher=publisher,
            error_ttl=error_ttl,
            max_rounds=max_rounds,
            wait_timeout=wait_timeout,
        )
        listener = InvalidationListener(hub, lookup, own=publisher)
        cache = Fleetcache(url, store, lookup, hub, coordinator, publisher, listener)
        if coordinator is not None:
            await coordinator.start()
        await listener.start()
    except BaseException:
        if cache is not None:
            await cache.close()
        else:
            await hub.close()
            await store.close()
        raise
    return cache
