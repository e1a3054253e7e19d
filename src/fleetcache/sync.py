"""The sync API: ``fleetcache.open_sync(url)``, the async core run on one event-loop thread
(anyio's blocking portal), with the same verbs and guarantees for threads and for sync
code inside an async application."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast

import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

from fleetcache.errors import (
    ComputationInterruptedError,
    ConfigurationError,
    NotOpenError,
)
from fleetcache.factory import DEFAULT_CLOSE_TIMEOUT, Fleetcache
from fleetcache.factory import open as open_async
from fleetcache.lookup.caching import CachingLookup, value_of
from fleetcache.lookup.decorator import KeyMaker
from fleetcache.lookup.expiry import DEFAULT, Setting
from fleetcache.lookup.populate import Missing, Produced
from fleetcache.stores.base import Entry, Expand, Key, Store
from fleetcache.stores.postgres import POOL_SIZE, PostgresStore
from fleetcache.stores.sqlite import SqliteStore

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: What a sync ``get`` computes with: a function of the candidate's key.
SyncProduce = Callable[[Key], "Produced[Any] | Missing"]


class Inbox(Protocol):
    """Where a computation's ``produce`` is run while its caller waits (see :class:`Job`)."""

    def offer(self, job: Job) -> bool:
        """Take ``job`` to run it, unless the caller stopped waiting (then False)."""


