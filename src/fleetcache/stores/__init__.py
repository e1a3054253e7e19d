"""Layer 1: stores. One small contract (:class:`Store`), three backends."""

from fleetcache.stores.base import JSON, Entry, GenerationStamp, Key, Store
from fleetcache.stores.memory import MemoryStore
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore

__all__ = [
    "JSON",
    "Entry",
    "GenerationStamp",
    "Key",
    "MemoryStore",
    "PostgresStore",
    "SqliteStore",
    "Store",
]
