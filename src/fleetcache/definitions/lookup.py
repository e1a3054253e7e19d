"""``CachingDefinitionLookup``: the seed's module-definitions cache, on the generic cache.

One entry per module, stored as the prerenderer sent it. Single flight, staleness, error TTL
and fleet coordination come from the generic cache it is made over; this layer adds URLs,
realms, candidates, "missing module" and dependency-error aggregation.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

from fleetcache.definitions.errors import FilterRefersToNonexistentTypeError
from fleetcache.definitions.models import (
    CodeRef,
    DefinitionEntry,
    DefinitionResult,
    ModuleErrorEntry,
    ModuleRenderResponse,
    Realm,
    SerializedError,
    error_deps,
    is_error_entry,
)
from fleetcache.definitions.prerenderer import Prerenderer
from fleetcache.definitions.urls import (
    absolute_deps,
    candidates,
    canonicalize,
    internal_key_for,
    invalidation_variants,
    is_missing_module,
    trim_executable_extension,
)
from fleetcache.errors import ConfigurationError
from fleetcache.factory import Fleetcache
from fleetcache.logcontext import get_logger
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.populate import MISSING, Missing, Produce, Produced
from fleetcache.stores.base import Entry, Key

logger = get_logger("fleetcache.definitions")

CacheScope = Literal["public", "realm-auth"]

# The modules whose dependency errors are being gathered in this chain of calls; a module
# already in it is not looked up again, so a chain never waits on itself. Copied into every
# task a computation starts, so it follows the chain across flights. Two chains started
# independently can still wait on each other (M gathering D while D gathers M); that wait
# is bounded by aggregation_timeout, after which M's error is answered but not cached.
_gathering: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "fleetcache_gathering", default=frozenset()
)


@dataclass(frozen=True, slots=True)
class ModuleDefinitions:
    """A module's cached render: its definitions (or error), deps and where it is stored.

    ``definitions`` is keyed by internal key (``<module URL without extension>/<export>``).
    ``cached`` is False for an answer that was not stored: an error whose dependencies'
    errors could not all be gathered within the aggregation timeout (asked again, the
    module is rendered again).
    """

    module_url: str
    resolved_realm_url: str
    cache_scope: str
    cache_user_id: str
    definitions: dict[str, DefinitionResult]
    deps: list[str]
    error: ModuleErrorEntry | None
    created_at: int | None
    diagnostics: dict[str, Any] | None
    cached: bool = True

    @classmethod
    def from_entry(cls, entry: Entry) -> ModuleDefinitions:
        """The definitions view of a cache entry."""
        return cls(
            module_url=entry.key.name,
            resolved_realm_url=entry.key.namespace,
            cache_scope=entry.key.scope,
            cache_user_id=entry.key.user,
            definitions=cast(dict[str, DefinitionResult], entry.value),
            deps=list(entry.deps),
            error=cast(ModuleErrorEntry | None, entry.error),
            created_at=entry.created_at if entry.stored else None,
            diagnostics=cast(dict[str, Any] | None, entry.diagnostics),
            cached=entry.stored,
        )


def cache_scope_for(realm: Realm) -> tuple[CacheScope, str]:
    """The (scope, user) a realm's rows are written and read under."""
    if realm.visibility == "public":
        return "public", ""
    return "realm-auth", realm.owner_user_id


def flatten_meta(response: ModuleRenderResponse) -> dict[str, Any] | None:
    """``meta`` as one JSON object, as the seed's ``flattenPrerenderMeta`` makes it: the
    diagnostics' keys plus ``requestId``; None when there is nothing."""
    if response.meta is None:
        return None
    flat: dict[str, Any] = copy.deepcopy(response.meta.get("diagnostics") or {})
    if response.meta.get("requestId") is not None:
        flat["requestId"] = response.meta["requestId"]
    return flat or None


