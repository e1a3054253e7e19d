"""A Django cache backend on fleetcache (``"BACKEND":
"fleetcache.contrib.django.FleetcacheCache"``): Django's whole cache contract, with
``get_or_set`` computed once across the fleet and no ``delete`` undone by an older
computation; see :class:`FleetcacheCache` for its options."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.exceptions import ImproperlyConfigured

from fleetcache.errors import SerializationError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.expiry import Expiry, Freshness, freshness
from fleetcache.lookup.populate import Produced
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.codecs import ValueCodec
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.validation import check_name
from fleetcache.sync import LoopInbox, SyncFleetcache, adapt, open_sync

logger = logging.getLogger("fleetcache.contrib.django")

#: The longest timeout kept as such (the cache's own limit); a longer one means forever.
MAX_TIMEOUT = 100 * 365 * 24 * 3600.0

#: OPTIONS this backend reads, and the ``fleetcache.open`` option each one sets.
OPEN_OPTIONS = {
    "NEAR": "near",
    "NEAR_MAX_BYTES": "near_max_bytes",
    "COORDINATE": "coordinate",
    "POOL_SIZE": "pool_size",
    "READ_POOL_SIZE": "read_pool_size",
    "SESSION_URL": "session_url",
    "PREPARED_STATEMENTS": "prepared_statements",
    "COMPUTE_TIMEOUT": "compute_timeout",
    "WAIT_TIMEOUT": "wait_timeout",
}
#: OPTIONS Django's BaseCache reads itself.
DJANGO_OPTIONS = ("MAX_ENTRIES", "CULL_FREQUENCY")


class _Expired:
    """The timeout of a value that expires at once (Django's ``0`` or less)."""


_EXPIRED = _Expired()

# The open cores of this process, one per LOCATION and options, shared by every thread's
# backend object (Django makes one per thread). Written and read under _cores_lock; after a
# fork the parent's cores are forgotten (their loop thread did not survive it), not closed.
_cores_lock = threading.Lock()
_cores: dict[tuple[Any, ...], SyncFleetcache] = {}
_cores_pid = os.getpid()
_atexit_registered = False
_cull_logged = False


def close_all() -> None:
    """Close every cache the backend opened in this process (done at exit by itself)."""
    with _cores_lock:
        cores = list(_cores.values())
        _cores.clear()
    for core in cores:
        core.close()


def _core(location: str, options: dict[str, Any]) -> SyncFleetcache:
    global _cores_pid, _atexit_registered  # noqa: PLW0603 - one registry per process
    key = (location, tuple(sorted((name, repr(value)) for name, value in options.items())))
    with _cores_lock:
        if _cores_pid != os.getpid():
            _cores.clear()
            _cores_pid = os.getpid()
        core = _cores.get(key)
        if core is None:
            core = _cores[key] = open_sync(location, **options)
            if not _atexit_registered:
                _atexit_registered = True
                atexit.register(close_all)
        return core


@contextlib.contextmanager
def _pickle_errors() -> Iterator[None]:
    """A value pickle refuses raises pickle's error, as Django's backends do."""
    try:
        yield
    except SerializationError as exc:
        if isinstance(exc.__cause__, pickle.PickleError):
            raise pickle.PicklingError(str(exc)) from exc
        raise


async def _absent(_: Key) -> Produced[Any]:
    raise AssertionError("a near-tier probe never computes")  # pragma: no cover


class FleetcacheCache(BaseCache):
    """Django's cache contract on fleetcache (``BACKEND:
    "fleetcache.contrib.django.FleetcacheCache"``).

    ``LOCATION`` is a fleetcache URL (``postgresql://…`` for a fleet, ``sqlite:///path``).
    Values are pickled (any picklable value, as with Django's own backends): **the database
    must be trusted**, since unpickling runs code. ``OPTIONS``: ``NAMESPACE`` (default
    ``"django"``: the fleetcache namespace of this cache's keys, what ``clear()`` empties),
    ``COMPRESS_ABOVE`` (bytes: zlib above that size; default none), ``NEAR`` and
    ``NEAR_MAX_BYTES`` (a near tier on Postgres), ``COORDINATE``, ``POOL_SIZE``,
    ``SESSION_URL`` (the direct connection when ``LOCATION`` is a transaction pooler such
    as PgBouncer), ``PREPARED_STATEMENTS``, ``COMPUTE_TIMEOUT`` and ``WAIT_TIMEOUT`` (as
    ``fleetcache.open``), ``READ_POOL_SIZE`` (as ``fleetcache.open_sync``), and Django's
    ``MAX_ENTRIES``, which when given bounds the *whole table* (``max_entries`` of
    ``fleetcache.open``: the least recently written entries are evicted in batches of 5%
    of it), and ``CULL_FREQUENCY``, accepted but not used (the batch is the store's;
    Django's default of 300 entries is not applied when ``MAX_ENTRIES`` is not given).
    Any other option is refused.

    One cache per LOCATION and options is opened per process, at the first operation, and
    shared by every thread (Django makes a backend object per thread); ``close()`` (called
    by Django after every request) keeps it open; it is closed at exit.

    Beyond Django's own backends: ``get_or_set`` (and ``add``) go through the cache's
    coalescing get, so on Postgres one caller in the whole fleet computes a missing key
    while the others wait for its value (on sqlite, one per process); and ``delete``,
    ``set`` and ``clear`` are invalidations, so a computation that began before them
    never writes its older value back. ``incr``/``decr`` keep the key's expiry; like
    Django's database backend they are not atomic (a read, then a guarded write: a
    concurrent ``delete`` wins, a concurrent ``incr`` may be lost).
    """

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        options = dict(params.get("OPTIONS", {}))
        self._namespace: str = options.pop("NAMESPACE", "django")
        check_name(
            "the NAMESPACE option of a fleetcache Django cache", self._namespace, allow_empty=False
        )
        compress_above = options.pop("COMPRESS_ABOVE", None)
        open_options: dict[str, Any] = {
            OPEN_OPTIONS[name]: options.pop(name) for name in list(options) if name in OPEN_OPTIONS
        }
        max_entries = options.get("MAX_ENTRIES")
        if max_entries is not None:
            # Django's own reading of it (self._max_entries, an int); given, it bounds the table.
            open_options["max_entries"] = self._max_entries
        culling = [
            name
            for name in DJANGO_OPTIONS
            if options.pop(name, None) is not None and name == "CULL_FREQUENCY"
        ]
        if options:
            raise ImproperlyConfigured(
                f"the fleetcache cache at {location!r} has unknown OPTIONS {sorted(options)}; "
                f"it reads NAMESPACE, COMPRESS_ABOVE, {', '.join(OPEN_OPTIONS)} and "
                f"{', '.join(DJANGO_OPTIONS)}"
            )
        _log_culling(culling)
        self._location = location
        self._options = {
            **open_options,
            "values": ValueCodec("pickle", compress_above=compress_above),
        }
        self._opened: SyncFleetcache | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def core(self) -> SyncFleetcache:
        """The process's open cache for this LOCATION and options (opened at first use)."""
        opened = self._opened
        if opened is None or opened._closed:
            opened = self._opened = _core(self._location, self._options)
        return opened

    def _key(self, key: Any, version: int | None) -> Key:
        return Key(self._namespace, self.make_and_validate_key(key, version=version))

    def _ttl(self, timeout: Any) -> float | _Expired | None:
        """Django's timeout as the cache's ttl (seconds; None: forever)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        if timeout <= 0:
            return _EXPIRED
        return None if timeout > MAX_TIMEOUT else float(timeout)

    def _near(self, core: SyncFleetcache, key: Key) -> Entry | None:
        if core.lookup.near is None:
            return None
        return core.lookup.near_hit(key, _absent, call_soon=core.call_soon)

    # ------------------------------------------------------------------ reading

    def get(self, key: Any, default: Any | None = None, version: int | None = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        entry = self.core.peek(self._key(key, version), near=True)
        return default if entry is None else entry.value

    async def aget(self, key: Any, default: Any | None = None, version: int | None = None) -> Any:
        """:meth:`get`, awaited on the async core."""
        k = self._key(key, version)
        core = self.core
        entry = self._near(core, k) or await core.acall(core.lookup.peek, k)
        return default if entry is None else entry.value

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """The values of the ``keys`` that are stored (read one by one on this thread
        where the store reads there, else concurrently, in one hop to the core)."""
        made = {self._key(key, version): key for key in keys}
        core = self.core
        if core.reads_here:
            return _found(made, [core.peek(k, near=True) for k in made])
        return _found(made, core.call(_peek_many, core.lookup, list(made)))

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """:meth:`get_many`, awaited on the async core."""
        made = {self._key(key, version): key for key in keys}
        core = self.core
        return _found(made, await core.acall(_peek_many, core.lookup, list(made)))

    def has_key(self, key: Any, version: int | None = None) -> bool:
        """Whether ``key`` is stored and not expired."""
        return self.core.peek(self._key(key, version), near=True) is not None

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        """:meth:`has_key`, awaited on the async core."""
        k = self._key(key, version)
        core = self.core
        return (self._near(core, k) or await core.acall(core.lookup.peek, k)) is not None

    # ------------------------------------------------------------------ computing

    def get_or_set(
        self,
        key: Any,
        default: Any | None,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any | None:
        """The value of ``key``; if it is missing, ``default`` (called, if callable, on
        this thread) is stored and returned — computed once across the fleet on Postgres:
        concurrent callers, in this process or another, get the one computed value."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)

        def produce(_: Key) -> Produced[Any]:
            value = default() if callable(default) else default
            return Produced(value, cacheable=ttl is not _EXPIRED)

        with _pickle_errors():
            entry = self.core.get(k, produce, ttl=None if isinstance(ttl, _Expired) else ttl)
        assert entry is not None  # produce never answers MISSING
        return entry.value

    async def aget_or_set(
        self,
        key: Any,
        default: Any | None,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any | None:
        """:meth:`get_or_set` awaited on the async core; a callable ``default`` runs on
        the caller's event loop, as Django's own ``aget_or_set`` runs it."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)

        def produce(_: Key) -> Produced[Any]:
            value = default() if callable(default) else default
            return Produced(value, cacheable=ttl is not _EXPIRED)

        inbox = LoopInbox(asyncio.get_running_loop())
        core = self.core
        try:
            with _pickle_errors():
                entry = await core.acall(
                    core.lookup.get,
                    k,
                    adapt(produce, inbox),
                    ttl=None if isinstance(ttl, _Expired) else ttl,
                )
        finally:
            inbox.close()
        assert entry is not None  # produce never answers MISSING
        return entry.value

    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """Store ``value`` unless ``key`` is stored already; return whether it was stored.
        Atomic across the fleet on Postgres (the key's computation is one caller's)."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        core = self.core
        if isinstance(ttl, _Expired):
            return core.peek(k, near=True) is None
        added: list[bool] = []

        def produce(_: Key) -> Produced[Any]:
            added.append(True)
            return Produced(value)

        with _pickle_errors():
            entry = core.get(k, produce, ttl=ttl)
        return bool(added) and entry is not None and entry.stored

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """:meth:`add`, awaited on the async core."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        core = self.core
        if isinstance(ttl, _Expired):
            return (self._near(core, k) or await core.acall(core.lookup.peek, k)) is None
        added: list[bool] = []

        async def produce(_: Key) -> Produced[Any]:
            added.append(True)
            return Produced(value)

        with _pickle_errors():
            entry = await core.acall(core.lookup.get, k, produce, ttl=ttl)
        return bool(added) and entry is not None and entry.stored

    # ------------------------------------------------------------------ writing

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        """Store ``value`` under ``key`` (a timeout of 0 or less deletes it)."""
        k = self._key(key, version)
        core = self.core
        with _pickle_errors():
            core.call(_set_many, core.lookup, [(k, value)], self._ttl(timeout))

    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        """:meth:`set`, awaited on the async core."""
        k = self._key(key, version)
        core = self.core
        with _pickle_errors():
            await core.acall(_set_many, core.lookup, [(k, value)], self._ttl(timeout))

    def set_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        """Store every item of ``data`` (in one hop); return ``[]`` (none fails)."""
        items = [(self._key(key, version), value) for key, value in data.items()]
        core = self.core
        with _pickle_errors():
            core.call(_set_many, core.lookup, items, self._ttl(timeout))
        return []

    async def aset_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        """:meth:`set_many`, awaited on the async core."""
        items = [(self._key(key, version), value) for key, value in data.items()]
        core = self.core
        with _pickle_errors():
            await core.acall(_set_many, core.lookup, items, self._ttl(timeout))
        return []

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        """Give ``key`` a new timeout from now; False if it is not stored."""
        k = self._key(key, version)
        core = self.core
        return core.call(_touch, core.lookup, k, self._ttl(timeout))

    async def atouch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """:meth:`touch`, awaited on the async core."""
        k = self._key(key, version)
        core = self.core
        return await core.acall(_touch, core.lookup, k, self._ttl(timeout))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Add ``delta`` to the stored value (keeping its expiry) and return the sum;
        ``ValueError`` if ``key`` is not stored."""
        k = self._key(key, version)
        core = self.core
        return _incremented(key, core.call(_incr, core.lookup, k, delta))

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """:meth:`incr`, awaited on the async core."""
        k = self._key(key, version)
        core = self.core
        return _incremented(key, await core.acall(_incr, core.lookup, k, delta))

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Subtract ``delta`` (see :meth:`incr`)."""
        return self.incr(key, -delta, version=version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """:meth:`decr`, awaited on the async core."""
        return await self.aincr(key, -delta, version=version)

    # ------------------------------------------------------------------ deleting

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Delete ``key`` (an invalidation: no computation that began before it stores its
        value after it); return whether it was stored."""
        k = self._key(key, version)
        core = self.core
        return core.call(_delete, core.lookup, k)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        """:meth:`delete`, awaited on the async core."""
        k = self._key(key, version)
        core = self.core
        return await core.acall(_delete, core.lookup, k)

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Delete every key of ``keys``, in one invalidation."""
        names = [self._key(key, version).name for key in keys]
        if names:
            self.core.invalidate(self._namespace, names)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """:meth:`delete_many`, awaited on the async core."""
        names = [self._key(key, version).name for key in keys]
        if names:
            core = self.core
            await core.acall(core.lookup.invalidate, self._namespace, names)

    def clear(self) -> None:
        """Delete every key of this cache's NAMESPACE (every KEY_PREFIX and version)."""
        self.core.clear_namespace(self._namespace)

    async def aclear(self) -> None:
        """:meth:`clear`, awaited on the async core."""
        core = self.core
        await core.acall(core.lookup.clear_namespace, self._namespace)

    def close(self, **kwargs: Any) -> None:
        """Nothing: Django calls it after every request, and the cache is shared by the
        process's threads (it is closed at exit, or by :func:`close_all`)."""

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing (see :meth:`close`)."""


def _log_culling(given: list[str]) -> None:
    global _cull_logged  # noqa: PLW0603 - one log line per process
    if given and not _cull_logged:
        _cull_logged = True
        logger.info(
            "%s given to a fleetcache Django cache: read, not used (MAX_ENTRIES bounds the "
            "table and eviction takes 5%% of it at a time, least recently written first)",
            " and ".join(given),
        )


def _found(made: dict[Key, Any], entries: list[Entry | None]) -> dict[Any, Any]:
    return {made[entry.key]: entry.value for entry in entries if entry is not None}


def _incremented(key: Any, value: Any) -> int:
    if value is _NOT_STORED:
        raise ValueError(f"Key '{key}' not found")
    return cast(int, value)  # the stored value plus delta: an int when the value was one


_NOT_STORED = object()


async def _peek_many(lookup: CachingLookup[Any], keys: list[Key]) -> list[Entry | None]:
    return list(await asyncio.gather(*(lookup.peek(key) for key in keys)))


async def _set_many(
    lookup: CachingLookup[Any], items: list[tuple[Key, Any]], ttl: float | _Expired | None
) -> None:
    if isinstance(ttl, _Expired):  # expires at once: nothing is cached, the old value goes
        for key, _ in items:
            await lookup.delete(key)
        return
    for key, value in items:
        await lookup.set(key, value, ttl=ttl)


async def _delete(lookup: CachingLookup[Any], key: Key) -> bool:
    existed = await lookup.peek(key) is not None
    await lookup.delete(key)
    return existed


async def _touch(lookup: CachingLookup[Any], key: Key, ttl: float | _Expired | None) -> bool:
    if isinstance(ttl, _Expired):
        return await _delete(lookup, key)

    def renewed(entry: Entry, now_ms: int) -> Entry:
        expires_at, stale_until = Expiry(ttl).deadlines(now_ms)
        return dataclasses.replace(
            entry, created_at=now_ms, expires_at=expires_at, stale_until=stale_until
        )

    return await _rewrite(lookup, key, renewed) is not None


async def _incr(lookup: CachingLookup[Any], key: Key, delta: int) -> Any:
    def added(entry: Entry, _: int) -> Entry:
        return dataclasses.replace(entry, value=entry.value + delta)

    entry = await _rewrite(lookup, key, added)
    return _NOT_STORED if entry is None else entry.value


async def _rewrite(
    lookup: CachingLookup[Any], key: Key, change: Callable[[Entry, int], Entry]
) -> Entry | None:
    """Rewrite ``key``'s live entry as ``change(entry, now_ms)`` makes it, under a stamp
    taken as it was read: refused (None) if the key was invalidated since, so a concurrent
    ``delete`` is never undone. None too when nothing live is stored. The near tiers (this
    process's, and its peers' through the broadcast) drop their copies."""
    stamp, entry = await lookup.store.stamp_and_read(key, [key.name])
    now_ms = int(time.time() * 1000)
    if entry is None or freshness(entry, now_ms, lookup.options.error_ttl) is Freshness.DEAD:
        return None
    new = change(entry, now_ms)
    store = lookup.store
    # The write itself announces the change (peers may keep near copies even when this
    # process keeps none), so the announcement commits with it and cannot be lost.
    notify = (
        store.change_announcement(key.namespace, key.name)
        if isinstance(store, PostgresStore)
        else None
    )
    if not await store.write(new, stamp=stamp, notify=notify):
        return None
    if lookup.near is not None:
        lookup.near.evict_names(key.namespace, [key.name])
    return new
