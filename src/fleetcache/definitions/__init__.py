"""Layer 6: the seed's domain — module definitions cached over a prerenderer.

The public names below are part of the contract; a simulated prerender server to test
against is in :mod:`fleetcache.definitions.testing`.
"""

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
    "PrerenderError",
    "PrerenderRequestInvalidError",
    "PrerenderTimeoutError",
    "Prerenderer",
    "Realm",
    "RealmDefinitionLookup",
    "RetryPolicy",
    "coalesce_flag_enabled",
    "seed_open_options",
]
