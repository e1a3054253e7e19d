"""The counters of one caching lookup."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from fleetcache.coordination.base import WakeReason


@dataclass(slots=True)
class LookupStats:
    """Counters of one ``CachingLookup`` (monotonic, since construction). Incremented on
    the event loop only; read by ``as_dict``."""

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
    lock_won: int = 0
    lock_lost: int = 0
    waits: dict[str, int] = field(default_factory=dict)
    gave_up: int = 0
    stale_served: int = 0
    refreshes: int = 0
    early_refreshes: int = 0
    refresh_failures: int = 0
    refreshes_backed_off: int = 0
    purged: int = 0
    remote_invalidations: int = 0
    notification_gaps: int = 0

    def waited(self, reason: WakeReason) -> None:
        """Count one finished wait for another process."""
        self.waits[reason.value] = self.waits.get(reason.value, 0) + 1

    def as_dict(self) -> dict[str, int]:
        """The counters as a flat dict (waits as ``waits_<reason>``)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "waits"}
        for reason in WakeReason:
            flat[f"waits_{reason.value}"] = self.waits.get(reason.value, 0)
        return flat
