"""How the seed's system sets fleetcache up: its flag and its channel names.

A deployment beside the seed's servers uses them, so the two sides hear each other::

    cache = await fleetcache.open(database_url, **seed_open_options())
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

#: The seed's environment flag: "true" turns cross-process coordination on (default off).
COALESCE_FLAG = "PRERENDER_COALESCE_ACROSS_PROCESSES"
#: The seed's channel for "a module's definitions were populated" (payload: the lock id).
SEED_POPULATED_CHANNEL = "module_cache_populated"
#: The seed's channel for invalidation broadcasts.
SEED_INVALIDATED_CHANNEL = "module_cache_invalidated"


def coalesce_flag_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the seed's flag is set to true (``true``, ``1``, ``yes`` or ``on``)."""
    value = (os.environ if environ is None else environ).get(COALESCE_FLAG, "")
    return value.strip().lower() in {"true", "1", "yes", "on"}


def seed_open_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Options for ``fleetcache.open`` as the seed's system sets things up: coordination
    only when its flag says so, and its channel names."""
    return {
        "coordinate": coalesce_flag_enabled(environ),
        "populated_channel": SEED_POPULATED_CHANNEL,
        "invalidated_channel": SEED_INVALIDATED_CHANNEL,
    }
