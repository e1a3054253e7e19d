"""Layer 3: populate coordination across the processes of a fleet."""

from fleetcache.coordination.base import Acquired, PopulateCoordinator, WakeReason, lock_id
from fleetcache.coordination.local import LocalCoordinator
from fleetcache.coordination.postgres import POPULATED_CHANNEL, PostgresCoordinator
from fleetcache.coordination.waiters import Waiter, WaiterRegistry

__all__ = [
    "POPULATED_CHANNEL",
    "Acquired",
    "LocalCoordinator",
    "PopulateCoordinator",
    "PostgresCoordinator",
    "Waiter",
    "WaiterRegistry",
    "WakeReason",
    "lock_id",
]
