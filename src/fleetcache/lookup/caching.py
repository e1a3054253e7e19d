"""``CachingLookup``: the generic async read-through cache (layer 5) — its policy.

A ``get`` first asks the near tier (when there is one), then joins the key's computation
if one is under way in this process (before any I/O), else reads the store; on a miss it
starts the key's one computation (:class:`~fleetcache.lookup.singleflight.SingleFlight`),
which, with a coordinator, also takes the key's fleet-wide lock
(:func:`~fleetcache.lookup.coordinated.run_coordinated`) and runs the populate protocol
(:class:`~fleetcache.lookup.populate.Populator`).

The store decides staleness: a computation's write is checked, in the store's own
transaction, against every invalidation since the computation's stamp, whichever process
made it. Invalidation notices from other processes are hints for what this process keeps in
memory (the near tier); they never decide whether a result is stored.

What is policy here: the error TTL (an error entry older than it is a miss); expiry (see
:mod:`fleetcache.lookup.expiry`: a stale entry is served while one background refresh
runs); the bounds on computing and waiting; what a caller sees (``persist_errors``, the
codec); invalidation (through the store's closure, then the broadcast); and the counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeGuard, TypeVar

from fleetcache.coordination.base import Acquired, PopulateCoordinator
from fleetcache.errors import (
    CachedError,
    ComputationTimeoutError,
    ConfigurationError,
    InvalidInputError,
    NotOpenError,
)
from fleetcache.logcontext import get_logger, key_context
from fleetcache.lookup.backoff import Backoff
from fleetcache.lookup.codec import Codec
from fleetcache.lookup.coordinated import run_coordinated
from fleetcache.lookup.expiry import Freshness, check_expiry, deadlines, freshness, refresh_early
from fleetcache.lookup.near import NearCache
from fleetcache.lookup.populate import Overtaken, Populator, Produce, Request
from fleetcache.lookup.singleflight import SingleFlight, WaitTimeout
from fleetcache.lookup.stats import LookupStats
from fleetcache.stores.base import MAX_STAMP_AGE, Entry, Expand, Key, Store
from fleetcache.stores.validation import (
    check_name,
    check_names,
    encode_entry,
    is_plain_name,
    validate_key,
)

logger = get_logger("fleetcache.lookup")

V = TypeVar("V")

DEFAULT_ERROR_TTL = 30.0
DEFAULT_COMPUTE_TIMEOUT = 300.0
DEFAULT_WAIT_TIMEOUT = 180.0
DEFAULT_MAX_ROUNDS = 4
#: How often (seconds) a lookup deletes, in passing, entries past their stale window.
PURGE_INTERVAL = 60.0
#: How long (ms) past its stale window an entry is kept before it is purged: the fleet's
#: clocks may disagree a little, and a purge must never beat a reader to a live entry.
PURGE_MARGIN_MS = 60_000
#: How much longer than its computation may take a caller waits before giving up on it
#: (only reached when a producer ignores its cancellation).
_CALLER_GRACE = 1.0


class _Default:
    """The type of :data:`DEFAULT`: "use the lookup's setting" (None means "none")."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: Passed for ``ttl``/``stale_ttl``/``early_refresh``: the lookup's own setting.
DEFAULT: Final = _Default()
#: An expiry option of one call: seconds (or beta), None (none), or DEFAULT.
Setting: TypeAlias = float | _Default | None


