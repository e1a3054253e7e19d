"""Layer 5: the generic caching lookup."""

from fleetcache.lookup.caching import (
    MISSING,
    CachingLookup,
    InvalidationPublisher,
    Missing,
    Produce,
    Produced,
)

__all__ = ["MISSING", "CachingLookup", "InvalidationPublisher", "Missing", "Produce", "Produced"]
