"""``CachingLookup``: the generic async read-through cache (layer 5) and its policy: what a
caller gets (near tier, error TTL, expiry, the codec), when a stale value is refreshed, and
how invalidations reach the store, the in-flight map, the near tier and the fleet. A miss
is handed to the :class:`~fleetcache.lookup.populate.Populator`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from fleetcache.coordination.base import PopulateCoordinator
from fleetcache.errors import CachedError, ConfigurationError, InvalidInputError, NotOpenError
from fleetcache.logcontext import get_logger, key_context
from fleetcache.lookup.backoff import Backoff
from fleetcache.lookup.codec import Codec
from fleetcache.lookup.expiry import (
    DEFAULT,
    Expiry,
    Freshness,
    Setting,
    freshness,
    refresh_early,
)
from fleetcache.lookup.near import NearCache
from fleetcache.lookup.observe import COALESCED, HIT, MISS, NEAR_HIT, STALE, Observer
from fleetcache.lookup.options import LookupOptions
from fleetcache.lookup.populate import ELSEWHERE, Overtaken, Populator, Produce, Request
from fleetcache.lookup.singleflight import SingleFlight
from fleetcache.lookup.stats import LookupStats
from fleetcache.stores.base import Entry, Expand, Key, Store
from fleetcache.stores.validation import (
    check_name,
    check_names,
    encode_entry,
    is_plain_name,
    validate_key,
)

__all__ = ["DEFAULT", "CachingLookup", "Setting"]

logger = get_logger("fleetcache.lookup")

V = TypeVar("V")

#: How often (seconds) a lookup deletes, in passing, entries past their stale window.
PURGE_INTERVAL = 60.0
#: How long (ms) past its stale window an entry is kept before it is purged: the fleet's
#: clocks may disagree a little, and a purge must never beat a reader to a live entry.
PURGE_MARGIN_MS = 60_000


def value_of(entry: Entry | None) -> Any:
    """What ``get_value`` answers for ``entry``: its value, None when missing; raises
    :class:`~fleetcache.errors.CachedError` carrying the error document of an error entry."""
    if entry is None:
        return None
    if entry.error is not None:
        raise CachedError(entry.key.coalesce_key, entry.error)
    return entry.value


class CachingLookup(Generic[V]):
    """A read-through cache over a :class:`~fleetcache.stores.base.Store`.

    ``options`` is its policy (:class:`~fleetcache.lookup.options.LookupOptions`: default
    expiry, error TTL, the bounds on computing and waiting), checked when made.
    ``coordinator`` turns on fleet-wide single flight; ``codec`` turns values of type
    ``V`` into what the store keeps (default: values are JSON); ``near`` serves hits from
    process memory (it must hear the fleet's invalidations, through the ``on_*`` verbs
    the invalidation listener calls). ``clock`` returns seconds since the epoch (error
    TTL, expiry, refresh backoff); ``rng`` draws the early-refresh coin (seed it in tests).
    Made by :func:`fleetcache.open` (``cache.lookup``).
    """

    def __init__(
        self,
        store: Store,
        *,
        options: LookupOptions | None = None,
        coordinator: PopulateCoordinator | None = None,
        codec: Codec[V] | None = None,
        near: NearCache | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if options is None:
            options = LookupOptions()
        elif not isinstance(options, LookupOptions):
            raise ConfigurationError(
                f"options must be a LookupOptions, not a {type(options).__name__}"
            )
        self.store = store
        self.options = options
        self.near = near
        self._codec = codec
        self._clock = clock
        self._rng = rng or random.Random()
        self._stats = LookupStats()
        # Computations callers wait for, and refreshes nobody waits for (kept apart: a
        # caller that finds a dead entry must wait, one that finds a stale one must not).
        self._flights: SingleFlight[Key, Entry | None] = SingleFlight()
        self._refreshes: SingleFlight[Key, Entry | None] = SingleFlight()
        self._purges: SingleFlight[str, None] = SingleFlight()
        self._purged_at = time.monotonic()
        # Keys whose last refresh failed, left alone for a while (bounded: see Backoff).
        self._refresh_backoff: Backoff[Key] = Backoff(clock)
        self._populator: Populator[V] = Populator(
            store,
            self._flights,
            coordinator=coordinator,
            near=near,
            codec=codec,
            options=options,
            stats=self._stats,
            clock=clock,
        )
        self._observer: Observer | None = None
        self._closed = False

    @property
    def observer(self) -> Observer | None:
        """The instrumentation hooks (None: nothing is recorded); installed by
        ``fleetcache.contrib.prometheus.register`` and ``fleetcache.contrib.otel.instrument``."""
        return self._observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        self._observer = self._populator.observer = observer

    @property
    def coordinator(self) -> PopulateCoordinator | None:
        """The fleet-wide coordinator (None: single flight within this process only)."""
        return self._populator.coordinator

    # ------------------------------------------------------------------ reading

    async def get(
        self,
        key: Key,
        produce: Produce[V],
        *,
        candidates: Sequence[str] | None = None,
        alias: str | None = None,
        persist_errors: bool = True,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Entry | None:
        """The entry for ``key``, computing it with ``produce`` on a miss.

        ``candidates`` are the names to try in order (default: ``[key.name]``); ``produce``
        receives each candidate's key; a candidate whose ``produce`` returns ``MISSING`` is
        skipped and never stored, and if all are missing the answer is None. The entry is
        stored under the candidate's name with ``alias``, and a ``get`` given an alias also
        finds an entry whose alias is its key's name. An error entry is returned (and
        cached for the error TTL) like any other; with ``persist_errors=False`` an error is
        neither stored nor returned (the answer is None). Exceptions from ``produce`` reach
        every caller sharing the computation and nothing is stored. Callers of one key
        share the computation the first of them started (its ``produce``, ``candidates``,
        ``alias`` and expiry); each gets the result filtered by its own ``persist_errors``.

        ``ttl`` (seconds, None: never) is how long a computed value stays fresh;
        ``stale_ttl`` how long after that it is still served, at once, while one refresh
        runs; ``early_refresh`` (beta) lets a hit refresh a value shortly before it expires
        (see :class:`~fleetcache.lookup.expiry.Expiry`). Left out, the lookup's settings
        apply. A refresh stores its value with the expiry of the call that started it.

        With a coordinator, the fleet-wide lock is taken on the alias's key when there is
        an alias (so "x" and "x.gts" take turns), else on ``key`` itself.
        """
        expiry = self._check_get(
            key,
            produce,
            candidates=candidates,
            alias=alias,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )
        by_alias = alias is not None
        near = self.near
        obs = self._observer  # None unless a collector or a tracer asked: then free
        started = time.perf_counter() if obs is not None else 0.0
        if near is not None:
            kept = near.get(key, by_alias=by_alias)
            if kept is not None:
                verdict = self._freshness(kept)
                if verdict is not Freshness.DEAD:
                    if obs is not None:
                        obs.hit(key, STALE if verdict is Freshness.STALE else NEAR_HIT, started)
                    return self._serve(kept, verdict, persist_errors, produce, expiry)
        flight = self._populator.running(key)
        if flight is not None:  # joined before any I/O
            self._stats.coalesced += 1
            joined = self._populator.join(key, flight)
            if obs is not None:
                return self._out(await obs.get(key, COALESCED, started, joined), persist_errors)
            return self._out(await joined, persist_errors)
        epoch = near.epoch() if near is not None else 0
        entry = await self.store.read(key, by_alias=by_alias)
        if entry is not None:
            verdict = self._freshness(entry)
            if verdict is not Freshness.DEAD:
                self._stats.hits += 1
                if near is not None:
                    near.put(entry, epoch=epoch)
                if obs is not None:
                    obs.hit(key, STALE if verdict is Freshness.STALE else HIT, started)
                return self._serve(entry, verdict, persist_errors, produce, expiry)
        self._stats.misses += 1
        if self._closed:  # closed while we read: start nothing close() would not see
            raise NotOpenError("this CachingLookup is closed")
        request = Request(
            key=key,
            produce=produce,
            candidates=self._candidates(key, candidates),
            alias=alias,
            persist_errors=persist_errors,
            expiry=expiry,
        )
        outcome = MISS
        if self._populator.running(key) is not None:
            self._stats.coalesced += 1
            outcome = COALESCED
        loaded = self._populator.load(request)
        result = await (loaded if obs is None else obs.get(key, outcome, started, loaded))
        self._maybe_purge()
        return self._out(result, persist_errors)

    def _check_get(
        self,
        key: Key,
        produce: object,
        *,
        candidates: Sequence[str] | None,
        alias: str | None,
        ttl: Setting,
        stale_ttl: Setting,
        early_refresh: Setting,
    ) -> Expiry:
        """What ``get`` refuses before any I/O, on a hit too; the call's expiry."""
        if self._closed:
            raise NotOpenError("this CachingLookup is closed")
        # The key is checked by the store before its first I/O (the near tier and the
        # in-flight map only ever hold keys the store accepted), so not twice per hit here;
        # only a field that is not a str (it may not even hash) is refused first.
        if not (
            type(key.namespace) is str
            and type(key.name) is str
            and type(key.scope) is str
            and type(key.user) is str
        ):
            validate_key(key)
        if not callable(produce):
            raise ConfigurationError(
                f"produce for key {key.coalesce_key} must be an async function of a Key, "
                f"not a {type(produce).__name__}"
            )
        # The call's own options, before any I/O and whether it hits or not (with none
        # given nothing is checked: the lookup's options were checked when it was made).
        if candidates is not None:
            self._candidates(key, candidates)
        if alias is not None and not is_plain_name(alias):
            check_name(f"the alias of key {key.coalesce_key}", alias)
        return self.options.expiry.of_call(ttl, stale_ttl, early_refresh)

    @staticmethod
    def _candidates(key: Key, candidates: object) -> tuple[str, ...]:
        """A call's candidates as checked names (a str is refused, not taken apart into
        its characters); the key's own name when there are none."""
        if candidates is None:
            return (key.name,)
        if isinstance(candidates, list | tuple) and all(map(is_plain_name, candidates)):
            names = tuple(candidates)
        else:
            names = check_names(f"the candidates of key {key.coalesce_key}", candidates)
        return names or (key.name,)

    def expiry(
        self,
        *,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> Expiry:
        """The expiry a call with these options gets (the lookup's where left out);
        :class:`~fleetcache.errors.ConfigurationError` if they make no sense."""
        return self.options.expiry.of_call(ttl, stale_ttl, early_refresh)

    def near_hit(
        self,
        key: Key,
        produce: Produce[V],
        *,
        alias: str | None = None,
        persist_errors: bool = True,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
        call_soon: Callable[..., object],
        read: Callable[[Key, bool], Entry | None] | None = None,
    ) -> Entry | None:
        """What :meth:`get` answers from the near tier, from any thread and without waiting
        for the event loop, or None when only :meth:`get` can answer (no near tier, nothing
        servable there, or an error entry this caller does not want). A refresh the hit
        calls for (stale, or early) is started through ``call_soon`` (the loop's
        ``call_soon_threadsafe``): the caller gets the entry at once, as from ``get``.
        ``read`` (a store's read on the calling thread, given the key and ``by_alias``)
        answers a near miss when given: a store hit without the loop, kept in the near
        tier as ``get`` keeps it (see :meth:`_read_here`); a missing or dead entry is left
        to ``get``."""
        obs = self._observer
        started = time.perf_counter() if obs is not None else 0.0
        expiry = self._check_get(
            key,
            produce,
            candidates=None,
            alias=alias,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )
        near = self.near
        by_alias = alias is not None
        kept = None if near is None else near.get(key, by_alias=by_alias, count_miss=False)
        outcome = NEAR_HIT
        if kept is not None:
            verdict = self._freshness(kept)
            if verdict is Freshness.DEAD:
                return None
        elif read is None:
            return None
        else:
            found = self._read_here(key, by_alias, read)
            if found is None:
                return None
            kept, verdict = found
            outcome = HIT
        refresh = self._refresh_due(kept, verdict, expiry)
        if refresh is not None:
            call_soon(self._start_refresh, refresh, kept, produce, expiry)
        if obs is not None:
            # A store read on this thread is a hit like the loop's.
            obs.hit_from_thread(key, STALE if verdict is Freshness.STALE else outcome, started)
        return self._out(kept, persist_errors)

    def _read_here(
        self, key: Key, by_alias: bool, read: Callable[[Key, bool], Entry | None]
    ) -> tuple[Entry, Freshness] | None:
        """A store read on the calling thread that answers the caller: the entry and its
        freshness, counted as a hit and kept in the near tier; None when it is missing or
        dead (the loop's ``get`` answers then, and counts the near miss and the miss). The
        tier's epoch is read before the store read, so an invalidation the tier hears of
        meanwhile (on the loop's thread) drops the fill (docs/design.md, "Sync reads on the
        calling thread")."""
        near = self.near
        epoch = near.epoch() if near is not None else 0
        entry = read(key, by_alias)
        if entry is None:
            return None
        verdict = self._freshness(entry)
        if verdict is Freshness.DEAD:
            return None
        # Counted from the calling thread: a lost increment under a race is possible
        # (+= is not atomic), acceptable for a counter, never for a value.
        self._stats.hits += 1
        if near is not None:
            near.count_miss()
            near.put(entry, epoch=epoch)
        return entry, verdict

    def peek_here(
        self,
        key: Key,
        read: Callable[[Key, bool], Entry | None],
        *,
        by_alias: bool = False,
        near: bool = False,
    ) -> Entry | None:
        """What :meth:`peek` answers, read on the calling thread by ``read`` (a store's
        read there, given the key and ``by_alias``) without the event loop. With ``near``,
        the near tier answers first, and a store read fills it as :meth:`get` does (the
        Django backend's ``get``); else the tier is left alone, as by :meth:`peek`."""
        if self._closed:
            raise NotOpenError("this CachingLookup is closed")
        tier = self.near if near else None
        if tier is not None:
            kept = tier.get(key, by_alias=by_alias)
            if kept is not None and self._freshness(kept) is not Freshness.DEAD:
                return self._out(kept, True)
        epoch = tier.epoch() if tier is not None else 0
        entry = read(key, by_alias)
        if entry is None or self._freshness(entry) is Freshness.DEAD:
            return None
        if tier is not None:
            tier.put(entry, epoch=epoch)
        return self._out(entry, True)

    async def get_value(
        self,
        key: Key,
        produce: Produce[V],
        *,
        candidates: Sequence[str] | None = None,
        alias: str | None = None,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        early_refresh: Setting = DEFAULT,
    ) -> V | None:
        """The value for ``key`` (computing it on a miss, as :meth:`get`), None when it is
        missing; raises :class:`~fleetcache.errors.CachedError` carrying the error document
        when the entry is an error."""
        entry = await self.get(
            key,
            produce,
            candidates=candidates,
            alias=alias,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )
        value: V | None = value_of(entry)
        return value

    async def peek(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """The stored entry for ``key`` (or, with ``by_alias``, the one aliased by its
        name), never computing; an expired error entry and a dead value count as absent
        (a stale value is returned)."""
        validate_key(key)
        entry = await self.store.read(key, by_alias=by_alias)
        if entry is None or self._freshness(entry) is Freshness.DEAD:
            return None
        return self._out(entry, True)

    def _serve(
        self,
        entry: Entry,
        verdict: Freshness,
        persist_errors: bool,
        produce: Produce[V],
        expiry: Expiry,
    ) -> Entry | None:
        """A hit: what the caller gets now, and a refresh in the background when the
        entry is stale or (XFetch) about to be; it stores its value with the call's
        ``expiry``."""
        refresh = self._refresh_due(entry, verdict, expiry)
        if refresh is not None:
            self._start_refresh(refresh, entry, produce, expiry)
        return self._out(entry, persist_errors)

    def _refresh_due(self, entry: Entry, verdict: Freshness, expiry: Expiry) -> Freshness | None:
        """Whether a hit on ``entry`` calls for a refresh: ``STALE`` (it is stale),
        ``FRESH`` (XFetch says refresh early) or None. Pure apart from the coin: safe from
        any thread."""
        if entry.error is not None:
            return None
        if verdict is Freshness.STALE:
            return verdict
        if refresh_early(entry, self._clock() * 1000, expiry.early_refresh, self._rng.random):
            return Freshness.FRESH
        return None

    def _start_refresh(
        self, why: Freshness, entry: Entry, produce: Produce[V], expiry: Expiry
    ) -> None:
        """Count a stale or early-refresh hit and start its refresh (on the loop only)."""
        if why is Freshness.STALE:
            self._stats.stale_served += 1
        else:
            self._stats.early_refreshes += 1
        self._refresh_soon(entry, produce, expiry)

    def _freshness(self, entry: Entry) -> Freshness:
        """Where a stored entry is in its life; an error entry lives for the error TTL."""
        return freshness(entry, self._clock() * 1000, self.options.error_ttl)

    def _out(self, entry: Entry | None, persist_errors: bool) -> Entry | None:
        """What a caller gets: no error entry if it asked not to persist errors, and the
        value decoded by the codec."""
        if entry is None or (entry.error is not None and not persist_errors):
            return None
        if self._codec is None:
            return entry
        return dataclasses.replace(entry, value=self._codec.decode(entry.value))

    # -------------------------------------------------------------- refreshing

    def _refresh_soon(self, entry: Entry, produce: Produce[V], expiry: Expiry) -> None:
        """Start refreshing a stale (or nearly expired) entry in the background, unless a
        refresh or a computation of it is under way here, or its last refresh here failed
        too recently (see Backoff). Nobody waits for it. The refreshed value is stored with
        ``expiry``, the one of the call that started the refresh."""
        key = entry.key
        if self._closed or self._populator.running(key) or self._refreshes.running(key):
            return
        if self._refresh_backoff.blocked(key):
            self._stats.refreshes_backed_off += 1
            return
        request = Request(
            key=key,
            produce=produce,
            candidates=(key.name,),
            alias=entry.alias,
            persist_errors=False,  # an error never replaces the value being refreshed
            expiry=expiry,
            newer_than=entry.created_at or 0,
        )
        self._refreshes.start(key, lambda: self._refresh(request))

    async def _refresh(self, request: Request[V]) -> Entry | None:
        """One refresh: in the fleet, only by the process that wins the key's lock (a
        loser returns at once: its callers keep getting the stale value). A refresh that
        stores nothing (it failed, or produced an error or nothing) is counted and logged,
        and the key is not refreshed again here for a while (doubling after each failure);
        the stale value stays until its window ends."""
        key = request.key
        with key_context(key.coalesce_key):
            self._stats.refreshes += 1
            try:
                outcome = await self._populator.refresh(request)
            except Exception as exc:  # noqa: BLE001 - a refresh's failure is counted and logged
                self._refresh_failed(key, f"failed ({type(exc).__name__}: {exc})")
                return None
            if outcome is ELSEWHERE:
                return None  # another process holds the key's lock: it refreshes it
            if isinstance(outcome, Overtaken):
                return None  # invalidated meanwhile; the newer computation replaces it
            if outcome is None or not outcome.stored or outcome.error is not None:
                self._refresh_failed(
                    key, f"stored nothing ({'missing' if outcome is None else 'an error'})"
                )
            else:
                self._refresh_backoff.succeeded(key)
            return outcome

    def _refresh_failed(self, key: Key, what: str) -> None:
        self._stats.refresh_failures += 1
        delay = self._refresh_backoff.failed(key)
        logger.warning(
            "refreshing key %s %s; its stale value stays until its window ends, and this "
            "process does not refresh it again for %g s",
            key.coalesce_key,
            what,
            delay,
        )

    def _maybe_purge(self) -> None:
        """Now and then, after a computation, delete entries past their stale window (in
        the background: a flight nobody waits for)."""
        now = time.monotonic()
        if now - self._purged_at < PURGE_INTERVAL or self._closed:
            return
        self._purged_at = now
        before = int(self._clock() * 1000) - PURGE_MARGIN_MS
        self._purges.start(_PURGE, lambda: self._purge(before))

    async def _purge(self, before_ms: int) -> None:
        try:
            purged = await self.store.purge_expired(before_ms)
        except Exception as exc:  # noqa: BLE001 - logged; the next purge tries again
            logger.warning("purging expired entries failed: %s", exc)
            return
        self._stats.purged += purged

    # ---------------------------------------------------------- direct writes

    async def set(
        self,
        key: Key,
        value: V,
        *,
        ttl: Setting = DEFAULT,
        stale_ttl: Setting = DEFAULT,
        deps: Sequence[str] = (),
        alias: str | None = None,
    ) -> list[str]:
        """Store ``value`` under ``key`` now, as if just computed. It first invalidates the
        key (and its dependents, which were computed from its old value), so a computation
        of it that began before cannot overwrite it; returns the names invalidated.

        Everything the store would refuse (the key, the value, ``deps``, ``alias``, the
        expiry) is refused before that invalidation, so a bad ``set`` changes nothing."""
        validate_key(key)
        expiry = self.options.expiry.of_call(ttl, stale_ttl, DEFAULT)
        deps_ = check_names(f"the deps of key {key.coalesce_key}", deps)
        encoded = value if self._codec is None else self._codec.encode(value)

        def entry_at(created_at: int) -> Entry:
            expires_at, stale_until = expiry.deadlines(created_at)
            return Entry(
                key,
                encoded,
                deps=deps_,
                created_at=created_at,
                alias=alias,
                expires_at=expires_at,
                stale_until=stale_until,
                compute_ms=0,
            )

        # Raises what the write would.
        encode_entry(entry_at(int(self._clock() * 1000)), self.store.values)
        invalidated = await self.invalidate(key.namespace, [key.name])
        names = [key.name, *((alias,) if alias is not None else ())]
        stamp, _ = await self.store.stamp_and_read(key, names)
        entry = entry_at(int(self._clock() * 1000))
        # Refused only if yet another invalidation came in between: then that one wins.
        if await self.store.write(entry, stamp=stamp) and self.near is not None:
            self.near.put(entry, epoch=self.near.epoch())
        return invalidated

    async def delete(self, key: Key, *, conn: Any = None) -> list[str]:
        """Invalidate ``key``'s name in its namespace (see :meth:`invalidate`; ``conn``
        as there)."""
        validate_key(key)
        return await self.invalidate(key.namespace, [key.name], conn=conn)

    # ------------------------------------------------------------ invalidating

    async def invalidate(
        self,
        namespace: str,
        names: Sequence[str],
        *,
        expand: Expand | None = None,
        conn: Any = None,
    ) -> list[str]:
        """Invalidate ``names`` of ``namespace`` and, transitively, every entry whose deps
        contain one of them (see ``Store.invalidate``; ``expand`` gives every name an entry
        may be stored or depended on under); return all the names invalidated. When this
        returns, no entry computed from the old content of any of them exists or will be
        stored, in any process. The fleet hears of it through the store's announcement,
        sent in the invalidation's own transaction (delivered when it commits, so even a
        caller cancelled right after the commit cannot lose it).

        If this raises or is cancelled, the invalidation may still have committed: this
        process then forgets the whole namespace (its computations to join, its near
        copies), since the names it reached are unknown.

        ``conn`` (Postgres only): the application's psycopg ``AsyncConnection``, inside its
        open transaction; the whole invalidation then runs in that transaction and takes
        effect when it commits (never if it rolls back), announced to every process,
        this one included, at that instant. See README "Invalidating in your own
        transaction" for what it costs the transaction."""
        if conn is not None:
            return await self._in_application_transaction(namespace, names, expand, conn)
        try:
            closure = await self.store.invalidate(namespace, names, expand=expand)
        except InvalidInputError:
            raise  # refused before any I/O: nothing happened
        except BaseException:
            self._forget_here(namespace)
            raise
        invalidated = set(closure)
        self._stats.invalidations += 1
        self._stats.invalidated_names += len(invalidated)
        self._stats.invalidated_dependents += len(invalidated.difference(names))
        # Callers from now on must not join a computation that may have stored (before the
        # invalidation) what the store has just deleted; those under way restart by
        # themselves if the store refuses them.
        self._flights.forget(lambda k: k.namespace == namespace and k.name in invalidated)
        if self.near is not None:
            self.near.evict_names(namespace, closure)
        return closure

    async def clear_namespace(self, namespace: str, *, conn: Any = None) -> None:
        """Delete every entry of ``namespace``; computations under way there store nothing.
        As with :meth:`invalidate`, the fleet hears of it even if this is cancelled after
        the store committed, and a failure here forgets the namespace in this process.
        ``conn``: in the application's open transaction, as :meth:`invalidate`."""
        if conn is not None:
            await self._in_application_transaction(namespace, None, None, conn)
            return
        try:
            await self.store.clear_namespace(namespace)
        except InvalidInputError:
            raise
        except BaseException:
            self._forget_here(namespace)
            raise
        self._forget_here(namespace)

    async def clear_all(self) -> None:
        """Delete every entry; no computation under way stores anything. As with
        :meth:`invalidate`, the fleet hears of it even if this is cancelled after the store
        committed, and a failure here forgets everything in this process."""
        try:
            await self.store.clear_all()
        finally:
            self._forget_here(None)

    async def _in_application_transaction(
        self,
        namespace: str,
        names: Sequence[str] | None,
        expand: Expand | None,
        conn: Any,
    ) -> list[str]:
        """The store's invalidation (``names`` None: the namespace's clear) in the
        application's transaction. Nothing is forgotten here now: before the commit the
        old entries are still the committed ones (forgetting would only cost a refill of
        the same), and after a rollback they stay right. This process applies it when
        the store's announcement arrives at the commit (it carries another origin than
        this process's own, so the listener does not skip it), like every peer."""
        if not getattr(self.store, "joins_application_transactions", False):
            raise ConfigurationError(
                f"invalidating namespace {namespace!r} in the application's transaction "
                f"needs the Postgres store; {type(self.store).__name__} has no such "
                "transaction: call it without conn= after your commit"
            )
        store: Any = self.store
        if names is None:
            await store.clear_namespace(namespace, conn=conn)
            return []
        closure: list[str] = await store.invalidate(namespace, names, expand=expand, conn=conn)
        return closure

    def _forget_here(self, namespace: str | None) -> None:
        """Forget ``namespace`` (None: everything) in this process: callers from now on
        join no computation under way there, and the near tier drops its copies."""
        if namespace is None:
            self._flights.forget(lambda k: True)
        else:
            self._flights.forget(lambda k: k.namespace == namespace)
        if self.near is not None:
            if namespace is None:
                self.near.clear()
            else:
                self.near.evict_namespace(namespace)

    # ------------------------------------------------- invalidations from the fleet

    def on_names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Another process invalidated ``names`` (the listener's target): evict them here."""
        self._stats.remote_invalidations += 1
        if self.near is not None:
            self.near.evict_names(namespace, names)

    def on_namespace_cleared(self, namespace: str) -> None:
        """Another process cleared ``namespace``."""
        self._stats.remote_invalidations += 1
        if self.near is not None:
            self.near.evict_namespace(namespace)

    def on_all_cleared(self) -> None:
        """Another process cleared everything."""
        self._stats.remote_invalidations += 1
        if self.near is not None:
            self.near.clear()

    def on_notifications_lost(self) -> None:
        """Invalidation notices from other processes may have been missed."""
        self._stats.notification_gaps += 1
        if self.near is not None:
            self.near.clear()

    # -------------------------------------------------------------- lifecycle

    def computations_in_flight(self) -> int:
        """How many ``produce`` calls are running now (those abandoned at their compute
        timeout included, until they end)."""
        return self._populator.producing()

    def stats(self) -> dict[str, int]:
        """Counters: hits (from the store), misses, coalesced callers, computations,
        missing outcomes, errors cached, results not persisted, stale results refused by
        the store, restarts and refused computations whose callers joined a newer one
        (``overtaken``), computations timed out, callers who gave up waiting for another
        process (locks and waits are the coordinator's counters), stale values served,
        refreshes (early ones too), refreshes that failed
        and stale hits that started none because the key's last refresh failed recently
        (``refreshes_backed_off``), entries purged, invalidations heard from the fleet,
        computations that stored a value (``compute_ok``) or raised (``compute_failures``),
        this process's invalidations (``invalidations``; ``invalidated_names`` in all,
        ``invalidated_dependents`` reached through deps), and the near tier's."""
        stats = self._stats.as_dict()
        if self.near is not None:
            stats.update(self.near.stats())
        return stats

    async def close(self, timeout: float = 10.0) -> None:
        """Cancel every computation and refresh still under way, and every ``produce``
        abandoned at its compute timeout (waiting at most ``timeout`` seconds in all), and
        refuse further calls. Idempotent."""
        self._closed = True
        deadline = time.monotonic() + timeout
        await self._flights.close(timeout)
        await self._refreshes.close(max(0.0, deadline - time.monotonic()))
        await self._purges.close(max(0.0, deadline - time.monotonic()))
        await self._populator.close(max(0.0, deadline - time.monotonic()))


#: The one key of the purge's single flight (at most one purge at a time).
_PURGE = "purge"