class Job:
    """One call of a sync ``produce``, handed from the core's loop to the thread of the
    caller that asked for it. Its outcome reaches the loop through ``call_soon_threadsafe``;
    :data:`_NOT_RUN` sends it back to be run on a worker thread instead."""

    __slots__ = ("future", "key", "loop", "produce")

    def __init__(
        self,
        produce: SyncProduce,
        key: Key,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.produce = produce
        self.key = key
        self.loop = loop
        self.future = future

    def run(self) -> None:
        """Run ``produce`` here (the caller's thread) and send its outcome to the loop."""
        if self.future.cancelled():  # abandoned at its compute timeout before it began
            return
        try:
            outcome: Any = self.produce(self.key)
        except Exception as exc:  # noqa: BLE001 - it reaches every caller of the computation
            self._send(exc, failed=True)
        except BaseException as exc:
            self._send(ComputationInterruptedError(self.key.coalesce_key, exc), failed=True)
            raise
        else:
            self._send(outcome, failed=False)

    def give_back(self) -> None:
        """Let the loop run it on a worker thread (the caller no longer waits)."""
        self._send(_NOT_RUN, failed=False)

    def _send(self, outcome: Any, *, failed: bool) -> None:
        # A closed loop (the cache was closed meanwhile) raises RuntimeError: nobody waits.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, outcome, failed)


class _NotRun:
    """The outcome of a job its caller gave back unrun."""


_NOT_RUN = _NotRun()


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.done():  # cancelled: its computation timed out or was closed
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class ThreadInbox:
    """Jobs a blocked caller's thread runs while it waits for its answer: a computation's
    ``produce`` runs on the thread of the caller that started it, with that thread's
    thread-locals (Django's database connection, a request's context), not on a pool."""

    def __init__(self) -> None:
        # _open is written under _lock by serve() (True -> False, once) and read under
        # _lock by offer() (the loop's thread), so a job is either queued before the
        # close (and drained by serve) or refused after it (and run elsewhere).
        self._lock = threading.Lock()
        self._open = True
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()

    def offer(self, job: Job) -> bool:
        """Queue ``job`` for the waiting thread, unless it stopped waiting."""
        with self._lock:
            if self._open:
                self._jobs.put(job)
            return self._open

    def serve(self, future: concurrent.futures.Future[T]) -> T:
        """Run the jobs handed here until ``future`` is done, then return its result."""
        future.add_done_callback(lambda _: self._jobs.put(None))
        try:
            while (job := self._jobs.get()) is not None:
                job.run()
        except BaseException:
            future.cancel()  # an interrupt here: the core's task is cancelled, not left
            raise
        finally:
            with self._lock:
                self._open = False
            while True:  # offered before the close: the caller is done, run them elsewhere
                try:
                    left = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if left is not None:
                    left.give_back()
        return future.result()


class LoopInbox:
    """Jobs run on the event loop of a caller awaiting its answer from another loop (an
    async application calling the core's loop): a sync ``produce`` runs there, as
    Django's own ``aget_or_set`` runs its default."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()  # guards _open: offer() runs on the core's loop
        self._open = True

    def offer(self, job: Job) -> bool:
        """Schedule ``job`` on the caller's loop, unless it stopped waiting."""
        with self._lock:
            if not self._open:
                return False
            try:
                self._loop.call_soon_threadsafe(job.run)
            except RuntimeError:  # that loop is closed
                return False
            return True

    def close(self) -> None:
        """The caller has its answer: later jobs run on worker threads."""
        with self._lock:
            self._open = False


def adapt(produce: SyncProduce, inbox: Inbox | None) -> Callable[[Key], Awaitable[Any]]:
    """The async ``produce`` the core calls for a sync one: run by ``inbox`` (its caller)
    while the caller waits, else (a background refresh, or a caller gone) on a worker thread
    of anyio's, abandoned at the compute timeout like any ``produce`` ignoring cancellation."""

    async def produce_async(key: Key) -> Any:
        if inbox is not None:
            loop = asyncio.get_running_loop()
            job = Job(produce, key, loop, loop.create_future())
            if inbox.offer(job):
                outcome = await job.future
                if outcome is not _NOT_RUN:
                    return outcome
        return await anyio.to_thread.run_sync(produce, key, abandon_on_cancel=True)

    return produce_async


def _check_produce(key: Key, produce: object) -> None:
    if not callable(produce) or inspect.iscoroutinefunction(produce):
        raise ConfigurationError(
            f"produce for key {key.coalesce_key} must be a (sync) function of a Key, not "
            f"{'an async function' if callable(produce) else 'a ' + type(produce).__name__}"
            " (the async API, fleetcache.open, takes async ones)"
        )


class SyncFleetcache:
    """An open cache for sync code: the verbs of :class:`~fleetcache.factory.Fleetcache`
    (``get``, ``get_value``, ``peek``, ``set``, ``delete``, ``invalidate``,
    ``clear_namespace``, ``clear_all``, ``cached``, ``stats``, ``close``), blocking, and
    safe from any number of threads at once. Made by :func:`open_sync`; a context manager.

    One async core serves every thread: single flight across the threads of the process
    (they share its in-flight map) and, on Postgres, across the fleet. Reads are answered
    on the calling thread without waking the loop: a near-tier hit, and on Postgres and
    sqlite a store hit (``get``/``get_value`` finding a live entry, ``peek``), read with the
    thread's own connection (Postgres: from a read pool of synchronous connections, see
    :func:`open_sync`); a stale hit is served there too and its refresh started on the
    loop. Anything else (a miss, a dead entry, a write, an invalidation) is one hop to the
    core's loop thread and back. A computation's ``produce`` (a sync function) runs on the
    thread of the caller that started it, while it waits — never on the loop — so it keeps
    its thread-locals; a background refresh, which nobody waits for, runs it on a worker
    thread. Sync code inside an async application may call it too: it blocks that
    application's loop for the call, as any sync call does, but never runs a loop there.

    The bridge is anyio's :class:`~anyio.from_thread.BlockingPortal`
    (``start_blocking_portal``): a kept library that owns the loop thread's start, stop and
    the cancellation of a caller's task, rather than a hand-rolled loop in a thread.
    """

    def __init__(
        self,
        cache: Fleetcache,
        portal: BlockingPortal,
        portal_cm: AbstractContextManager[BlockingPortal],
        loop: asyncio.AbstractEventLoop,
        *,
        reads_here: bool = False,
    ) -> None:
        self._cache = cache
        # Whether the store reads on the calling thread (its read_here: sqlite's, or
        # Postgres's through the read pool open_sync opened).
        self._reads_here = reads_here
        self._portal = portal
        self._portal_cm = portal_cm
        self._loop = loop
        self._lookup: CachingLookup[Any] = cache.lookup
        self._closed = False
        self._close_lock = threading.Lock()

    # ------------------------------------------------------------------ the core

    @property
    def url(self) -> str:
        """The URL it was opened with."""
        return self._cache.url

    @property
    def async_cache(self) -> Fleetcache:
        """The async core. Its methods run only on its loop: use :meth:`call` or
        :meth:`acall` to run them."""
        return self._cache

    @property
    def lookup(self) -> CachingLookup[Any]:
        """The core's lookup (see :attr:`async_cache`)."""
        return self._lookup

    @property
    def store(self) -> Store:
        """The core's store (see :attr:`async_cache`)."""
        return self._cache.store

    def submit(
        self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Start ``fn(*args, **kwargs)`` (a coroutine function) on the core's loop; cancelling
        the future cancels it there."""
        self._check_open()
        # The portal owns the loop thread; calls go straight to the loop (the portal's own
        # call wraps each in a task of its task group with a cancel scope: about 60 us a
        # call here against 24 us, on a hit path of about 90 us).
        return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._loop)

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (a coroutine function) on the core's loop, and return
        its result here."""
        return self.submit(fn, *args, **kwargs).result()

    async def acall(
        self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
    ) -> T:
        """:meth:`call` for a caller on another event loop: awaits without blocking it."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the core's loop and return at once."""
        self._loop.call_soon_threadsafe(fn, *args)

    def _check_open(self) -> None:
        if self._closed:
            raise NotOpenError(f"this SyncFleetcache ({self._cache.url}) is closed")

    @property
    def reads_here(self) -> bool:
        """Whether store hits are read on the calling thread (Postgres with a read pool,
        sqlite), not through the loop thread."""
        return self._reads_here

    def _read(self, key: Key, by_alias: bool = False) -> Entry | None:
        """The store's read of ``key``: on the calling thread where the store reads there,
        else on the core's loop."""
        store: Any = self._cache.store
        if not self._reads_here:
            return self.call(self._cache.store.read, key, by_alias=by_alias)
        entry: Entry | None = store.read_here(key, by_alias)
        return entry

    # ------------------------------------------------------------------ reading

    def get(
        self,
        key: Key,
        produce: SyncProduce,
        *,
        candidates: Sequence[str] | None = None,
        alias: str | None = None,
        persist_errors: bool = True,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Entry | None:
        """The entry for ``key``, computing it with ``produce`` (a sync function of the
        candidate's key, returning ``Produced(...)`` or ``MISSING``) on a miss; see
        :meth:`fleetcache.CachingLookup.get` for every option and guarantee."""
        self._check_open()
        _check_produce(key, produce)
        options: dict[str, Any] = {
            "alias": alias,
            "persist_errors": persist_errors,
            "ttl": ttl,
            "stale_ttl": stale_ttl,
            "early_refresh": early_refresh,
        }
        read = self._read if self._reads_here else None
        if self._lookup.near is not None or read is not None:
            # A near-tier hit, or a store hit read on this thread: no trip to the loop.
            hit = self._lookup.near_hit(
                key, adapt(produce, None), call_soon=self.call_soon, read=read, **options
            )
            if hit is not None:
                return hit
        inbox = ThreadInbox()
        future = self.submit(
            self._lookup.get, key, adapt(produce, inbox), candidates=candidates, **options
        )
        return inbox.serve(future)

    def get_value(
        self,
        key: Key,
        produce: SyncProduce,
        *,
        candidates: Sequence[str] | None = None,
        alias: str | None = None,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Any:
        """The value for ``key`` (computed on a miss, as :meth:`get`), None when it is
        missing; raises :class:`~fleetcache.errors.CachedError` for an error entry."""
        entry = self.get(
            key,
            produce,
            candidates=candidates,
            alias=alias,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )
        return value_of(entry)

    def peek(self, key: Key, *, by_alias: bool = False, near: bool = False) -> Entry | None:
        """The stored entry for ``key``, never computing (see ``CachingLookup.peek``);
        read on the calling thread where the store can. ``near=True``: the near tier
        answers first, and what the store answers is kept there (``CachingLookup.peek_here``;
        the Django backend's ``get``)."""
        self._check_open()
        return self._lookup.peek_here(key, self._read, by_alias=by_alias, near=near)

    # ------------------------------------------------------------------ writing

    def set(
        self,
        key: Key,
        value: Any,
        *,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        deps: Sequence[str] = (),
        alias: str | None = None,
    ) -> list[str]:
        """Store ``value`` under ``key`` now (see ``CachingLookup.set``)."""
        return self.call(
            self._lookup.set, key, value, ttl=ttl, stale_ttl=stale_ttl, deps=deps, alias=alias
        )

    def delete(self, key: Key) -> list[str]:
        """Invalidate ``key``'s name in its namespace (see :meth:`invalidate`)."""
        return self.call(self._lookup.delete, key)

    def invalidate(
        self,
        namespace: str,
        names: Sequence[str],
        *,
        expand: Expand | None = None,
        conn: Any = None,
    ) -> list[str]:
        """Invalidate ``names`` and their dependents, fleet-wide; return them all (see
        ``CachingLookup.invalidate``). ``expand`` runs on the core's loop thread.

        ``conn`` (Postgres): your synchronous ``psycopg.Connection`` inside its open
        transaction; the invalidation then commits, or rolls back, with it. It runs on
        this thread through the SQL function ``fleetcache_invalidate``, which has no
        ``expand``: give every name an entry is stored or depended on under."""
        if conn is not None:
            return self._in_transaction(namespace, names, expand, conn)
        return self.call(self._lookup.invalidate, namespace, names, expand=expand)

    def clear_namespace(self, namespace: str, *, conn: Any = None) -> None:
        """Delete every entry of ``namespace`` (``conn``: in your open transaction, as
        :meth:`invalidate`)."""
        if conn is not None:
            self._in_transaction(namespace, None, None, conn)
            return
        self.call(self._lookup.clear_namespace, namespace)

    def _in_transaction(
        self, namespace: str, names: Sequence[str] | None, expand: Expand | None, conn: Any
    ) -> list[str]:
        store: Any = self._cache.store
        if not hasattr(store, "invalidate_in_sync_transaction"):
            raise ConfigurationError(
                f"invalidating namespace {namespace!r} in the application's transaction needs "
                f"the Postgres store; {type(store).__name__} has no such transaction: call it "
                "without conn= after your commit"
            )
        if expand is not None:
            raise ConfigurationError(
                f"invalidating namespace {namespace!r} in a synchronous application "
                "transaction runs in SQL, which cannot call expand: pass every variant in "
                "names, or use the async API"
            )
        closure: list[str] = store.invalidate_in_sync_transaction(conn, namespace, names)
        return closure

    def clear_all(self) -> None:
        """Delete every entry."""
        self.call(self._lookup.clear_all)

    def cached(
        self,
        *,
        namespace: str | None = None,
        key: Callable[..., str] | None = None,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Callable[[Callable[P, R]], SyncCachedFunction[P, R]]:
        """A decorator caching a sync function's results here; see
        :class:`SyncCachedFunction`."""

        def decorate(fn: Callable[P, R]) -> SyncCachedFunction[P, R]:
            return SyncCachedFunction(
                self,
                fn,
                namespace=namespace,
                key=key,
                ttl=ttl,
                stale_ttl=stale_ttl,
                early_refresh=early_refresh,
            )

        return decorate

    # ------------------------------------------------------------------ lifecycle

    def stats(self) -> dict[str, Any]:
        """The core's counters (see ``Fleetcache.stats``), read on its loop."""

        async def read() -> dict[str, Any]:
            return self._cache.stats()

        return self.call(read)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Close the core (bounded by ``timeout`` per part), then stop its loop thread.
        Idempotent; callers still waiting get :class:`~fleetcache.errors.NotOpenError`."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._cache.close(timeout), self._loop).result()
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> SyncFleetcache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncCachedFunction(Generic[P, R]):
    """A sync function whose results live in a cache (``@cache.cached(...)`` on a
    :class:`SyncFleetcache`): the async decorator's keys, options and verbs
    (:mod:`fleetcache.lookup.decorator`), blocking. The function runs on the thread of the
    caller that computes it."""

    def __init__(
        self,
        cache: SyncFleetcache,
        fn: Callable[P, R],
        *,
        namespace: str | None,
        key: Callable[..., str] | None,
        ttl: Setting,
        stale_ttl: Setting,
        early_refresh: Setting,
    ) -> None:
        if inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"the sync cache's cached() decorates sync functions; {fn.__qualname__} is "
                "async (decorate it with the async cache's, fleetcache.open(...).cached)"
            )
        self._keys = KeyMaker(fn, namespace=namespace, key=key)
        # Refused when decorating, not at the first call.
        cache.lookup.expiry(ttl=ttl, stale_ttl=stale_ttl, early_refresh=early_refresh)
        self._cache = cache
        self._fn = fn
        self.namespace = self._keys.namespace
        self._options: dict[str, Any] = {
            "ttl": ttl,
            "stale_ttl": stale_ttl,
            "early_refresh": early_refresh,
        }
        functools.update_wrapper(self, fn)

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> Key:
        """The cache key of a call with these arguments."""
        return self._keys.key_for(args, kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The cached result for these arguments, computed on a miss."""

        def produce(_: Key) -> Produced[R]:
            return Produced(value=self._fn(*args, **kwargs))

        value = self._cache.get_value(self.key_for(*args, **kwargs), produce, **self._options)
        return cast(R, value)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> list[str]:
        """Invalidate the cached result for these arguments (and what depended on it)."""
        return self._cache.delete(self.key_for(*args, **kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Compute the result for these arguments now (here), store it, and return it."""
        key = self.key_for(*args, **kwargs)
        value = self._fn(*args, **kwargs)
        self._cache.set(key, value, ttl=self._options["ttl"], stale_ttl=self._options["stale_ttl"])
        return value

    def peek(self, *args: P.args, **kwargs: P.kwargs) -> R | None:
        """The cached result for these arguments, or None; never computes."""
        entry = self._cache.peek(self.key_for(*args, **kwargs))
        return None if entry is None else cast(R, entry.value)


def open_sync(url: str, *, read_pool_size: int | None = None, **options: Any) -> SyncFleetcache:
    """Open a cache for sync code: ``fleetcache.open(url, **options)`` (the same URLs and
    options) run on a loop thread of its own; returns it open. Use it as ``with
    fleetcache.open_sync(url) as cache:`` or call ``cache.close()``; see
    :class:`SyncFleetcache`.

    On Postgres, hits are read on the calling thread through a pool of synchronous
    connections of its own, the *read pool*: none at open, growing on demand to
    ``read_pool_size`` (None: ``pool_size``'s value), connected where the pool connects
    (``url``, a pooler if that is what it is; never ``session_url``) with its
    ``prepared_statements`` setting; closed by ``close()``, counted in
    ``stats()["connections"]["read_pool"]``. ``read_pool_size=0``: no read pool (every
    store read is a hop to the loop thread; the connection budget of ``fleetcache.open``)."""
    if isinstance(read_pool_size, bool) or not (
        read_pool_size is None or (isinstance(read_pool_size, int) and read_pool_size >= 0)
    ):
        raise ConfigurationError(
            f"read_pool_size must be a whole number >= 0 (0: no read pool), got {read_pool_size!r}"
        )
    portal_cm = start_blocking_portal(name="fleetcache-loop")
    portal = portal_cm.__enter__()
    try:
        loop: asyncio.AbstractEventLoop = portal.call(asyncio.get_running_loop)

        async def opener() -> Fleetcache:
            return await open_async(url, **options)

        cache = portal.call(opener)
    except BaseException:
        portal_cm.__exit__(None, None, None)
        raise
    store = cache.store
    reads_here = isinstance(store, SqliteStore)
    if isinstance(store, PostgresStore):
        size = options.get("pool_size", POOL_SIZE) if read_pool_size is None else read_pool_size
        reads_here = size > 0 and store.open_read_pool(size)
    return SyncFleetcache(cache, portal, portal_cm, loop, reads_here=reads_here)
