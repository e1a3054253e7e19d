"""Layer 3: populate coordination across the processes of a fleet."""

from fleetcache.coordination.base import (
    NOT_ACQUIRED,
    Acquired,
    NotAcquired,
    PopulateCoordinator,
    WakeReason,
    lock_id,
)
from fleetcache.coordination.local import LocalCoordinator
from fleetcache.coordination.postgres import POPULATED_CHANNEL, PostgresCoordinator

__all__ = [
    "NOT_ACQUIRED",
    "POPULATED_CHANNEL",
    "Acquired",
    "LocalCoordinator",
    "NotAcquired",
    "PopulateCoordinator",
    "PostgresCoordinator",
    "WakeReason",
    "lock_id",
]