class InvalidationPublisher(Protocol):
    """Tells the other processes of the fleet about an invalidation, after it committed:
    for a store that does not announce its invalidations itself. (The Postgres store
    announces each one inside its own transaction, so nothing can lose it once it commits;
    ``fleetcache.open`` gives its lookup no publisher.) A publisher's call can still be
    lost when its caller is cancelled between the commit and the call."""

    async def names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Names (with their dependents) of ``namespace`` were invalidated."""

    async def namespace_cleared(self, namespace: str) -> None:
        """Every entry of ``namespace`` was deleted."""

    async def all_cleared(self) -> None:
        """Every entry was deleted."""


class CachingLookup(Generic[V]):
    """A read-through cache over a :class:`~fleetcache.stores.base.Store`.

    ``coordinator`` turns on fleet-wide single flight; ``publisher`` broadcasts
    invalidations to the fleet; ``codec`` turns values of type ``V`` into the JSON stored
    (default: values are JSON); ``near`` serves hits from process memory (see
    :mod:`fleetcache.lookup.near`; it must hear the fleet's invalidations).
    ``error_ttl``: seconds an error entry counts as a hit. ``ttl``, ``stale_ttl`` and
    ``early_refresh``: the defaults of ``get``'s expiry options (None: values never expire).
    ``compute_timeout``: seconds one computation (all its candidates and restarts) may
    take; its callers are answered then even if ``produce`` ignores its cancellation.
    ``wait_timeout`` and ``max_rounds``: a caller waits for another process's computation
    at most ``wait_timeout`` seconds at a time and ``max_rounds * wait_timeout`` in all.
    ``clock`` returns seconds since the epoch (error TTL, expiry, refresh backoff);
    ``rng`` draws the early-refresh coin (seed it in tests).
    """

    def __init__(
        self,
        store: Store,
        *,
        coordinator: PopulateCoordinator | None = None,
        publisher: InvalidationPublisher | None = None,
        codec: Codec[V] | None = None,
        near: NearCache | None = None,
        error_ttl: float = DEFAULT_ERROR_TTL,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        early_refresh: float | None = None,
        compute_timeout: float = DEFAULT_COMPUTE_TIMEOUT,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if error_ttl < 0:
            raise ConfigurationError(f"error_ttl must be >= 0 seconds, got {error_ttl}")
        if not 0 < compute_timeout <= MAX_STAMP_AGE:
            raise ConfigurationError(
                f"compute_timeout must be > 0 and at most {MAX_STAMP_AGE:g} seconds (a "
                f"computation older than that is refused by the store), got {compute_timeout}"
            )
        if wait_timeout <= 0:
            raise ConfigurationError(f"wait_timeout must be > 0 seconds, got {wait_timeout}")
        if max_rounds < 1:
            raise ConfigurationError(f"max_rounds must be >= 1, got {max_rounds}")
        check_expiry(ttl, stale_ttl, early_refresh)
        self.store = store
        self.coordinator = coordinator
        self.publisher = publisher
        self.near = near
        self.error_ttl = error_ttl
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        self.early_refresh = early_refresh
        self.wait_timeout = wait_timeout
        self.max_rounds = max_rounds
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
            usable=self._usable,
            codec=codec,
            stats=self._stats,
            compute_timeout=compute_timeout,
            error_ttl=error_ttl,
            clock=clock,
        )
        # How long a caller waits for a computation at most: its own wait for another
        # process, then the computation's bound, plus a grace. The flight itself ends by
        # then (a populate answers at its compute timeout even if produce ignores its
        # cancellation), so this only catches a store or lock statement that hangs.
        waiting = max_rounds * wait_timeout if coordinator is not None else 0.0
        self._caller_budget = waiting + compute_timeout + _CALLER_GRACE
        self._caller_bound = f"compute_timeout={compute_timeout:g} s + {_CALLER_GRACE:g} s"
        if coordinator is not None:
            self._caller_bound = (
                f"max_rounds={max_rounds} x wait_timeout={wait_timeout:g} s for another "
                f"process's computation, then {self._caller_bound}"
            )
        self._closed = False

    @property
    def compute_timeout(self) -> float:
        """Seconds one computation may take."""
        return self._populator.compute_timeout

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
        (see :mod:`fleetcache.lookup.expiry`). Left out, the lookup's settings apply. A
        refresh stores its value with the expiry of the call that started it.

        With a coordinator, the fleet-wide lock is taken on the alias's key when there is
        an alias (so "x" and "x.gts" take turns), else on ``key`` itself.
        """
        self._check_get(
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
        if near is not None:
            kept = near.get(key, by_alias=by_alias)
            if kept is not None:
                verdict = self._freshness(kept)
                if verdict is not Freshness.DEAD:
                    return self._serve(
                        kept, verdict, persist_errors, produce, (ttl, stale_ttl, early_refresh)
                    )
        flight = self._flights.running(key)
        if flight is not None:  # joined before any I/O
            self._stats.coalesced += 1
            return self._out(await self._wait(key, flight), persist_errors)
        epoch = near.epoch() if near is not None else 0
        entry = await self.store.read(key, by_alias=by_alias)
        if entry is not None:
            verdict = self._freshness(entry)
            if verdict is not Freshness.DEAD:
                self._stats.hits += 1
                if near is not None:
                    near.put(entry, epoch=epoch)
                return self._serve(
                    entry, verdict, persist_errors, produce, (ttl, stale_ttl, early_refresh)
                )
        self._stats.misses += 1
        if self._closed:  # closed while we read: start nothing close() would not see
            raise NotOpenError("this CachingLookup is closed")
        request = self._request(
            key=key,
            produce=produce,
            candidates=candidates,
            alias=alias,
            persist_errors=persist_errors,
            ttl=ttl,
            stale_ttl=stale_ttl,
        )
        if self._flights.running(key) is not None:
            self._stats.coalesced += 1
        started = time.monotonic()
        try:
            result = await self._flights.do(
                key, lambda: self._load(request), timeout=self._caller_budget
            )
        except WaitTimeout:
            raise self._no_answer(key, started) from None
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
    ) -> None:
        """What ``get`` refuses before any I/O, on a hit too."""
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
        # The call's own options, before any I/O and whether it hits or not (the hit path
        # with none given checks nothing: the lookup's settings were checked when made).
        if not callable(produce):
            raise ConfigurationError(
                f"produce for key {key.coalesce_key} must be an async function of a Key, "
                f"not a {type(produce).__name__}"
            )
        if not (
            candidates is None
            and alias is None
            and ttl is DEFAULT
            and stale_ttl is DEFAULT
            and early_refresh is DEFAULT
        ):
            self._check_call(
                key,
                candidates=candidates,
                alias=alias,
                ttl=ttl,
                stale_ttl=stale_ttl,
                early_refresh=early_refresh,
            )

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
    ) -> Entry | None:
        """What :meth:`get` answers from the near tier, from any thread and without waiting
        for the event loop, or None when only :meth:`get` can answer (no near tier, nothing
        servable there, or an error entry this caller does not want). A refresh the hit
        calls for (stale, or early) is started through ``call_soon`` (the loop's
        ``call_soon_threadsafe``): the caller gets the entry at once, as from ``get``."""
        self._check_get(
            key,
            produce,
            candidates=None,
            alias=alias,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )
        near = self.near
        if near is None:
            return None
        kept = near.get(key, by_alias=alias is not None, count_miss=False)
        if kept is None:
            return None
        verdict = self._freshness(kept)
        if verdict is Freshness.DEAD:
            return None
        refresh = self._refresh_due(kept, verdict, early_refresh)
        if refresh is not None:
            call_soon(self._start_refresh, refresh, kept, produce, ttl, stale_ttl)
        return self._out(kept, persist_errors)

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
        if entry is None:
            return None
        if entry.error is not None:
            raise CachedError(entry.key.coalesce_key, entry.error)
        value: V = entry.value
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

    def _request(
        self,
        *,
        key: Key,
        produce: Produce[V],
        candidates: Sequence[str] | None,
        alias: str | None,
        persist_errors: bool,
        ttl: Setting,
        stale_ttl: Setting,
    ) -> Request[V]:
        """A computation's inputs, checked (they are about to be stored)."""
        names, ttl_, stale_ = self._check_call(
            key,
            candidates=candidates,
            alias=alias,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=DEFAULT,
        )
        return Request(
            key=key,
            produce=produce,
            candidates=names or (key.name,),
            alias=alias,
            persist_errors=persist_errors,
            ttl=ttl_,
            stale_ttl=stale_,
        )

    def _check_call(
        self,
        key: Key,
        *,
        candidates: object,
        alias: object,
        ttl: Setting,
        stale_ttl: Setting,
        early_refresh: Setting,
    ) -> tuple[tuple[str, ...], float | None, float | None]:
        """A call's candidates (checked names; a str is refused, not taken apart into its
        characters), after checking its alias and expiry; and its ``(ttl, stale_ttl)``."""
        names: tuple[str, ...] = ()
        if candidates is not None:
            if isinstance(candidates, list | tuple) and all(map(is_plain_name, candidates)):
                names = tuple(candidates)
            else:
                names = check_names(f"the candidates of key {key.coalesce_key}", candidates)
        if alias is not None and not is_plain_name(alias):
            check_name(f"the alias of key {key.coalesce_key}", alias)
        return (names, *self._expiry(ttl, stale_ttl, early_refresh))

    def _expiry(
        self, ttl: Setting, stale_ttl: Setting, early_refresh: Setting = DEFAULT
    ) -> tuple[float | None, float | None]:
        """A call's ``(ttl, stale_ttl)``, the lookup's where left out; checked, with the
        call's ``early_refresh``."""
        ttl_ = self.ttl if isinstance(ttl, _Default) else ttl
        if ttl_ is None:
            # Never expires, so never stale: only options given in this call can contradict
            # that (the lookup's own were checked together when it was made).
            check_expiry(None, _given(stale_ttl), _given(early_refresh))
            return None, None
        stale_ = self.stale_ttl if isinstance(stale_ttl, _Default) else stale_ttl
        beta = self.early_refresh if isinstance(early_refresh, _Default) else early_refresh
        check_expiry(ttl_, stale_, beta)
        # As floats: a Fraction or a numpy number would otherwise reach the stored times.
        return float(ttl_), (None if stale_ is None else float(stale_))

    def _serve(
        self,
        entry: Entry,
        verdict: Freshness,
        persist_errors: bool,
        produce: Produce[V],
        expiry: tuple[Setting, Setting, Setting],
    ) -> Entry | None:
        """A hit: what the caller gets now, and a refresh in the background when the
        entry is stale or (XFetch) about to be. ``expiry`` is the call's ``(ttl,
        stale_ttl, early_refresh)``; a refresh stores its value with the call's expiry."""
        ttl, stale_ttl, early_refresh = expiry
        refresh = self._refresh_due(entry, verdict, early_refresh)
        if refresh is not None:
            self._start_refresh(refresh, entry, produce, ttl, stale_ttl)
        return self._out(entry, persist_errors)

    def _refresh_due(
        self, entry: Entry, verdict: Freshness, early_refresh: Setting
    ) -> Freshness | None:
        """Whether a hit on ``entry`` calls for a refresh: ``STALE`` (it is stale),
        ``FRESH`` (XFetch says refresh early) or None. Pure apart from the coin: safe from
        any thread."""
        if entry.error is not None:
            return None
        beta = self.early_refresh if isinstance(early_refresh, _Default) else early_refresh
        if beta is not None and beta <= 0:
            raise ConfigurationError(f"early_refresh (beta) must be > 0, got {beta}")
        if verdict is Freshness.STALE:
            return verdict
        if refresh_early(entry, self._clock() * 1000, beta, self._rng.random):
            return Freshness.FRESH
        return None

    def _start_refresh(
        self,
        why: Freshness,
        entry: Entry,
        produce: Produce[V],
        ttl: Setting,
        stale_ttl: Setting,
    ) -> None:
        """Count a stale or early-refresh hit and start its refresh (on the loop only)."""
        if why is Freshness.STALE:
            self._stats.stale_served += 1
        else:
            self._stats.early_refreshes += 1
        self._refresh_soon(entry, produce, ttl, stale_ttl)

    async def _wait(self, key: Key, flight: Any) -> Entry | None:
        started = time.monotonic()
        try:
            result: Entry | None = await self._flights.wait(flight, self._caller_budget)
        except WaitTimeout:
            raise self._no_answer(key, started) from None
        return result

    def _no_answer(self, key: Key, started: float) -> ComputationTimeoutError:
        """The error of a caller whose own bound ran out before its computation answered."""
        return ComputationTimeoutError(
            key.coalesce_key,
            self.compute_timeout,
            waited=time.monotonic() - started,
            bound=self._caller_bound,
        )

    def _freshness(self, entry: Entry) -> Freshness:
        """Where a stored entry is in its life; an error entry lives for the error TTL."""
        now_ms = self._clock() * 1000
        if entry.error is not None:
            created = entry.created_at
            alive = created is not None and now_ms - created <= self.error_ttl * 1000
            return Freshness.FRESH if alive else Freshness.DEAD
        return freshness(entry, now_ms)

    def _usable(self, entry: Entry | None) -> TypeGuard[Entry]:
        """Whether a stored entry answers a caller waiting for a computation: present
        and fresh (a stale one is what that computation is replacing)."""
        return entry is not None and self._freshness(entry) is Freshness.FRESH

    def _out(self, entry: Entry | None, persist_errors: bool) -> Entry | None:
        """What a caller gets: no error entry if it asked not to persist errors, and the
        value decoded by the codec."""
        if entry is None or (entry.error is not None and not persist_errors):
            return None
        if self._codec is None:
            return entry
        return dataclasses.replace(entry, value=self._codec.decode(entry.value))

    # -------------------------------------------------------------- computing

    async def _load(self, request: Request[V]) -> Entry | None:
        outcome = await self._compute(request)
        if isinstance(outcome, Overtaken):
            # Our result was refused, and callers who came after the invalidation have
            # started a newer computation here: join it rather than compute a third time.
            # Joined only now, after _compute returned, so our lock on the key (if we held
            # it) is released: the newer flight may be parked waiting for that very lock,
            # and waiting for it while holding the lock would wait on ourselves. Released,
            # it wakes the newer flight, which then wins the lock or finds what a peer
            # process stored. No cycle: a flight only ever joins one started after it (ours
            # had left the in-flight map before that one began).
            return await self._flights.wait(outcome.flight)
        return outcome

    async def _compute(self, request: Request[V]) -> Entry | Overtaken | None:
        """Populate ``request``, under the key's fleet-wide lock when coordinated."""
        key = request.key
        with key_context(key.coalesce_key):
            if self.coordinator is None:
                return await self._settle(request)
            by_alias = request.alias is not None

            async def read() -> Entry | None:
                epoch = self.near.epoch() if self.near is not None else 0
                entry = await self.store.read(key, by_alias=by_alias)
                if not self._usable(entry):
                    return None
                if self.near is not None:
                    self.near.put(entry, epoch=epoch)
                return entry

            lock_key = self._lock_key(request)
            announce = self.coordinator.announcement(lock_key)
            return await run_coordinated(
                self.coordinator,
                coalesce_key=key.coalesce_key,
                lock_key=lock_key,
                read=read,
                compute=lambda: self._settle(request, announce),
                wait_timeout=self.wait_timeout,
                max_rounds=self.max_rounds,
                stats=self._stats,
            )

    @staticmethod
    def _lock_key(request: Request[V]) -> str:
        # The lock is per alias family when there is an alias: "x" and "x.gts" may produce
        # the same entry, so they take turns and the loser re-reads its own key.
        key = request.key
        return (key.with_name(request.alias) if request.alias is not None else key).coalesce_key

    async def _settle(
        self, request: Request[V], announce: tuple[str, str] | None = None
    ) -> Entry | Overtaken | None:
        """Populate, then leave the in-flight map at once: the result is in the store (or
        final), so a caller arriving from now on reads the store instead of joining. (A
        winner still has to release its lock; a caller joining in that window would get a
        result an invalidation committed meanwhile may already have deleted.) A result
        refused while a newer computation of the key runs here is :class:`Overtaken`."""
        near = self.near
        on_stored = None
        if near is not None:
            epoch = near.epoch()  # before the populate's first store read

            def on_stored(entry: Entry) -> None:
                near.put(entry, epoch=epoch)

        try:
            return await self._populator.populate(
                request,
                on_stored=on_stored,
                announce=announce,
                newer=lambda: self._newer_flight(request.key),
            )
        finally:
            self._flights.detach(request.key)

    def _newer_flight(self, key: Key) -> asyncio.Task[Entry | None] | None:
        """The computation of ``key`` callers would join now, unless it is the one asking
        (a refused computation still in the map was overtaken by another process's
        invalidation: nobody here started a newer one)."""
        flight = self._flights.running(key)
        return flight if flight is not asyncio.current_task() else None

    # -------------------------------------------------------------- refreshing

    def _refresh_soon(
        self, entry: Entry, produce: Produce[V], ttl: Setting, stale_ttl: Setting
    ) -> None:
        """Start refreshing a stale (or nearly expired) entry in the background, unless a
        refresh or a computation of it is under way here, or its last refresh here failed
        too recently (see Backoff). Nobody waits for it. The refreshed value is stored with
        the expiry of the call that started the refresh (``ttl``, ``stale_ttl``)."""
        key = entry.key
        if self._closed or self._flights.running(key) or self._refreshes.running(key):
            return
        if self._refresh_backoff.blocked(key):
            self._stats.refreshes_backed_off += 1
            return
        ttl_, stale_ = self._expiry(ttl, stale_ttl)
        request = Request(
            key=key,
            produce=produce,
            candidates=(key.name,),
            alias=entry.alias,
            persist_errors=False,  # an error never replaces the value being refreshed
            ttl=ttl_,
            stale_ttl=stale_,
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
                if self.coordinator is None:
                    outcome = await self._settle(request)
                else:
                    lock_key = self._lock_key(request)
                    announce = self.coordinator.announcement(lock_key)
                    won = await self.coordinator.try_acquire_and_run(
                        lock_key, lambda: self._settle(request, announce)
                    )
                    if not isinstance(won, Acquired):
                        won.cancel()  # another process refreshes it
                        return None
                    outcome = won.value
            except Exception as exc:  # noqa: BLE001 - a refresh's failure is counted and logged
                self._refresh_failed(key, f"failed ({type(exc).__name__}: {exc})")
                return None
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
        ttl_, stale_ = self._expiry(ttl, stale_ttl)
        deps_ = check_names(f"the deps of key {key.coalesce_key}", deps)
        encoded = value if self._codec is None else self._codec.encode(value)

        def entry_at(created_at: int) -> Entry:
            expires_at, stale_until = deadlines(created_at, ttl_, stale_)
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

    async def delete(self, key: Key) -> list[str]:
        """Invalidate ``key``'s name in its namespace (see :meth:`invalidate`)."""
        validate_key(key)
        return await self.invalidate(key.namespace, [key.name])

    # ------------------------------------------------------------ invalidating

    async def invalidate(
        self, namespace: str, names: Sequence[str], *, expand: Expand | None = None
    ) -> list[str]:
        """Invalidate ``names`` of ``namespace`` and, transitively, every entry whose deps
        contain one of them (see ``Store.invalidate``; ``expand`` gives every name an entry
        may be stored or depended on under); return all the names invalidated. When this
        returns, no entry computed from the old content of any of them exists or will be
        stored, in any process. The fleet hears of it through the store's announcement,
        sent in the invalidation's own transaction (delivered when it commits, so even a
        caller cancelled right after the commit cannot lose it), or the publisher's.

        If this raises or is cancelled, the invalidation may still have committed: this
        process then forgets the whole namespace (its computations to join, its near
        copies), since the names it reached are unknown."""
        try:
            closure = await self.store.invalidate(namespace, names, expand=expand)
        except InvalidInputError:
            raise  # refused before any I/O: nothing happened
        except BaseException:
            self._forget_here(namespace)
            raise
        invalidated = set(closure)
        # Callers from now on must not join a computation that may have stored (before the
        # invalidation) what the store has just deleted; those under way restart by
        # themselves if the store refuses them.
        self._flights.forget(lambda k: k.namespace == namespace and k.name in invalidated)
        if self.near is not None:
            self.near.evict_names(namespace, closure)
        if closure and self.publisher is not None:
            # Shielded: a cancel arriving now leaves the announcement to finish.
            await asyncio.shield(self.publisher.names_invalidated(namespace, closure))
        return closure

    async def clear_namespace(self, namespace: str) -> None:
        """Delete every entry of ``namespace``; computations under way there store nothing.
        As with :meth:`invalidate`, the fleet hears of it even if this is cancelled after
        the store committed, and a failure here forgets the namespace in this process."""
        try:
            await self.store.clear_namespace(namespace)
        except InvalidInputError:
            raise
        except BaseException:
            self._forget_here(namespace)
            raise
        self._forget_here(namespace)
        if self.publisher is not None:
            await asyncio.shield(self.publisher.namespace_cleared(namespace))

    async def clear_all(self) -> None:
        """Delete every entry; no computation under way stores anything. As with
        :meth:`invalidate`, the fleet hears of it even if this is cancelled after the store
        committed, and a failure here forgets everything in this process."""
        try:
            await self.store.clear_all()
        finally:
            self._forget_here(None)
        if self.publisher is not None:
            await asyncio.shield(self.publisher.all_cleared())

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

    def names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Another process invalidated ``names`` (the listener's target): evict them here."""
        self._stats.remote_invalidations += 1
        if self.near is not None:
            self.near.evict_names(namespace, names)

    def namespace_cleared(self, namespace: str) -> None:
        """Another process cleared ``namespace``."""
        self._stats.remote_invalidations += 1
        if self.near is not None:
            self.near.evict_namespace(namespace)

    def all_cleared(self) -> None:
        """Another process cleared everything."""
        self._stats.remote_invalidations += 1
        if self.near is not None:
            self.near.clear()

    def notifications_lost(self) -> None:
        """Invalidation notices from other processes may have been missed."""
        self._stats.notification_gaps += 1
        if self.near is not None:
            self.near.clear()

    # -------------------------------------------------------------- lifecycle

    def stats(self) -> dict[str, int]:
        """Counters: hits (from the store), misses, coalesced callers, computations,
        missing outcomes, errors cached, results not persisted, stale results refused by
        the store, restarts and refused computations whose callers joined a newer one
        (``overtaken``), computations timed out, locks won and lost, waits by wake reason,
        give-ups, stale values served, refreshes (early ones too), refreshes that failed
        and stale hits that started none because the key's last refresh failed recently
        (``refreshes_backed_off``), entries purged, invalidations heard from the fleet,
        and the near tier's."""
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


def _given(setting: Setting) -> float | None:
    """An expiry option as given in a call (None where left out)."""
    return None if isinstance(setting, _Default) else setting
