"""fleetcache: a fleet of processes computes each missing cache entry once, and an
invalidation is never undone by a computation that started before it.

Start with ``fleetcache.open(url)`` (a store, and on Postgres the LISTEN hub, invalidation
broadcast and cross-process coordination, from one URL): ``async with
fleetcache.open(url) as cache`` or ``cache = await fleetcache.open(url)``; from sync code,
``with fleetcache.open_sync(url) as cache``. ``open`` is not
exported by ``from fleetcache import *``, so it never shadows the builtin. The seed's
domain lives in :mod:`fleetcache.definitions`.
"""

from fleetcache.errors import (
    CachedError,
    ComputationInterruptedError,
    ComputationTimeoutError,
    ConfigurationError,
    CoordinationError,
    CoordinationGaveUpError,
    DatabaseConnectError,
    FleetcacheError,
    InvalidInputError,
    NotOpenError,
    SchemaMissingError,
    SchemaVersionError,
    SerializationError,
    StoreError,
)
from fleetcache.factory import Fleetcache
from fleetcache.factory import open as open  # re-exported; kept out of __all__ on purpose
from fleetcache.lookup import MISSING, CachingLookup, Codec, Missing, Produce, Produced
from fleetcache.stores import Entry, Key, MemoryStore, PostgresStore, SqliteStore, Store
from fleetcache.stores.codecs import ValueCodec
from fleetcache.sync import SyncCachedFunction, SyncFleetcache, open_sync

__all__ = [
    "MISSING",
    "CachedError",
    "CachingLookup",
    "Codec",
    "ComputationInterruptedError",
    "ComputationTimeoutError",
    "ConfigurationError",
    "CoordinationError",
    "CoordinationGaveUpError",
    "DatabaseConnectError",
    "Entry",
    "Fleetcache",
    "FleetcacheError",
    "InvalidInputError",
    "Key",
    "MemoryStore",
    "Missing",
    "NotOpenError",
    "PostgresStore",
    "Produce",
    "Produced",
    "SchemaMissingError",
    "SchemaVersionError",
    "SerializationError",
    "SqliteStore",
    "Store",
    "StoreError",
    "SyncCachedFunction",
    "SyncFleetcache",
    "ValueCodec",
    "open_sync",
]
