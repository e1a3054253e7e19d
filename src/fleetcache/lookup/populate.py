"""The miss path of a caching lookup, as one loop: join or lead the key's flight in this
process, try the key's fleet-wide lock, and as its winner stamp, produce and write under
the stamp — or as a loser re-read, wait, and read again. Why each step is where it is:
``docs/design.md`` ("The populate protocol", "One NOTIFY per fill", "Overtaken
computations join the newer one")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar

from fleetcache.coordination.base import KeyLock, PopulateCoordinator, Reading, WakeReason
from fleetcache.errors import ComputationTimeoutError, CoordinationGaveUpError, InvalidInputError
from fleetcache.logcontext import get_logger, key_context
from fleetcache.lookup.codec import Codec
from fleetcache.lookup.expiry import NEVER, Expiry, Freshness, freshness
from fleetcache.lookup.near import NearCache
from fleetcache.lookup.observe import Observer, note_waited
from fleetcache.lookup.options import LookupOptions
from fleetcache.lookup.singleflight import SingleFlight, WaitTimeout
from fleetcache.lookup.stats import LookupStats
from fleetcache.stores.base import JSON, Entry, GenerationStamp, Key, Store
from fleetcache.stores.validation import check_names

logger = get_logger("fleetcache.lookup")

V = TypeVar("V")

#: How many times a computation whose result was refused as stale runs in all.
MAX_ATTEMPTS = 3
#: How much longer than its computation may take a caller waits before giving up on it
#: (only reached when a store or lock statement hangs).
CALLER_GRACE = 1.0


class Missing(enum.Enum):
    """What a produce function returns when the thing does not exist (never cached)."""

    MISSING = "missing"


MISSING = Missing.MISSING


@dataclass(frozen=True, slots=True)
class Produced(Generic[V]):
    """What a produce function returns for a name that exists: a value, the names it
    depends on, an error document when producing it failed (cached for the error TTL),
    optional diagnostics (JSON), and whether it may be stored at all (``cacheable=False``:
    returned to the callers but never stored, e.g. an answer known to be incomplete)."""

    value: V
    deps: Sequence[str] = ()
    error: JSON | None = None
    diagnostics: JSON | None = None
    cacheable: bool = True


#: Produces the entry for one candidate: it receives the candidate's key.
Produce = Callable[[Key], Awaitable[Produced[V] | Missing]]


@dataclass(frozen=True, slots=True)
class Request(Generic[V]):
    """One computation's inputs, fixed by the caller that started it."""

    key: Key
    produce: Produce[V]
    candidates: tuple[str, ...]
    alias: str | None
    persist_errors: bool
    expiry: Expiry = NEVER
    # A refresh replaces the entry created at this time (ms): a stored entry answers it
    # only if it is newer (someone else refreshed it meanwhile), not the same one.
    newer_than: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the computation is about (its stamp covers them)."""
        alias = (self.alias,) if self.alias is not None else ()
        return tuple(dict.fromkeys((self.key.name, *self.candidates, *alias)))

    @property
    def lock_key(self) -> str:
        """The fleet-wide lock the computation takes: the alias's key when there is an
        alias ("x" and "x.gts" may produce the same entry, so they take turns and the
        loser re-reads its own key), else the key's."""
        key = self.key if self.alias is None else self.key.with_name(self.alias)
        return key.coalesce_key


@dataclass(frozen=True, slots=True)
class Overtaken:
    """A computation whose result the store refused while a newer computation of its key
    was already under way in this process: its callers join ``flight`` instead."""

    flight: asyncio.Task[Entry | None]


class Elsewhere(enum.Enum):
    """A refresh this process does not run: another one holds the key's lock."""

    ELSEWHERE = "elsewhere"


ELSEWHERE = Elsewhere.ELSEWHERE


class _Refused(enum.Enum):
    REFUSED = "refused"


