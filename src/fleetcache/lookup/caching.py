"""``CachingLookup``: the generic async read-through cache (layer 5).

A ``get`` reads the store; on a miss it joins or starts the key's one in-flight computation
(single flight in the process), which, with a coordinator, also takes the key's fleet-wide
lock so that one process of the fleet computes it while the others wait and re-read.

A computation snapshots the in-memory generations before its first await and the store's
generation counters before its first read, and persists with one write that the store
refuses if its counters moved (guarantee 3); a refused result is discarded and the caller
gets what the store holds now.

Why the store decides and the in-memory snapshot only informs: an in-memory change says an
invalidation happened while we computed, not whether it happened before or after our store
stamp. A peer's broadcast arrives after its delete committed, so a computation that began
between that commit and the broadcast's arrival looks invalidated in memory but read
post-invalidation data; discarding it would throw away a fresh result (and hand the caller
nothing). The stamped write tells the two cases apart exactly, in the store's transaction.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Protocol

from fleetcache.coordination.base import Acquired, PopulateCoordinator, WakeReason
from fleetcache.errors import ConfigurationError, CoordinationGaveUpError, NotOpenError
from fleetcache.lookup.generations import Generations, Snapshot
from fleetcache.stores.base import JSON, Entry, Key, Store, validate_entry

logger = logging.getLogger("fleetcache.lookup")

DEFAULT_ERROR_TTL = 30.0
DEFAULT_MAX_ROUNDS = 4
DEFAULT_WAIT_TIMEOUT = 180.0
#: Rounds ended by a NOTIFY that found nothing stored, allowed per ``max_rounds``.
NOTIFIED_ROUNDS_PER_ROUND = 4


class Missing(enum.Enum):
    """What a produce function returns when the thing does not exist (never cached)."""

    MISSING = "missing"


MISSING = Missing.MISSING


@dataclass(frozen=True, slots=True)
class Produced:
    """What a produce function returns for a name that exists: a value (JSON), the names
    it depends on, an error document when producing it failed (cached for the error TTL),
    and optional diagnostics (JSON)."""

    value: JSON
    deps: Sequence[str] = ()
    error: JSON | None = None
    diagnostics: JSON | None = None


#: Produces the entry for one candidate name.
Produce = Callable[[str], Awaitable[Produced | Missing]]


class InvalidationPublisher(Protocol):
    """Tells the other processes of the fleet about an invalidation (after it committed)."""

    async def names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Names (with their dependents) of ``namespace`` were invalidated."""

    async def namespace_cleared(self, namespace: str) -> None:
        """Every entry of ``namespace`` was deleted."""

    async def all_cleared(self) -> None:
        """Every entry was deleted."""


@dataclass(slots=True)
class _Request:
    """One computation's inputs, fixed when it starts."""

    key: Key
    produce: Produce
    candidates: tuple[str, ...]
    alias: str | None
    persist_errors: bool
    snapshot: Snapshot


@dataclass(slots=True)
class _Flight:
    request: _Request
    task: asyncio.Task[Entry | None]


