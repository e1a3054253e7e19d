"""Layer 3: populate coordination across the processes of a fleet."""

from fleetcache.coordination.base import (
    NOT_ACQUIRED,
    Acquired,
    NotAcquired,
    PopulateCoordinator,
    WakeReason,
    lock_id,
)

__all__ = [
    "NOT_ACQUIRED",
    "Acquired",
    "NotAcquired",
    "PopulateCoordinator",
    "WakeReason",
    "lock_id",
]
