"""Layer 6: the seed's domain — module definitions cached over a prerenderer.

The public names below are part of the contract.
"""

from fleetcache.definitions.errors import (
    FilterRefersToNonexistentTypeError,
    MalformedRenderResponseError,
    PrerenderError,
)
from fleetcache.definitions.lookup import (
    CachingDefinitionLookup,
    ModuleDefinitions,
    RealmDefinitionLookup,
)
from fleetcache.definitions.models import CodeRef, ModuleRenderResponse, Realm
from fleetcache.definitions.prerenderer import HttpPrerenderer, Prerenderer
from fleetcache.definitions.simulated import ModuleSpec, SimulatedPrerenderServer

__all__ = [
    "CachingDefinitionLookup",
    "CodeRef",
    "FilterRefersToNonexistentTypeError",
    "HttpPrerenderer",
    "MalformedRenderResponseError",
    "ModuleDefinitions",
    "ModuleRenderResponse",
    "ModuleSpec",
    "Prerenderer",
    "PrerenderError",
    "Realm",
    "RealmDefinitionLookup",
    "SimulatedPrerenderServer",
]
