"""Layer 5: the generic caching lookup."""

from fleetcache.lookup.caching import CachingLookup, InvalidationPublisher
from fleetcache.lookup.codec import Codec
from fleetcache.lookup.populate import MISSING, Missing, Produce, Produced
from fleetcache.lookup.singleflight import SingleFlight

__all__ = [
    "MISSING",
    "CachingLookup",
    "Codec",
    "InvalidationPublisher",
    "Missing",
    "Produce",
    "Produced",
    "SingleFlight",
]
