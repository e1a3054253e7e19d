"""The instrumentation hooks of a caching lookup: each get's outcome and latency, compute and
wait times (bucketed arrays, read by the Prometheus collector at scrape time) and, when a
tracer is given, spans. A lookup has none until ``fleetcache.contrib.prometheus`` or
``fleetcache.contrib.otel`` installs one, so an uninstrumented lookup pays one test per get."""

from __future__ import annotations

import hashlib
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import Any, TypeVar

from fleetcache.stores.base import Key

T = TypeVar("T")

#: How a get was answered (the ``outcome`` label): from the store, from the near tier, by
#: a computation it led here, by joining one under way here, by another process's
#: computation it waited for, with a stale value (a refresh started), or with an exception.
HIT = "hit"
NEAR_HIT = "near_hit"
MISS = "miss"
COALESCED = "coalesced"
WAITED = "waited"
STALE = "stale"
ERROR = "error"
OUTCOMES = (HIT, NEAR_HIT, MISS, COALESCED, WAITED, STALE, ERROR)
#: The ``namespace`` label of the gets of every namespace not asked for.
OTHER_NAMESPACE = "_other"
#: At most this many namespaces may be asked for (each one multiplies the get series).
MAX_NAMESPACES = 100

#: Histogram bucket upper bounds (seconds): from a near hit to a long computation.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    180.0,
)


class Buckets:
    """A histogram as counts per bucket (the last one past every bound) and their sum.
    Written on the event loop only (no lock: one writer); read by a scrape, which may see
    a count and a sum one observation apart."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation of ``seconds``."""
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """How many observations."""
        return sum(self.counts)


class _Get:
    """The outcome of the get being answered, which the flight it leads may change (to
    ``waited``): carried to the flight's task by a context variable (tasks copy it)."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome


_CURRENT: ContextVar[_Get | None] = ContextVar("fleetcache_get", default=None)


def note_waited() -> None:
    """The flight of the current get was answered by another process's computation."""
    current = _CURRENT.get()
    if current is not None and current.outcome == MISS:
        current.outcome = WAITED


def key_hash(key: Key) -> str:
    """A key as it appears in a span: the first 16 hex digits of the sha256 of its
    coalesce key (never the key in clear)."""
    return hashlib.sha256(key.coalesce_key.encode()).hexdigest()[:16]