class CachingDefinitionLookup:
    """Module definitions through a read-through cache over a :class:`Prerenderer`.

    Made over an open cache (``fleetcache.open(url)``) or its lookup (``cache.lookup``),
    whose every option applies: its store, fleet coordination and invalidation broadcast,
    near tier, expiry, codec, error TTL and bounds. Register the realms whose modules it
    may look up (``register_realm``). ``aggregation_timeout`` bounds how long a failing
    module waits, in all, for its dependencies' errors; beyond it the errors already
    cached are listed and, if some dependency's outcome is still unknown, the error is
    answered but not cached.
    """

    def __init__(
        self,
        cache: Fleetcache | CachingLookup[Any],
        prerenderer: Prerenderer,
        *,
        aggregation_timeout: float = 30.0,
    ) -> None:
        if isinstance(cache, Fleetcache):
            cache = cache.lookup
        if not isinstance(cache, CachingLookup):
            raise ConfigurationError(
                "CachingDefinitionLookup is made over an open cache (fleetcache.open) or its "
                f"lookup, not a {type(cache).__name__}"
            )
        if (
            isinstance(aggregation_timeout, bool)
            or not isinstance(aggregation_timeout, int | float)
            or not (math.isfinite(aggregation_timeout) and aggregation_timeout > 0)
        ):
            raise ConfigurationError(
                f"aggregation_timeout must be a number of seconds > 0, got {aggregation_timeout!r}"
            )
        self.lookup: CachingLookup[Any] = cache
        self.prerenderer = prerenderer
        self.aggregation_timeout = float(aggregation_timeout)
        # Registered realms by URL; written by register_realm, read by every lookup.
        self._realms: dict[str, Realm] = {}

    # ----------------------------------------------------------------- realms

    def register_realm(self, realm: Realm) -> None:
        """Let modules under ``realm.url`` be looked up (re-registering replaces it)."""
        self._realms[realm.url] = realm

    def for_realm(self, realm: Realm) -> RealmDefinitionLookup:
        """Register ``realm`` and return a view whose lookups stay inside it."""
        self.register_realm(realm)
        return RealmDefinitionLookup(self, realm)

    def realm_of(self, module_url: str) -> Realm | None:
        """The registered realm whose URL is the longest prefix of ``module_url``."""
        url = canonicalize(module_url)
        matches = [realm for prefix, realm in self._realms.items() if url.startswith(prefix)]
        return max(matches, key=lambda realm: len(realm.url), default=None)

    # ---------------------------------------------------------------- lookups

    async def lookup_definition(
        self, code_ref: CodeRef, *, priority: int | None = None
    ) -> DefinitionEntry:
        """The definition ``code_ref`` names, rendering its module on a miss.

        Raises :class:`FilterRefersToNonexistentTypeError` when the module is outside every
        registered realm, does not exist, failed to render, or has no such export.
        """
        realm = self.realm_of(code_ref.module)
        if realm is None:
            raise FilterRefersToNonexistentTypeError(
                code_ref, "the module is not in any registered realm"
            )
        module = await self._get(code_ref.module, realm, priority)
        return _definition_in(code_ref, module)

    async def lookup_cached_definition(self, code_ref: CodeRef) -> DefinitionEntry | None:
        """The definition ``code_ref`` names if its module is cached and rendered; never
        renders and never raises for a missing or failed module."""
        module = await self._peek(code_ref.module)
        if module is None:
            return None
        try:
            return _definition_in(code_ref, module)
        except FilterRefersToNonexistentTypeError:
            return None

    async def get_cached_definitions(
        self, module_url: str, *, priority: int | None = None
    ) -> ModuleDefinitions | None:
        """The module's cached render (rendering it on a miss); None when the module is
        outside every registered realm or does not exist."""
        realm = self.realm_of(module_url)
        if realm is None:
            return None
        return await self._get(module_url, realm, priority)

    async def populate_definition_cache_entry(
        self,
        *,
        module_url: str,
        realm_url: str,
        resolved_realm_url: str,
        cache_scope: str,
        cache_user_id: str,
        prerender_user_id: str,
        priority: int | None = None,
    ) -> ModuleDefinitions | None:
        """Pre-warm one module under exactly the key a later lookup reads
        (``resolved_realm_url``, ``cache_scope``, ``cache_user_id``); an error is never
        stored (the answer is then None)."""
        url = canonicalize(module_url)
        key = Key(resolved_realm_url, url, cache_scope, cache_user_id)
        entry = await self.lookup.get(
            key,
            self._producer(realm_url, prerender_user_id, priority),
            candidates=candidates(url),
            alias=trim_executable_extension(url),
            persist_errors=False,
        )
        return (
            None
            if entry is None or entry.error is not None
            else ModuleDefinitions.from_entry(entry)
        )

    # ------------------------------------------------------------ invalidation

    async def invalidate(self, module_url: str, *, conn: Any = None) -> list[str]:
        """Invalidate a module (every URL variant it may be stored under) and, transitively,
        its dependents in its realm; return the URLs invalidated. A URL outside every
        registered realm invalidates nothing and returns ``[]``. ``conn`` (Postgres): the
        realm writer's psycopg ``AsyncConnection`` in its open transaction, so the
        invalidation commits, or rolls back, with the realm write."""
        realm = self.realm_of(module_url)
        if realm is None:
            return []
        return await self.lookup.invalidate(
            realm.url, [canonicalize(module_url)], expand=invalidation_variants, conn=conn
        )

    async def clear_realm_definitions(self, resolved_realm_url: str) -> None:
        """Delete every cached module of a realm (registered or not)."""
        await self.lookup.clear_namespace(resolved_realm_url)

    async def clear_all_definitions(self) -> None:
        """Delete every cached module."""
        await self.lookup.clear_all()

    def stats(self) -> dict[str, int]:
        """The generic lookup's counters (see ``CachingLookup.stats``)."""
        return self.lookup.stats()

    # --------------------------------------------------------------- internals

    def _key(self, module_url: str, realm: Realm) -> Key:
        scope, user = cache_scope_for(realm)
        return Key(realm.url, canonicalize(module_url), scope, user)

    async def _get(
        self, module_url: str, realm: Realm, priority: int | None
    ) -> ModuleDefinitions | None:
        url = canonicalize(module_url)
        entry = await self.lookup.get(
            self._key(url, realm),
            self._producer(realm.url, realm.owner_user_id, priority),
            candidates=candidates(url),
            alias=trim_executable_extension(url),
        )
        return None if entry is None else ModuleDefinitions.from_entry(entry)

    async def _peek(self, module_url: str) -> ModuleDefinitions | None:
        realm = self.realm_of(module_url)
        if realm is None:
            return None
        entry = await self.lookup.peek(self._key(module_url, realm), by_alias=True)
        return None if entry is None else ModuleDefinitions.from_entry(entry)

    def _producer(self, realm_url: str, user_id: str, priority: int | None) -> Produce[Any]:
        async def produce(key: Key) -> Produced[Any] | Missing:
            candidate = key.name
            response = await self.prerenderer.prerender_module(
                url=candidate, realm_url=realm_url, user_id=user_id, priority=priority
            )
            if is_missing_module(response, candidate):
                return MISSING
            deps = absolute_deps([*response.deps, *error_deps(response.error)], candidate)
            error = response.error
            unknown: list[str] = []
            if error is not None:
                error, unknown = await self._with_dependency_errors(error, candidate, priority)
            if unknown:
                logger.warning(
                    "the error of %r is answered but not cached: the errors of %d "
                    "dependencies (%s) could not be gathered within %g s",
                    candidate,
                    len(unknown),
                    ", ".join(unknown),
                    self.aggregation_timeout,
                )
            return Produced(
                value=response.definitions,
                deps=deps,
                error=error,
                diagnostics=flatten_meta(response),
                cacheable=not unknown,  # an incomplete aggregation is never cached
            )

        return produce

    async def _with_dependency_errors(
        self, error: ModuleErrorEntry, module_url: str, priority: int | None
    ) -> tuple[ModuleErrorEntry, list[str]]:
        """``error`` with absolute deps and, appended to ``additionalErrors``, the errors of
        the failing dependencies (each as stored), breadth-first and de-duplicated; and
        the dependencies whose outcome could not be had within the aggregation timeout
        (when there are any, the error is incomplete)."""
        detail = error["error"]
        deps = absolute_deps(error_deps(error), module_url)
        chain = _gathering.get() | {trim_executable_extension(module_url)}
        received = detail.get("additionalErrors")
        additional: list[Any] = list(received) if isinstance(received, list) else []
        seen_errors = {_error_key(e) for e in additional if isinstance(e, dict)}
        seen_errors.add(_error_key(detail))
        added = False
        unknown: list[str] = []
        seen = set(chain)
        queue = [dep for dep in deps if dep not in seen]
        deadline = asyncio.get_running_loop().time() + self.aggregation_timeout
        token = _gathering.set(chain)
        try:
            while queue:
                dep = queue.pop(0)
                if dep in seen:
                    continue
                seen.add(dep)
                dep_module, known = await self._dependency(dep, priority, deadline)
                if not known:
                    unknown.append(dep)
                if dep_module is None or dep_module.error is None:
                    continue
                dep_detail = dep_module.error["error"]
                if _error_key(dep_detail) not in seen_errors:
                    seen_errors.add(_error_key(dep_detail))
                    dep_error = copy.deepcopy(dep_detail)
                    dep_error.setdefault("additionalErrors", None)  # absent is null, as the seed
                    additional.append(dep_error)
                    added = True
                queue.extend(d for d in error_deps(dep_module.error) if d not in seen)
        finally:
            _gathering.reset(token)
        merged: SerializedError = {
            **detail,
            "deps": deps,
            # As received (null when absent) unless dependency errors were added.
            "additionalErrors": additional if added else received,
        }
        return {**error, "error": merged}, unknown

    async def _dependency(
        self, dep_url: str, priority: int | None, deadline: float
    ) -> tuple[ModuleDefinitions | None, bool]:
        """A dependency's render through the cache, waiting until ``deadline`` (loop time)
        at most, then only reading what is cached; and whether its outcome is known (an
        answer, or "it does not exist"), which it is not when neither gave one."""
        realm = self.realm_of(dep_url)
        if realm is None:
            return None, True  # outside every registered realm: nothing to gather
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            try:
                return await asyncio.wait_for(self._get(dep_url, realm, priority), remaining), True
            except TimeoutError:
                logger.warning(
                    "gave up waiting for the errors of dependency %r (aggregation timeout %.1f s)",
                    dep_url,
                    self.aggregation_timeout,
                )
        cached = await self._peek(dep_url)
        return cached, cached is not None


