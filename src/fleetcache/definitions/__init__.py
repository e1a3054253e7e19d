"""Layer 6: the seed's domain — module definitions cached over a prerenderer.

The names in ``__all__`` are its public API (listed in the README's reference); a simulated
prerender server to test against is in :mod:`fleetcache.definitions.testing`.
"""

from fleetcache.definitions.errors import (
    DefinitionsError,
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
from fleetcache.definitions.setup import seed_open_options

__all__ = [
    "AuthProvider",
    "CachingDefinitionLookup",
    "CodeRef",
    "DefinitionsError",
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
    "seed_open_options",
]