class Observer:
    """What a lookup records about itself when asked: ``histograms`` (set by the Prometheus
    collector) turns on the bucketed arrays; ``tracer`` (an OpenTelemetry tracer, set by
    ``fleetcache.contrib.otel``) turns on a span per get that computes or waits, with
    child spans for the computation and the wait (``trace_hits``: hits get one too)."""

    def __init__(self) -> None:
        self.histograms = False
        self.tracer: Any = None
        self.trace_hits = False
        self.latency = {outcome: Buckets() for outcome in OUTCOMES}
        # Opt-in: gets also counted per namespace, for these namespaces only (the others
        # under OTHER_NAMESPACE), so the series stay bounded. Written by the loop (a new
        # namespace's row), read by a scrape.
        self.namespaces: frozenset[str] | None = None
        self.by_namespace: dict[str, dict[str, Buckets]] = {}
        self.compute = Buckets()
        self.wait = Buckets()
        # Near hits served on a sync caller's thread, apart from the loop's arrays (whose
        # only writer is the loop) and guarded by _threads: any thread writes, a scrape reads.
        self.threaded = {outcome: Buckets() for outcome in (HIT, NEAR_HIT, STALE)}
        self._threads = threading.Lock()

    def hit(self, key: Key, outcome: str, started: float) -> None:
        """A get answered at once (``hit``, ``near_hit`` or ``stale``)."""
        elapsed = time.perf_counter() - started
        if self.histograms:
            self.latency[outcome].observe(elapsed)
            if self.namespaces is not None:
                self._of_namespace(key.namespace)[outcome].observe(elapsed)
        self._hit_span(key, outcome, elapsed)

    def hit_from_thread(self, key: Key, outcome: str, started: float) -> None:
        """A hit served on a sync caller's thread (``near_hit`` or ``stale`` from the near
        tier; ``hit``: a store read on that thread, as sqlite's)."""
        elapsed = time.perf_counter() - started
        if self.histograms:
            with self._threads:
                self.threaded[outcome].observe(elapsed)
        self._hit_span(key, outcome, elapsed)

    def _hit_span(self, key: Key, outcome: str, elapsed: float) -> None:
        """A hit's span, ended now, when hits are traced."""
        if self.trace_hits and self.tracer is not None:
            now = time.time_ns()
            span = self.tracer.start_span(
                "fleetcache.get",
                start_time=now - int(elapsed * 1e9),
                attributes=_attributes(key, outcome),
            )
            span.end(end_time=now)

    def counts(self, outcome: str) -> Buckets:
        """The get latencies of ``outcome``, those observed on other threads included."""
        mine = self.latency[outcome]
        theirs = self.threaded.get(outcome)
        if theirs is None:
            return mine
        with self._threads:
            both = Buckets()
            both.counts = [a + b for a, b in zip(mine.counts, theirs.counts, strict=True)]
            both.sum = mine.sum + theirs.sum
        return both

    async def get(self, key: Key, outcome: str, started: float, answer: Awaitable[T]) -> T:
        """Await ``answer`` (a computation this get leads, or joins) as one observed get:
        its latency under its final outcome, in a span when tracing."""
        note = _Get(outcome)
        token = _CURRENT.set(note)
        try:
            if self.tracer is None:
                return await answer
            with self.tracer.start_as_current_span(
                "fleetcache.get", attributes=_attributes(key, outcome)
            ) as span:
                try:
                    result = await answer
                except BaseException:
                    note.outcome = ERROR
                    span.set_attribute("fleetcache.outcome", ERROR)
                    raise
                span.set_attribute("fleetcache.outcome", note.outcome)
                return result
        except BaseException:
            note.outcome = ERROR
            raise
        finally:
            _CURRENT.reset(token)
            if self.histograms:
                elapsed = time.perf_counter() - started
                self.latency[note.outcome].observe(elapsed)
                if self.namespaces is not None:
                    self._of_namespace(key.namespace)[note.outcome].observe(elapsed)

    def _of_namespace(self, namespace: str) -> dict[str, Buckets]:
        """The latency arrays of ``namespace`` (or of the namespaces not asked for)."""
        assert self.namespaces is not None
        label = namespace if namespace in self.namespaces else OTHER_NAMESPACE
        row = self.by_namespace.get(label)
        if row is None:
            row = self.by_namespace[label] = {outcome: Buckets() for outcome in OUTCOMES}
        return row

    async def computing(self, key: Key, produced: Awaitable[T]) -> T:
        """Await one ``produce`` call: its time, and a child span when tracing."""
        started = time.perf_counter()
        try:
            if self.tracer is None:
                return await produced
            with self.tracer.start_as_current_span(
                "fleetcache.compute", attributes={"fleetcache.key_hash": key_hash(key)}
            ):
                return await produced
        finally:
            if self.histograms:
                self.compute.observe(time.perf_counter() - started)

    async def waiting(self, key: Key, woken: Awaitable[T]) -> T:
        """Await one wait for another process's computation: its time, and a child span
        (with how it ended) when tracing."""
        started = time.perf_counter()
        try:
            if self.tracer is None:
                return await woken
            with self.tracer.start_as_current_span(
                "fleetcache.wait", attributes={"fleetcache.key_hash": key_hash(key)}
            ) as span:
                reason = await woken
                span.set_attribute("fleetcache.woken_by", str(reason))
                return reason
        finally:
            if self.histograms:
                self.wait.observe(time.perf_counter() - started)


def _attributes(key: Key, outcome: str) -> dict[str, str]:
    return {
        "fleetcache.namespace": key.namespace,
        "fleetcache.key_hash": key_hash(key),
        "fleetcache.outcome": outcome,
    }
