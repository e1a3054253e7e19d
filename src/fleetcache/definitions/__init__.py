"""Layer 6: the seed's domain — module definitions cached over a prerenderer.

The public names below are part of the contract.
"""

from typing import TYPE_CHECKING, Any

from fleetcache.definitions.errors import (
    FilterRefersToNonexistentTypeError,
    MalformedRenderResponseError,
    PrerenderError,
    PrerenderRequestInvalidError,
    PrerenderTimeoutError,
)
from fleetcache.definitions.lookup import (
    CachingDefinitionLookup,
    ModuleDefinitions,
    RealmDefinitionLookup,
)
from fleetcache.definitions.models import CodeRef, ModuleRenderResponse, Realm
from fleetcache.definitions.prerenderer import (
    AuthProvider,
    HttpPrerenderer,
    Prerenderer,
    RetryPolicy,
)
from fleetcache.definitions.setup import (
    COALESCE_FLAG,
    SEED_INVALIDATED_CHANNEL,
    SEED_POPULATED_CHANNEL,
    coalesce_flag_enabled,
    seed_open_options,
)

if TYPE_CHECKING:
    from fleetcache.definitions.simulated import ModuleSpec, SimulatedPrerenderServer


def __getattr__(name: str) -> Any:
    # The simulated server is imported on first use, so that running it as a module
    # (python -m fleetcache.definitions.simulated) does not import it twice.
    if name in {"ModuleSpec", "SimulatedPrerenderServer"}:
        from fleetcache.definitions import simulated  # noqa: PLC0415

        return getattr(simulated, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COALESCE_FLAG",
    "SEED_INVALIDATED_CHANNEL",
    "SEED_POPULATED_CHANNEL",
    "AuthProvider",
    "CachingDefinitionLookup",
    "CodeRef",
    "FilterRefersToNonexistentTypeError",
    "HttpPrerenderer",
    "MalformedRenderResponseError",
    "ModuleDefinitions",
    "ModuleRenderResponse",
    "ModuleSpec",
    "PrerenderError",
    "PrerenderRequestInvalidError",
    "PrerenderTimeoutError",
    "Prerenderer",
    "Realm",
    "RealmDefinitionLookup",
    "RetryPolicy",
    "SimulatedPrerenderServer",
    "coalesce_flag_enabled",
    "seed_open_options",
]
