"""fleetcache: a fleet of processes computes each missing cache entry once, and an
invalidation is never undone by a computation that started before it.

Start with :func:`open` (a store, and on Postgres the LISTEN hub, invalidation broadcast
and optional cross-process coordination, from one URL) and its ``lookup``, a
:class:`CachingLookup`. The seed's domain lives in :mod:`fleetcache.definitions`.
"""

from fleetcache.errors import (
    ConfigurationError,
    CoordinationError,
    CoordinationGaveUpError,
    FleetcacheError,
    NotOpenError,
    SerializationError,
    StoreError,
)
from fleetcache.factory import Fleetcache, open_cache
from fleetcache.lookup import MISSING, CachingLookup, Missing, Produce, Produced
from fleetcache.stores import Entry, Key, MemoryStore, PostgresStore, SqliteStore, Store

#: ``fleetcache.open(url)``: see :func:`fleetcache.factory.open_cache`.
open = open_cache  # the front door, named as users expect (shadows the builtin here only)

__all__ = [
    "MISSING",
    "CachingLookup",
    "ConfigurationError",
    "CoordinationError",
    "CoordinationGaveUpError",
    "Entry",
    "Fleetcache",
    "FleetcacheError",
    "Key",
    "MemoryStore",
    "Missing",
    "NotOpenError",
    "PostgresStore",
    "Produce",
    "Produced",
    "SerializationError",
    "SqliteStore",
    "Store",
    "StoreError",
    "open",
    "open_cache",
]