class RealmDefinitionLookup:
    """``CachingDefinitionLookup`` seen from one realm: lookups outside it find nothing."""

    def __init__(self, parent: CachingDefinitionLookup, realm: Realm) -> None:
        self.parent = parent
        self.realm = realm

    def _inside(self, module_url: str) -> bool:
        return canonicalize(module_url).startswith(self.realm.url)

    async def lookup_definition(
        self, code_ref: CodeRef, *, priority: int | None = None
    ) -> DefinitionEntry:
        """As ``CachingDefinitionLookup.lookup_definition``, for modules of this realm."""
        if not self._inside(code_ref.module):
            raise FilterRefersToNonexistentTypeError(
                code_ref, f"the module is not in realm {self.realm.url}"
            )
        module = await self.parent._get(code_ref.module, self.realm, priority)
        return _definition_in(code_ref, module)

    async def get_cached_definitions(
        self, module_url: str, *, priority: int | None = None
    ) -> ModuleDefinitions | None:
        """As ``CachingDefinitionLookup.get_cached_definitions``, for modules of this realm."""
        if not self._inside(module_url):
            return None
        return await self.parent._get(module_url, self.realm, priority)

    async def invalidate(self, module_url: str, *, conn: Any = None) -> list[str]:
        """As ``CachingDefinitionLookup.invalidate``, for modules of this realm."""
        if not self._inside(module_url):
            return []
        return await self.parent.invalidate(module_url, conn=conn)


def _definition_in(code_ref: CodeRef, module: ModuleDefinitions | None) -> DefinitionEntry:
    if module is None:
        raise FilterRefersToNonexistentTypeError(code_ref, "the module does not exist")
    if module.error is not None:
        raise FilterRefersToNonexistentTypeError(
            code_ref, f"the module failed to render: {module.error['error']['message']}"
        )
    # Definitions are filed by internal key, so x and x.gts name the same definition.
    found = module.definitions.get(internal_key_for(code_ref))
    if found is None:
        raise FilterRefersToNonexistentTypeError(code_ref, "the module has no such export")
    if is_error_entry(found):
        message = cast(ModuleErrorEntry, found)["error"]["message"]
        raise FilterRefersToNonexistentTypeError(
            code_ref, f"the export failed to render: {message}"
        )
    return cast(DefinitionEntry, found)


def _error_key(detail: Any) -> tuple[object, object, object]:
    """How the seed's system tells two errors apart when aggregating: id, message, status."""
    return (detail.get("id"), detail.get("message"), detail.get("status"))


__all__ = [
    "CachingDefinitionLookup",
    "ModuleDefinitions",
    "RealmDefinitionLookup",
    "cache_scope_for",
    "flatten_meta",
]
