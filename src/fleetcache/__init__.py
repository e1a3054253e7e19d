"""fleetcache: a fleet of processes computes each missing cache entry once, and an
invalidation is never undone by a computation that started before it. Open one with
``fleetcache.open(url)`` (or ``open_sync``); the names in ``__all__`` (and ``open``) are the
public API, listed in the README's reference. The module-definitions domain built on it is
:mod:`fleetcache.definitions`."""

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
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.codec import Codec
from fleetcache.lookup.populate import MISSING, Missing, Produced
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.codecs import ValueCodec
from fleetcache.sync import SyncFleetcache, open_sync

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
    "Missing",
    "NotOpenError",
    "Produced",
    "SchemaMissingError",
    "SchemaVersionError",
    "SerializationError",
    "StoreError",
    "SyncFleetcache",
    "ValueCodec",
    "open_sync",
]
