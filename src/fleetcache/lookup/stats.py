"""The counters of one caching lookup."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class LookupStats:
    """Counters of one ``CachingLookup`` (monotonic, since construction). Incremented on
    the event loop only; read by ``as_dict``. Locks and waits are the coordinator's to
    count (each event is counted once, where it happens)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    computations: int = 0
    missing: int = 0
    errors_cached: int = 0
    not_persisted: int = 0
    stale_refused: int = 0
    restarts: int = 0
    overtaken: int = 0
    compute_timeouts: int = 0
    gave_up: int = 0
    stale_served: int = 0
    refreshes: int = 0
    early_refreshes: int = 0
    refresh_failures: int = 0
    refreshes_backed_off: int = 0
    purged: int = 0
    remote_invalidations: int = 0
    notification_gaps: int = 0
    compute_ok: int = 0
    compute_failures: int = 0
    invalidations: int = 0
    invalidated_names: int = 0
    invalidated_dependents: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a flat dict."""
        return asdict(self)
