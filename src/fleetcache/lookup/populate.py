"""The populate protocol: how one computation of a missing key runs (layer 5).

One attempt:

1. **Stamp and re-read**, in one reading of the store (``Store.stamp_and_read``): the
   stamp is no later than the read, so whatever the read did not see, the write below is
   checked against. A usable entry found now is the answer (someone else stored it).
2. **Candidates in order**: a candidate other than the key's own name is read first; then
   ``produce(candidate key)``. ``MISSING`` moves on to the next candidate and stores
   nothing; if all are missing the answer is None.
3. **Guarded write** under the stamp. The store refuses it if anything the entry depends
   on was invalidated after the stamp (its names, alias, deps, namespace, the store).

A refused write means the result was computed from data an invalidation has since
replaced, so it is thrown away. If a newer computation of the key is already under way in
this process (callers who came after the invalidation started it), the populate stops with
:class:`Overtaken` and its callers join that one; otherwise the attempt starts again with a
fresh stamp. Either way every caller sharing the computation — including one that joined
after the invalidation returned — gets a result computed after it. At most
:data:`MAX_ATTEMPTS` attempts; if every one is overtaken (invalidations faster than the
computation), the answer is what the store holds then, possibly None, and it is logged.

Not stored, but returned: an error when the caller asked not to persist errors, and a
result its producer marked ``cacheable=False``.

The whole populate is bounded by ``compute_timeout``: past it the computation is cancelled,
nothing is stored and :class:`~fleetcache.errors.ComputationTimeoutError` is raised at once,
even if ``produce`` ignores its cancellation (it runs in a task of its own, then abandoned).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar

from fleetcache.errors import ComputationTimeoutError, InvalidInputError
from fleetcache.logcontext import get_logger
from fleetcache.lookup.codec import Codec
from fleetcache.lookup.expiry import deadlines
from fleetcache.lookup.stats import LookupStats
from fleetcache.stores.base import JSON, Entry, Key, Store
from fleetcache.stores.validation import check_names

logger = get_logger("fleetcache.lookup")

V = TypeVar("V")

#: How many times a computation whose result was refused as stale runs in all.
MAX_ATTEMPTS = 3


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
    ttl: float | None = None
    stale_ttl: float | None = None
    # A refresh replaces the entry created at this time (ms): a stored entry answers it
    # only if it is newer (someone else refreshed it meanwhile), not the same one.
    newer_than: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the computation is about (its stamp covers them)."""
        alias = (self.alias,) if self.alias is not None else ()
        return tuple(dict.fromkeys((self.key.name, *self.candidates, *alias)))


class _Refused(enum.Enum):
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Overtaken:
    """A populate whose result the store refused while a newer computation of its key was
    already under way in this process: its callers are to join ``flight``, that newer
    computation, instead of computing once more beside it."""

    flight: asyncio.Task[Entry | None]


#: Finds the newer computation of a key that a refused populate's callers should join.
NewerFlight = Callable[[], asyncio.Task[Entry | None] | None]


