"""OpenTelemetry traces for fleetcache (the ``otel`` extra, the API only: the application
brings the SDK): ``instrument(cache)`` gives a span to each get that computes or waits,
with child spans for the computation and the wait. Explicit, so a cache nobody
instrumented never imports OpenTelemetry nor pays a check per get."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from fleetcache.contrib._parts import parts_of
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.observe import Observer

__all__ = ["instrument", "uninstrument"]

#: The instrumentation scope spans are reported under.
TRACER_NAME = "fleetcache"


def instrument(
    cache: Any,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    trace_hits: bool = False,
) -> None:
    """Trace ``cache`` (a :class:`~fleetcache.Fleetcache`, a ``SyncFleetcache`` or a
    :class:`~fleetcache.lookup.caching.CachingLookup`) with a tracer of ``tracer_provider``
    (default: the global one, so spans go wherever the application's SDK sends them).

    A get that computes or waits gets a ``fleetcache.get`` span with
    ``fleetcache.namespace``, ``fleetcache.key_hash`` (16 hex digits of the sha256 of its
    coalesce key: never the key in clear) and ``fleetcache.outcome`` (``miss``,
    ``coalesced``, ``waited`` or ``error``); its ``fleetcache.compute`` and
    ``fleetcache.wait`` children (the wait says ``fleetcache.woken_by``) time the
    ``produce`` call and each wait for another process. Hits get a span only with
    ``trace_hits``. The spans join the caller's current trace."""
    lookup = _lookup(cache)
    observer = lookup.observer
    if observer is None:
        observer = lookup.observer = Observer()
    observer.tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    observer.trace_hits = trace_hits


def uninstrument(cache: Any) -> None:
    """Stop tracing ``cache``."""
    observer = _lookup(cache).observer
    if observer is not None:
        observer.tracer = None
        observer.trace_hits = False


def _lookup(cache: Any) -> CachingLookup[Any]:
    return parts_of(cache)[0]
