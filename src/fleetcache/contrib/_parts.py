"""What the exporters find in a cache they are given: its lookup and its other parts."""

from __future__ import annotations

from typing import Any

from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import CachingLookup


def parts_of(cache: Any) -> tuple[CachingLookup[Any], Any]:
    """The lookup of ``cache`` (a Fleetcache, a SyncFleetcache or a CachingLookup) and the
    object holding its other parts (store, coordinator, hub): the lookup itself for a bare
    lookup."""
    parts = getattr(cache, "async_cache", cache)  # a SyncFleetcache wraps a Fleetcache
    lookup = parts if isinstance(parts, CachingLookup) else getattr(parts, "lookup", None)
    if not isinstance(lookup, CachingLookup):
        raise ConfigurationError(
            f"cannot instrument a {type(cache).__name__}: give a Fleetcache, a SyncFleetcache "
            "or a CachingLookup"
        )
    return lookup, parts