class Populator(Generic[V]):
    """Runs the populate protocol for a caching lookup (see the module docstring).

    ``usable`` says whether a stored entry answers a caller (the lookup's error-TTL
    policy); ``codec`` turns produced values into the JSON stored (None: they are JSON).
    """

    def __init__(
        self,
        store: Store,
        *,
        usable: Callable[[Entry | None], TypeGuard[Entry]],
        codec: Codec[V] | None,
        stats: LookupStats,
        compute_timeout: float,
        error_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._usable = usable
        self._codec = codec
        self._stats = stats
        self.compute_timeout = compute_timeout
        self._error_ttl = error_ttl
        self._clock = clock
        # produce() calls under way, each in its own task (see _produce). Added by
        # _produce, removed by each task's done callback, cancelled by close(). Event
        # loop only: no lock.
        self._producing: set[asyncio.Future[Any]] = set()

    async def populate(
        self,
        request: Request[V],
        *,
        on_stored: Callable[[Entry], object] | None = None,
        announce: tuple[str, str] | None = None,
        newer: NewerFlight | None = None,
    ) -> Entry | Overtaken | None:
        """The entry for ``request`` (stored, found, or returned unstored), or None when
        every candidate is missing. ``on_stored`` is called with an entry that is in the
        store (found there, or written) — not with one returned unstored. ``announce`` is
        a NOTIFY sent in the write's transaction (see ``Store.write``). ``newer`` is asked
        after a refused write for a newer computation of the key to join: if it names
        one, the answer is :class:`Overtaken` (no further attempt runs)."""
        timeout = asyncio.timeout(self.compute_timeout)
        try:
            async with timeout:
                outcome = await self._attempts(request, announce, newer)
                if isinstance(outcome, Overtaken):
                    return outcome
                entry, stored = outcome
                if stored and entry is not None and on_stored is not None:
                    on_stored(entry)
                return entry
        except TimeoutError:
            if not timeout.expired():
                raise  # the producer's own TimeoutError, not ours
            self._stats.compute_timeouts += 1
            raise ComputationTimeoutError(request.key.coalesce_key, self.compute_timeout) from None

    async def close(self, timeout: float) -> None:
        """Cancel the ``produce`` calls still running (those abandoned at their compute
        timeout included) and wait for them at most ``timeout`` seconds."""
        tasks = list(self._producing)
        for task in tasks:
            task.cancel()
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    async def _attempts(
        self, request: Request[V], announce: tuple[str, str] | None, newer: NewerFlight | None
    ) -> tuple[Entry | None, bool] | Overtaken:
        """The entry and whether it is in the store, or :class:`Overtaken`."""
        key = request.key
        by_alias = request.alias is not None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stamp, entry = await self.store.stamp_and_read(key, request.names, by_alias=by_alias)
            if self._usable(entry) and (
                request.newer_than is None or (entry.created_at or 0) > request.newer_than
            ):
                return entry, True
            outcome = await self._candidates(request, stamp, announce)
            if outcome is not _Refused.REFUSED:
                return outcome
            self._stats.stale_refused += 1
            flight = newer() if newer is not None else None
            if flight is not None:
                self._stats.overtaken += 1
                logger.info(
                    "the result for key %s was refused by the store (something it depends on "
                    "was invalidated while it was computed); its callers join the newer "
                    "computation already under way",
                    key.coalesce_key,
                )
                return Overtaken(flight)
            if attempt < MAX_ATTEMPTS:
                self._stats.restarts += 1
            logger.info(
                "the result for key %s was refused by the store: something it depends on "
                "was invalidated while it was computed (attempt %d of %d)",
                key.coalesce_key,
                attempt,
                MAX_ATTEMPTS,
            )
        logger.warning(
            "key %s was invalidated during each of %d computations; answering with what "
            "the store holds now",
            key.coalesce_key,
            MAX_ATTEMPTS,
        )
        entry = await self.store.read(key, by_alias=by_alias)
        return (entry, True) if self._usable(entry) else (None, False)

    async def _candidates(
        self, request: Request[V], stamp: Any, announce: tuple[str, str] | None
    ) -> tuple[Entry | None, bool] | _Refused:
        key = request.key
        for candidate in request.candidates:
            candidate_key = key.with_name(candidate)
            if candidate != key.name:
                entry = await self.store.read(candidate_key)
                if self._usable(entry):
                    return entry, True
            self._stats.computations += 1
            started = self._clock()  # the lookup's clock (a test's too), never below zero
            produced = await self._produce(request.produce, candidate_key)
            compute_ms = max(0, round((self._clock() - started) * 1000))
            if produced is MISSING:
                self._stats.missing += 1
                continue
            if not isinstance(produced, Produced):  # a bare value would fail untyped below
                raise InvalidInputError(
                    f"produce for key {candidate_key.coalesce_key} returned a "
                    f"{type(produced).__name__}; it must return Produced(value=...) or MISSING"
                )
            value = produced.value if self._codec is None else self._codec.encode(produced.value)
            created_at = int(self._clock() * 1000)
            if produced.error is None:
                expires_at, stale_until = deadlines(created_at, request.ttl, request.stale_ttl)
            else:  # an error lives for the error TTL (so it can be purged after)
                expires_at, stale_until = deadlines(created_at, self._error_ttl, None)
            entry = Entry(
                key=candidate_key,
                value=value,
                # A str would otherwise become one dep per character.
                deps=check_names(
                    f"the deps produced for key {candidate_key.coalesce_key}", produced.deps
                ),
                error=produced.error,
                created_at=created_at,
                alias=request.alias,
                diagnostics=produced.diagnostics,
                expires_at=expires_at,
                stale_until=stale_until,
                compute_ms=compute_ms,
            )
            if not produced.cacheable or (entry.error is not None and not request.persist_errors):
                # Returned, never stored: joined callers filter errors by their own wish.
                self._stats.not_persisted += 1
                return dataclasses.replace(entry, stored=False), False
            if not await self.store.write(entry, stamp=stamp, notify=announce):
                return _Refused.REFUSED
            if entry.error is not None:
                self._stats.errors_cached += 1
            return entry, True
        return None, False

    async def _produce(self, produce: Produce[V], key: Key) -> Produced[V] | Missing:
        """``produce(key)`` in a task of its own, so that the compute timeout (or close)
        answers this computation's callers at once even if ``produce`` ignores its
        cancellation: the task is cancelled and left behind, tracked until it ends (close()
        cancels it again and waits for it), and its late result goes nowhere."""
        task = asyncio.ensure_future(produce(key))
        self._producing.add(task)
        task.add_done_callback(self._producing.discard)
        try:
            # shield: our cancellation must not wait for produce to acknowledge its own.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            raise