class Populator(Generic[V]):
    """Computes missing entries for a caching lookup: one flight per key in this process,
    one computing process per key in the fleet (with a coordinator), and a write the store
    checks against every invalidation since the computation began.

    ``flights`` is the lookup's in-flight map (its invalidations forget keys in it);
    ``codec`` turns produced values into what the store keeps (None: they are JSON);
    ``near`` is filled with what a computation stored or found.
    """

    def __init__(
        self,
        store: Store,
        flights: SingleFlight[Key, Entry | None],
        *,
        coordinator: PopulateCoordinator | None,
        near: NearCache | None,
        codec: Codec[V] | None,
        options: LookupOptions,
        stats: LookupStats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.coordinator = coordinator
        self.near = near
        self.options = options
        self._flights = flights
        self._codec = codec
        self._stats = stats
        self._clock = clock
        # The lookup's instrumentation hooks (set through CachingLookup.observer).
        self.observer: Observer | None = None
        # produce() calls under way, each in its own task (see _produce). Added by
        # _produce, removed by each task's done callback, cancelled by close(). Event
        # loop only: no lock.
        self._producing: set[asyncio.Future[Any]] = set()
        # How long a caller waits for a computation at most: its own wait for another
        # process, then the computation's bound, plus a grace. The flight itself ends by
        # then (a computation answers at its compute timeout even if produce ignores its
        # cancellation), so this only catches a store or lock statement that hangs.
        compute = options.compute_timeout
        waiting = options.max_rounds * options.wait_timeout if coordinator is not None else 0.0
        self._caller_budget = waiting + compute + CALLER_GRACE
        self._caller_bound = f"compute_timeout={compute:g} s + {CALLER_GRACE:g} s"
        if coordinator is not None:
            self._caller_bound = (
                f"max_rounds={options.max_rounds} x wait_timeout={options.wait_timeout:g} s "
                f"for another process's computation, then {self._caller_bound}"
            )

    # ------------------------------------------------------------------ callers

    def running(self, key: Key) -> asyncio.Task[Entry | None] | None:
        """The computation of ``key`` a caller would join now, if any."""
        return self._flights.running(key)

    def producing(self) -> int:
        """How many ``produce`` calls are running now (abandoned ones included)."""
        return len(self._producing)

    async def join(self, key: Key, flight: asyncio.Task[Entry | None]) -> Entry | None:
        """The result of a computation already under way (see :meth:`running`)."""
        started = time.monotonic()
        try:
            return await self._flights.wait(flight, self._caller_budget)
        except WaitTimeout:
            raise self._no_answer(key, started) from None

    async def load(self, request: Request[V]) -> Entry | None:
        """The entry for a key the store did not have: computed here (the key's one
        computation in this process, which callers arriving meanwhile join), or by
        another process of the fleet, or found stored meanwhile. None when every
        candidate is missing (or the error is not to be persisted)."""
        started = time.monotonic()
        try:
            return await self._flights.do(
                request.key, lambda: self._lead(request), timeout=self._caller_budget
            )
        except WaitTimeout:
            raise self._no_answer(request.key, started) from None

    async def refresh(self, request: Request[V]) -> Entry | Overtaken | Elsewhere | None:
        """Compute ``request`` once more if this process wins the key's lock;
        :data:`ELSEWHERE` at once if another process holds it (that one refreshes it)."""
        epoch = self._epoch()  # before any store read
        async with self._lock(request) as lock:
            if not lock.won:
                return ELSEWHERE
            return await self._fill(request, lock, epoch)

    async def close(self, timeout: float) -> None:
        """Cancel the ``produce`` calls still running (those abandoned at their compute
        timeout included) and wait for them at most ``timeout`` seconds."""
        tasks = list(self._producing)
        for task in tasks:
            task.cancel()
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    # ------------------------------------------------------------------ the loop

    async def _lead(self, request: Request[V]) -> Entry | None:
        """The key's one computation in this process (the body of its flight)."""
        with key_context(request.key.coalesce_key):
            outcome = await self._populate(request)
        if isinstance(outcome, Overtaken):
            # Joined only now that _populate returned, so our lock on the key is released:
            # the newer flight may be waiting for that very lock (docs/design.md).
            return await self._flights.wait(outcome.flight)
        return outcome

    async def _populate(self, request: Request[V]) -> Entry | Overtaken | None:
        """Rounds of: try the key's lock; won: fill it; lost: re-read, wait for the
        holder, read again. Waiting is bounded by time (``max_rounds * wait_timeout``),
        not by wakes; once it is spent, one more read and try, then a typed error."""
        options = self.options
        started = time.monotonic()
        deadline = started + options.max_rounds * options.wait_timeout
        reasons: list[WakeReason] = []
        while True:
            epoch = self._epoch()  # before any store read (the try's own included)
            async with self._lock(request) as lock:
                if lock.won:
                    return await self._fill(request, lock, epoch)
                # A fill that committed before our try is in the store now (read by the
                # try itself where the coordinator can); one that commits later wakes our
                # waiter, registered before the try (docs/design.md).
                found = lock.found()
                entry = await self._read(request) if found is None else found[1]
                if self._usable(entry):
                    self._waited()
                    return self._keep(entry, epoch)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waited = lock.wait(min(options.wait_timeout, remaining))
                obs = self.observer
                reason = await (waited if obs is None else obs.waiting(request.key, waited))
            reasons.append(reason)
            logger.debug(
                "round %d for key %s: lost the lock, woken by %s",
                len(reasons),
                request.key.coalesce_key,
                reason,
            )
            epoch = self._epoch()
            entry = await self._read(request)
            if self._usable(entry):
                self._waited()
                return self._keep(entry, epoch)
        self._stats.gave_up += 1
        raise CoordinationGaveUpError(
            request.key.coalesce_key,
            time.monotonic() - started,
            len(reasons),
            likely_cause(reasons),
        )

    def _waited(self) -> None:
        """Another process's computation answered this flight (noted for the observed get
        that leads it; an unobserved lookup must not touch the note of an observed get
        whose ``produce`` called it)."""
        if self.observer is not None:
            note_waited()

    def _lock(self, request: Request[V]) -> AbstractAsyncContextManager[KeyLock]:
        """The key's fleet-wide lock, whose try also stamps and reads the key where the
        coordinator can; without a coordinator, one this process always wins."""
        if self.coordinator is None:
            return contextlib.nullcontext(KeyLock(request.lock_key, won=True))
        reading = Reading(request.key, request.names, request.alias is not None)
        return self.coordinator.lock(request.lock_key, reading)

    def _epoch(self) -> int:
        """The near tier's invalidation epoch, read before a store read whose entry may be
        kept near (see :meth:`_keep`)."""
        return self.near.epoch() if self.near is not None else 0

    async def _read(self, request: Request[V]) -> Entry | None:
        """The key's stored entry."""
        return await self.store.read(request.key, by_alias=request.alias is not None)

    # ------------------------------------------------------------------ the winner

    async def _fill(
        self, request: Request[V], lock: KeyLock, epoch: int
    ) -> Entry | Overtaken | None:
        """The winner's part, bounded by ``compute_timeout``: stamp and re-read in one
        reading of the store (the lock's try did it where it could); produce the
        candidates in order; write under the stamp. ``epoch``: the near tier's, read before
        the lock was tried.
        A write the store refuses (something it depends on was invalidated meanwhile)
        is thrown away: the callers join a newer computation of the key if one is
        under way here, else the attempt runs again, at most :data:`MAX_ATTEMPTS` times."""
        key = request.key
        by_alias = request.alias is not None
        found = lock.found()
        timeout = asyncio.timeout(self.options.compute_timeout)
        try:
            async with timeout:
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    if found is None:
                        found = await self.store.stamp_and_read(
                            key, request.names, by_alias=by_alias
                        )
                    stamp, entry = found
                    found = None  # another attempt stamps afresh
                    if self._usable(entry) and (
                        request.newer_than is None or (entry.created_at or 0) > request.newer_than
                    ):
                        lock.quiet = True  # someone else stored it, and announced it
                        return self._keep(entry, epoch)
                    outcome = await self._candidates(request, stamp, lock)
                    if outcome is None:
                        return None  # every candidate is missing
                    if isinstance(outcome, Entry):
                        return self._keep(outcome, epoch) if outcome.stored else outcome
                    self._stats.stale_refused += 1
                    newer = self._flights.running(key)
                    if newer is not None and newer is not asyncio.current_task():
                        self._stats.overtaken += 1
                        logger.info(
                            "the result for key %s was refused by the store (something it "
                            "depends on was invalidated while it was computed); its callers "
                            "join the newer computation already under way",
                            key.coalesce_key,
                        )
                        return Overtaken(newer)
                    if attempt < MAX_ATTEMPTS:
                        self._stats.restarts += 1
                    logger.info(
                        "the result for key %s was refused by the store: something it "
                        "depends on was invalidated while it was computed (attempt %d of %d)",
                        key.coalesce_key,
                        attempt,
                        MAX_ATTEMPTS,
                    )
                logger.warning(
                    "key %s was invalidated during each of %d computations; answering with "
                    "what the store holds now",
                    key.coalesce_key,
                    MAX_ATTEMPTS,
                )
                entry = await self._read(request)
                return self._keep(entry, epoch) if self._usable(entry) else None
        except TimeoutError:
            if not timeout.expired():
                raise  # the producer's own TimeoutError, not ours
            self._stats.compute_timeouts += 1
            raise ComputationTimeoutError(key.coalesce_key, self.options.compute_timeout) from None
        finally:
            # The result is in the store (or final): callers arriving from now on read the
            # store instead of joining, though the lock is not released yet (docs/design.md).
            self._flights.detach(key)

    async def _candidates(
        self, request: Request[V], stamp: GenerationStamp, lock: KeyLock
    ) -> Entry | _Refused | None:
        """The first candidate that exists, produced and written under ``stamp`` (its
        write carries the lock's NOTIFY); None if every one is missing; REFUSED if the
        store refused the write. A candidate other than the key's own name is read first."""
        for candidate in request.candidates:
            candidate_key = request.key.with_name(candidate)
            if candidate != request.key.name:
                entry = await self.store.read(candidate_key)
                if self._usable(entry):
                    return entry
            self._stats.computations += 1
            started = self._clock()  # the lookup's clock (a test's too), never below zero
            producing = self._produce(request.produce, candidate_key)
            obs = self.observer
            produced = await (producing if obs is None else obs.computing(candidate_key, producing))
            compute_ms = max(0, round((self._clock() - started) * 1000))
            if produced is MISSING:
                self._stats.missing += 1
                continue
            entry = self._entry(request, candidate_key, produced, compute_ms)
            if not produced.cacheable or (entry.error is not None and not request.persist_errors):
                # Returned, never stored: joined callers filter errors by their own wish.
                self._stats.not_persisted += 1
                return dataclasses.replace(entry, stored=False)
            if not await self.store.write(entry, stamp=stamp, notify=lock.notify):
                return _Refused.REFUSED
            lock.notified = lock.notify is not None
            if entry.error is not None:
                self._stats.errors_cached += 1
            else:
                self._stats.compute_ok += 1
            return entry
        return None

    def _entry(self, request: Request[V], key: Key, produced: object, compute_ms: int) -> Entry:
        """The entry to store for what ``produce`` returned for ``key``."""
        if not isinstance(produced, Produced):  # a bare value would fail untyped below
            raise InvalidInputError(
                f"produce for key {key.coalesce_key} returned a {type(produced).__name__}; "
                "it must return Produced(value=...) or MISSING"
            )
        created_at = int(self._clock() * 1000)
        if produced.error is None:
            expires_at, stale_until = request.expiry.deadlines(created_at)
        else:  # an error lives for the error TTL (so it can be purged after)
            expires_at, stale_until = Expiry(self.options.error_ttl).deadlines(created_at)
        return Entry(
            key=key,
            value=produced.value if self._codec is None else self._codec.encode(produced.value),
            # A str would otherwise become one dep per character.
            deps=check_names(f"the deps produced for key {key.coalesce_key}", produced.deps),
            error=produced.error,
            created_at=created_at,
            alias=request.alias,
            diagnostics=produced.diagnostics,
            expires_at=expires_at,
            stale_until=stale_until,
            compute_ms=compute_ms,
        )

    async def _produce(self, produce: Produce[V], key: Key) -> Produced[V] | Missing:
        """``produce(key)`` in a task of its own, so that the compute timeout (or close)
        answers this computation's callers at once even if ``produce`` ignores its
        cancellation: the task is cancelled and left behind, tracked until it ends (close()
        cancels it again and waits for it), and its late result goes nowhere."""
        task = asyncio.ensure_future(produce(key))
        self._producing.add(task)
        task.add_done_callback(self._producing.discard)
        try:
            # asyncio.wait, not await: our cancellation must not wait for produce to
            # acknowledge its own (one waiter future, a turn of the loop cheaper than shield).
            await asyncio.wait((task,))
            return task.result()
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception:
            self._stats.compute_failures += 1
            raise

    # ------------------------------------------------------------------ helpers

    def _usable(self, entry: Entry | None) -> TypeGuard[Entry]:
        """Whether a stored entry answers a caller waiting for a computation: present and
        fresh (a stale one is what that computation is replacing)."""
        return (
            entry is not None
            and freshness(entry, self._clock() * 1000, self.options.error_ttl) is Freshness.FRESH
        )

    def _keep(self, entry: Entry, epoch: int) -> Entry:
        """``entry`` (one in the store), kept in the near tier too unless an invalidation
        came in since ``epoch`` (read before the store read that found it)."""
        if self.near is not None:
            self.near.put(entry, epoch=epoch)
        return entry

    def _no_answer(self, key: Key, started: float) -> ComputationTimeoutError:
        """The error of a caller whose own bound ran out before its computation answered."""
        return ComputationTimeoutError(
            key.coalesce_key,
            self.options.compute_timeout,
            waited=time.monotonic() - started,
            bound=self._caller_bound,
        )


def likely_cause(reasons: Sequence[WakeReason]) -> str:
    """A sentence on why a coordinated caller gave up, from how its waits ended."""
    if reasons and all(reason is WakeReason.TIMEOUT for reason in reasons):
        return (
            "its holder never finished: the computation outlasted every wait, or "
            "notifications are not reaching this process"
        )
    if WakeReason.CLOSE in reasons:
        return "the coordinator was closing"
    if WakeReason.PROBE in reasons:
        return "the key's lock kept changing hands without a usable result"
    return (
        "each time its holder finished, another process took the lock before this one "
        "and no usable result was stored (the computation may keep failing)"
    )