@dataclass(slots=True)
class LookupStats:
    """Counters of one ``CachingLookup`` (monotonic, since construction)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    computations: int = 0
    missing: int = 0
    errors_cached: int = 0
    errors_not_persisted: int = 0
    stale_discarded: int = 0
    stale_refused: int = 0
    fresh_despite_invalidation: int = 0
    lock_won: int = 0
    lock_lost: int = 0
    waits: dict[str, int] = field(default_factory=dict)
    gave_up: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a flat dict (waits as ``waits_<reason>``)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "waits"}
        for reason in WakeReason:
            flat[f"waits_{reason.value}"] = self.waits.get(reason.value, 0)
        return flat


class CachingLookup:
    """A read-through cache over a :class:`~fleetcache.stores.base.Store`.

    ``coordinator`` turns on fleet-wide single flight; ``publisher`` broadcasts
    invalidations to the fleet. ``clock`` returns seconds since the epoch (injectable for
    the error TTL). ``max_rounds`` and ``wait_timeout`` bound how long a coordinated
    caller waits for another process's computation.
    """

    def __init__(
        self,
        store: Store,
        *,
        coordinator: PopulateCoordinator | None = None,
        publisher: InvalidationPublisher | None = None,
        error_ttl: float = DEFAULT_ERROR_TTL,
        clock: Callable[[], float] = time.time,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        if error_ttl < 0:
            raise ConfigurationError(f"error_ttl must be >= 0, got {error_ttl}")
        if max_rounds < 1:
            raise ConfigurationError(f"max_rounds must be >= 1, got {max_rounds}")
        if wait_timeout <= 0:
            raise ConfigurationError(f"wait_timeout must be > 0, got {wait_timeout}")
        self.store = store
        self.coordinator = coordinator
        self.publisher = publisher
        self.error_ttl = error_ttl
        self.clock = clock
        self.max_rounds = max_rounds
        self.wait_timeout = wait_timeout
        self._generations = Generations()
        self._stats = LookupStats()
        # The in-flight map, coalesce key -> the one computation callers join. Written by
        # get() (insert), by a flight's done callback (remove, only if the map still holds
        # that very flight) and by the bump_* methods (remove, so later callers start
        # afresh); read by get(). All on the event loop's thread, between awaits: no lock.
        self._inflight: dict[str, _Flight] = {}
        # Every computation still running, including those dropped from the map by an
        # invalidation; close() cancels them. Same thread discipline as _inflight.
        self._running: set[asyncio.Task[Entry | None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ reading

    async def get(
        self,
        key: Key,
        produce: Produce,
        *,
        candidates: Sequence[str] | None = None,
        alias: str | None = None,
        persist_errors: bool = True,
    ) -> Entry | None:
        """The entry for ``key``, computing it with ``produce`` on a miss.

        ``candidates`` are the names to try in order (default: ``[key.name]``); a candidate
        whose ``produce`` returns ``MISSING`` is skipped and never stored, and if all are
        missing the answer is None. The entry is stored under the candidate's name with
        ``alias``, so a later ``get`` of the alias hits it. An error entry is returned (and
        cached for the error TTL) like any other; with ``persist_errors=False`` an error is
        neither stored nor returned (the answer is None). Exceptions from ``produce``
        reach every caller sharing the computation and nothing is stored. Callers of one
        key share the computation the first of them started (its ``produce``,
        ``candidates`` and ``alias``); each gets the result filtered by its own
        ``persist_errors``.

        With a coordinator, the fleet-wide lock is taken on the alias's key when there is
        an alias (so "x" and "x.gts" take turns), else on ``key`` itself.
        """
        if self._closed:
            raise NotOpenError("this CachingLookup is closed")
        if not key.namespace or not key.name:
            raise ConfigurationError(f"a key needs a namespace and a name, got {key!r}")
        # The generations as they are before our first await: an invalidation from here on
        # counts as "during the computation". (One integer: a hit pays nothing for it.)
        epoch = self._generations.epoch
        entry = await self.store.read(key)
        if self._usable(entry):
            self._stats.hits += 1
            return _hide_error(entry, persist_errors)
        self._stats.misses += 1
        if self._closed:  # closed while we read: start nothing close() would not see
            raise NotOpenError("this CachingLookup is closed")
        coalesce_key = key.coalesce_key
        flight = self._inflight.get(coalesce_key)
        if flight is None:
            names = (key.name, *(candidates or ()), *((alias,) if alias else ()))
            snapshot = self._generations.snapshot(key.namespace, names, epoch)
            request = _Request(
                key=key,
                produce=produce,
                candidates=tuple(candidates) if candidates else (key.name,),
                alias=alias,
                persist_errors=persist_errors,
                snapshot=snapshot,
            )
            task = asyncio.create_task(self._load(request), name=f"fleetcache {coalesce_key}")
            flight = _Flight(request, task)
            self._inflight[coalesce_key] = flight
            self._running.add(task)
            task.add_done_callback(partial(self._finished, coalesce_key, flight))
        else:
            self._stats.coalesced += 1
        # shield: a caller's cancellation must not cancel the computation the others share.
        try:
            result = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.task.cancelled() and current is not None and not current.cancelling():
                # The computation was cancelled by close(), not this caller.
                raise NotOpenError(
                    f"this CachingLookup was closed while computing {coalesce_key!r}"
                ) from None
            raise
        return _hide_error(result, persist_errors)

    async def peek(self, key: Key) -> Entry | None:
        """The stored entry for ``key`` (by name or alias), never computing; an expired
        error entry counts as absent."""
        entry = await self.store.read(key)
        return entry if self._usable(entry) else None

    def _finished(
        self, coalesce_key: str, flight: _Flight, task: asyncio.Task[Entry | None]
    ) -> None:
        self._running.discard(task)
        # Identity check: an invalidation may have dropped this flight and a new one may
        # already be running under the same key; only ever remove our own.
        if self._inflight.get(coalesce_key) is flight:
            del self._inflight[coalesce_key]
        if not task.cancelled() and task.exception() is not None:
            # Marks the exception retrieved even if every caller was cancelled; the callers
            # that were still waiting have had it raised to them.
            logger.debug(
                "computation for %r failed: %r",
                coalesce_key,
                task.exception(),
                extra={"coalesce_key": coalesce_key},
            )

    def _usable(self, entry: Entry | None) -> bool:
        """A hit: present, and not an error entry older than the error TTL."""
        if entry is None:
            return False
        if entry.error is None:
            return True
        if entry.created_at is None:
            return False
        return self._now_ms() - entry.created_at <= self.error_ttl * 1000

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -------------------------------------------------------------- computing

    async def _load(self, request: _Request) -> Entry | None:
        if self.coordinator is None:
            return await self._uncached(request, None)
        return await self._coordinated(request, self.coordinator)

    async def _coordinated(
        self, request: _Request, coordinator: PopulateCoordinator
    ) -> Entry | None:
        """Rounds of: read; try the key's lock and compute as its winner; or, as a loser,
        wait for the winner's NOTIFY and go round.

        ``max_rounds`` bounds the rounds whose wait ended without the holder saying it was
        done (timeout, crash probe, LISTEN gap, close). A round ended by a NOTIFY means a
        computation finished; when it stored nothing (the key is missing, its error was not
        persisted, or its result was stale) the next round tries again, and such rounds
        are bounded separately (``NOTIFIED_ROUNDS_PER_ROUND`` times as many), so a fleet
        of many processes asking for a missing key does not run out of rounds.
        """
        key = request.key
        coalesce_key = key.coalesce_key
        # The fleet-wide lock is per alias family when there is an alias: a request for
        # "x" and one for "x.gts" may produce the same entry, so they take turns, and the
        # loser re-reads its own key after the winner's NOTIFY.
        lock_key = key.with_name(request.alias).coalesce_key if request.alias else coalesce_key
        reasons: list[WakeReason] = []
        unnotified = notified = 0
        while unnotified < self.max_rounds and notified < (
            self.max_rounds * NOTIFIED_ROUNDS_PER_ROUND
        ):
            if reasons:  # get() read the store just before the first round
                entry = await self.store.read(key)
                if self._usable(entry):
                    return entry

            async def run_as_winner(session: object) -> Entry | None:
                return await self._uncached(request, session)

            outcome = await coordinator.try_acquire_and_run(lock_key, run_as_winner)
            if isinstance(outcome, Acquired):
                self._stats.lock_won += 1
                return outcome.value
            self._stats.lock_lost += 1
            reason = await coordinator.wait_for_key(lock_key, self.wait_timeout)
            reasons.append(reason)
            if reason is WakeReason.NOTIFY:
                notified += 1
            else:
                unnotified += 1
            self._stats.waits[reason.value] = self._stats.waits.get(reason.value, 0) + 1
            logger.debug(
                "round %d for %r: lost the lock, woken by %s",
                len(reasons),
                coalesce_key,
                reason.value,
                extra={"coalesce_key": coalesce_key},
            )
        entry = await self.store.read(key)  # the last wake may have brought the row
        if self._usable(entry):
            return entry
        self._stats.gave_up += 1
        raise CoordinationGaveUpError(
            coalesce_key, len(reasons), self.wait_timeout, _likely_cause(reasons)
        )

    async def _uncached(self, request: _Request, session: object | None) -> Entry | None:
        """Read again, then produce the candidates in order and persist the first that
        exists, unless an invalidation happened since the computation began."""
        key = request.key
        stamp = await self.store.stamp(key.namespace, request.snapshot.names, session=session)
        entry = await self.store.read(key, session=session)
        if self._usable(entry):
            return entry
        for candidate in request.candidates:
            candidate_key = key.with_name(candidate)
            if candidate != key.name:
                entry = await self.store.read(candidate_key, session=session)
                if self._usable(entry):
                    return entry
            self._stats.computations += 1
            produced = await request.produce(candidate)
            if produced is MISSING:
                self._stats.missing += 1
                continue
            entry = Entry(
                key=candidate_key,
                value=produced.value,
                deps=tuple(produced.deps),
                error=produced.error,
                created_at=self._now_ms(),
                alias=request.alias,
                diagnostics=produced.diagnostics,
            )
            validate_entry(entry)
            if entry.error is not None and not request.persist_errors:
                # Not stored; returned so that a joined caller who does want errors sees it
                # (get() hides it from those who asked not to persist errors).
                self._stats.errors_not_persisted += 1
                return entry
            invalidated_meanwhile = self._generations.changed(request.snapshot)
            if not await self.store.write(entry, stamp=stamp, session=session):
                if invalidated_meanwhile:
                    self._stats.stale_discarded += 1
                else:  # an invalidation this process never heard of, caught by the store
                    self._stats.stale_refused += 1
                logger.info(
                    "discarded a stale result for %r: invalidated while computing",
                    key.coalesce_key,
                    extra={"coalesce_key": key.coalesce_key},
                )
                return await self._current(key, session)
            if invalidated_meanwhile:
                self._stats.fresh_despite_invalidation += 1
            if entry.error is not None:
                self._stats.errors_cached += 1
            return entry
        return None

    async def _current(self, key: Key, session: object | None) -> Entry | None:
        entry = await self.store.read(key, session=session)
        return entry if self._usable(entry) else None

    # ------------------------------------------------------------ invalidating

    async def invalidate(
        self,
        namespace: str,
        names: Sequence[str],
        *,
        variants: Callable[[str], Iterable[str]] | None = None,
    ) -> list[str]:
        """Invalidate ``names`` of ``namespace`` and, transitively, every entry whose deps
        contain one of them; return all the names invalidated.

        ``variants`` expands each name (given or found as a dependent) into every name its
        entries may be stored or depended on under (e.g. with and without an extension).
        Order: compute the set, bump the generations, drop matching in-flight entries,
        delete the rows (all scopes and users), then broadcast.
        """

        def expand(name: str) -> Iterable[str]:
            return (name,) if variants is None else variants(name)

        closure = list(dict.fromkeys(variant for name in names for variant in expand(name)))
        seen = set(closure)
        frontier = closure
        while frontier:
            found = await self.store.find_dependents(namespace, frontier)
            frontier = list(
                dict.fromkeys(v for name in found for v in expand(name) if v not in seen)
            )
            seen.update(frontier)
            closure.extend(frontier)
        if not closure:
            return []
        self.bump_names(namespace, closure)
        await self.store.delete_names(namespace, closure)
        if self.publisher is not None:
            await self.publisher.names_invalidated(namespace, closure)
        return closure

    async def clear_namespace(self, namespace: str) -> None:
        """Delete every entry of ``namespace``; computations under way there persist nothing."""
        self.bump_namespace(namespace)
        await self.store.delete_namespace(namespace)
        if self.publisher is not None:
            await self.publisher.namespace_cleared(namespace)

    async def clear_all(self) -> None:
        """Delete every entry; no computation under way persists."""
        self.bump_global()
        await self.store.delete_all()
        if self.publisher is not None:
            await self.publisher.all_cleared()

    def bump_names(self, namespace: str, names: Sequence[str]) -> None:
        """Mark ``names`` of ``namespace`` invalidated in this process (used by
        ``invalidate`` and by the listener replaying another process's invalidation)."""
        wanted = set(names)
        self._generations.bump_names(namespace, wanted)
        self._drop(
            lambda r: r.key.namespace == namespace and not wanted.isdisjoint(r.snapshot.names)
        )

    def bump_namespace(self, namespace: str) -> None:
        """Mark all of ``namespace`` invalidated in this process."""
        self._generations.bump_namespace(namespace)
        self._drop(lambda r: r.key.namespace == namespace)

    def bump_global(self) -> None:
        """Mark everything invalidated in this process."""
        self._generations.bump_global()
        self._drop(lambda r: True)

    def generation(self, namespace: str | None = None, name: str | None = None) -> int:
        """One in-memory generation counter: the global one, a namespace's, or a name's."""
        return self._generations.value(namespace, name)

    def _drop(self, matches: Callable[[_Request], bool]) -> None:
        """Forget matching in-flight entries so later callers start a fresh computation
        instead of joining one whose result will be discarded."""
        for coalesce_key in [k for k, f in self._inflight.items() if matches(f.request)]:
            del self._inflight[coalesce_key]

    # -------------------------------------------------------------- lifecycle

    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, coalesced callers, computations, missing outcomes,
        errors cached, stale results discarded (``stale_discarded``: this process saw the
        invalidation; ``stale_refused``: only the store did), results kept because the store
        proved them fresh though an invalidation happened meanwhile
        (``fresh_despite_invalidation``), locks won and lost, waits by wake reason, and
        give-ups."""
        return self._stats.as_dict()

    async def close(self) -> None:
        """Cancel every computation still under way and refuse further ``get`` calls."""
        self._closed = True
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()


def _hide_error(entry: Entry | None, persist_errors: bool) -> Entry | None:
    """What a caller gets: with ``persist_errors=False`` an error entry is None to it."""
    if entry is not None and entry.error is not None and not persist_errors:
        return None
    return entry


def _likely_cause(reasons: Sequence[WakeReason]) -> str:
    if reasons and all(reason is WakeReason.TIMEOUT for reason in reasons):
        return (
            "the holder never notified; its computation outlasted every wait, "
            "or notifications are not reaching this process"
        )
    if WakeReason.PROBE in reasons:
        return "the holder's lock vanished without a result (its process may keep dying)"
    if WakeReason.CLOSE in reasons:
        return "the coordinator was closing"
    return "each round the holder finished without a usable row (it may keep failing)"
