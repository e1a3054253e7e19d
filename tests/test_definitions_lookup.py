"""CachingDefinitionLookup on every store, over an in-process prerenderer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import fleetcache
from fleetcache.definitions.errors import FilterRefersToNonexistentTypeError
from fleetcache.definitions.lookup import CachingDefinitionLookup
from fleetcache.definitions.models import (
    CodeRef,
    ModuleRenderResponse,
    Realm,
    definition_entry,
    module_error,
)
from fleetcache.definitions.setup import coalesce_flag_enabled, seed_open_options
from fleetcache.definitions.urls import trim_executable_extension
from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.stores.base import Key, Store
from fleetcache.stores.postgres import PostgresStore

PUBLIC = Realm("https://pub.example/", "public", "owner-pub")
PRIVATE = Realm("https://priv.example/", "private", "owner-priv")
OTHER = "https://elsewhere.example/"


@dataclass
class Spec:
    """One module of the fake graph."""

    exports: list[str] = field(default_factory=lambda: ["Card"])
    imports: list[str] = field(default_factory=list)
    fail: str | None = None
    meta: bool = True


@dataclass
class GraphPrerenderer:
    """A prerenderer over a module graph in memory; counts renders per URL."""

    graph: dict[str, Spec] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    versions: Counter[str] = field(default_factory=Counter)
    # A render of a URL with a gate waits until the gate is set.
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def renders(self, url: str) -> int:
        """How many times ``url`` was rendered."""
        return sum(1 for call in self.calls if call["url"] == url)

    def change(self, url: str, spec: Spec) -> None:
        """Edit a module: a new spec and a new version."""
        self.graph[url] = spec
        self.versions[url] += 1

    def _failing(self, url: str, seen: set[str]) -> bool:
        spec = self.graph.get(url)
        if spec is None or spec.fail:
            return True
        seen.add(url)
        return any(self._failing(dep, seen) for dep in spec.imports if dep not in seen)

    async def prerender_module(
        self, *, url: str, realm_url: str, user_id: str, priority: int | None
    ) -> ModuleRenderResponse:
        """Render ``url`` from the graph."""
        self.calls.append(
            {"url": url, "realm_url": realm_url, "user_id": user_id, "priority": priority}
        )
        if url in self.gates:
            await self.gates[url].wait()
        spec = self.graph.get(url)
        if spec is None:
            return ModuleRenderResponse("error", error=module_error(f"{url} not found", 404))
        if spec.fail:
            return ModuleRenderResponse(
                "error", deps=spec.imports, error=module_error(spec.fail, 500)
            )
        failing = [dep for dep in spec.imports if self._failing(dep, {url})]
        if failing:
            return ModuleRenderResponse(
                "error",
                deps=spec.imports,
                error=module_error(f"{url}: a dependency failed", 500, failing),
            )
        version = self.versions[url]
        alias = trim_executable_extension(url)
        definitions: dict[str, Any] = {
            f"{alias}/{name}": definition_entry(alias, {"name": name, "version": version})
            for name in spec.exports
        }
        meta: Any = {"requestId": f"req-{len(self.calls)}", "diagnostics": {"renderMs": 5}}
        return ModuleRenderResponse(
            "ready", definitions=definitions, deps=spec.imports, meta=meta if spec.meta else None
        )


def url(realm: Realm, path: str) -> str:
    """A module URL in ``realm``."""
    return realm.url + path


def make_lookup(store: Store, prerenderer: GraphPrerenderer, **kw: Any) -> CachingDefinitionLookup:
    """A definitions lookup with both test realms registered."""
    lookup = CachingDefinitionLookup(CachingLookup(store), prerenderer, **kw)
    lookup.register_realm(PUBLIC)
    lookup.register_realm(PRIVATE)
    return lookup


async def test_read_through_second_lookup_does_not_prerender(store: Store) -> None:
    """The second lookup of a module is served from the cache with no prerender."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    ref = CodeRef(url(PUBLIC, "a"), "Card")
    first = await lookup.lookup_definition(ref)
    second = await lookup.lookup_definition(ref)
    assert first == second
    assert first["definition"]["name"] == "Card"
    assert pre.renders(url(PUBLIC, "a.gts")) == 1


async def test_bare_url_tries_candidates_and_stores_under_the_extension(store: Store) -> None:
    """A bare URL tries .gts first, stores under it with the alias, and later hits by alias."""
    pre = GraphPrerenderer({url(PUBLIC, "a.ts"): Spec()})
    lookup = make_lookup(store, pre)
    module = await lookup.get_cached_definitions(url(PUBLIC, "a"))
    assert module is not None
    assert module.module_url == url(PUBLIC, "a.ts")
    assert [c["url"] for c in pre.calls] == [url(PUBLIC, "a.gts"), url(PUBLIC, "a.ts")]
    row = await store.read(Key(PUBLIC.url, url(PUBLIC, "a")), by_alias=True)
    assert row is not None
    assert row.alias == url(PUBLIC, "a")
    assert await lookup.get_cached_definitions(url(PUBLIC, "a.ts?x=1#frag")) == module
    assert len(pre.calls) == 2


async def test_explicit_extension_is_its_own_only_candidate(store: Store) -> None:
    """A URL with an extension that does not exist is missing, without trying others."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    assert await lookup.get_cached_definitions(url(PUBLIC, "a.ts")) is None
    assert [c["url"] for c in pre.calls] == [url(PUBLIC, "a.ts")]


async def test_module_outside_every_realm(store: Store) -> None:
    """Outside every registered realm: lookup raises, get returns None, nothing rendered."""
    pre = GraphPrerenderer({OTHER + "a.gts": Spec()})
    lookup = make_lookup(store, pre)
    with pytest.raises(FilterRefersToNonexistentTypeError, match="not in any registered realm"):
        await lookup.lookup_definition(CodeRef(OTHER + "a", "Card"))
    assert await lookup.get_cached_definitions(OTHER + "a") is None
    assert pre.calls == []
    assert await store.read(Key(OTHER, OTHER + "a.gts"), by_alias=True) is None


async def test_invalidating_a_url_of_another_realm_is_a_no_op(store: Store) -> None:
    """Invalidating a URL outside every registered realm returns [] and deletes nothing."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    await lookup.get_cached_definitions(url(PUBLIC, "a"))
    assert await lookup.invalidate(OTHER + "a.gts") == []
    assert await lookup.get_cached_definitions(url(PUBLIC, "a")) is not None
    assert len(pre.calls) == 1


async def test_extensionless_invalidate_removes_the_gts_row(store: Store) -> None:
    """Invalidating the bare URL removes the row stored under .gts."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    await lookup.get_cached_definitions(url(PUBLIC, "a.gts"))
    invalidated = await lookup.invalidate(url(PUBLIC, "a"))
    assert url(PUBLIC, "a.gts") in invalidated
    assert await store.read(Key(PUBLIC.url, url(PUBLIC, "a.gts"))) is None


async def test_priority_is_passed_through_untouched(store: Store) -> None:
    """The priority reaches the prerenderer as given, None included."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec(), url(PUBLIC, "b.gts"): Spec()})
    lookup = make_lookup(store, pre)
    await lookup.get_cached_definitions(url(PUBLIC, "a.gts"), priority=7)
    await lookup.lookup_definition(CodeRef(url(PUBLIC, "b.gts"), "Card"))
    assert [c["priority"] for c in pre.calls] == [7, None]


async def test_module_with_no_definitions_is_a_cached_hit(store: Store) -> None:
    """A module exporting nothing is one row with {} and is not rendered again."""
    pre = GraphPrerenderer({url(PUBLIC, "empty.gts"): Spec(exports=[])})
    lookup = make_lookup(store, pre)
    first = await lookup.get_cached_definitions(url(PUBLIC, "empty.gts"))
    second = await lookup.get_cached_definitions(url(PUBLIC, "empty.gts"))
    assert first is not None
    assert first.definitions == {}
    assert second == first
    assert pre.renders(url(PUBLIC, "empty.gts")) == 1


async def test_update_after_invalidate_returns_the_new_version(store: Store) -> None:
    """After a module changes and is invalidated, the lookup returns the new version."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    ref = CodeRef(url(PUBLIC, "a"), "Card")
    assert (await lookup.lookup_definition(ref))["definition"]["version"] == 0
    pre.change(url(PUBLIC, "a.gts"), Spec())
    assert (await lookup.lookup_definition(ref))["definition"]["version"] == 0
    await lookup.invalidate(url(PUBLIC, "a.gts"))
    assert (await lookup.lookup_definition(ref))["definition"]["version"] == 1


async def test_deleted_module_is_never_cached_and_re_prerenders(store: Store) -> None:
    """A module that no longer exists is rendered on each lookup and never stored."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    await lookup.get_cached_definitions(url(PUBLIC, "a.gts"))
    del pre.graph[url(PUBLIC, "a.gts")]
    await lookup.invalidate(url(PUBLIC, "a.gts"))
    for _ in range(2):
        assert await lookup.get_cached_definitions(url(PUBLIC, "a.gts")) is None
        with pytest.raises(FilterRefersToNonexistentTypeError, match="does not exist"):
            await lookup.lookup_definition(CodeRef(url(PUBLIC, "a.gts"), "Card"))
    assert pre.renders(url(PUBLIC, "a.gts")) == 5
    assert await store.read(Key(PUBLIC.url, url(PUBLIC, "a.gts"))) is None


async def test_missing_export_raises(store: Store) -> None:
    """A code ref naming an export the module lacks raises the nonexistent-type error."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec(exports=["Card"])})
    lookup = make_lookup(store, pre)
    with pytest.raises(FilterRefersToNonexistentTypeError, match="no such export") as info:
        await lookup.lookup_definition(CodeRef(url(PUBLIC, "a"), "Nope"))
    assert info.value.code_ref == CodeRef(url(PUBLIC, "a"), "Nope")


async def test_dependency_fan_out_chain(store: Store) -> None:
    """Invalidating a leaf removes its chain of dependents (middle, deep) and nothing else."""
    leaf, middle, deep, other = (url(PUBLIC, n) for n in ("leaf", "middle", "deep", "other"))
    pre = GraphPrerenderer(
        {
            leaf + ".gts": Spec(),
            middle + ".gts": Spec(imports=[leaf + ".gts"]),
            deep + ".gts": Spec(imports=["./middle.gts"]),
            other + ".gts": Spec(),
        }
    )
    lookup = make_lookup(store, pre)
    for module in (leaf, middle, deep, other):
        await lookup.get_cached_definitions(module)
    deep_row = await store.read(Key(PUBLIC.url, deep), by_alias=True)
    assert deep_row is not None
    assert deep_row.deps == (middle,)
    invalidated = await lookup.invalidate(leaf + ".gts")
    assert {leaf + ".gts", middle + ".gts", deep + ".gts"} <= set(invalidated)
    assert other + ".gts" not in invalidated
    for module in (leaf, middle, deep):
        assert await store.read(Key(PUBLIC.url, module), by_alias=True) is None
    assert await store.read(Key(PUBLIC.url, other), by_alias=True) is not None


async def test_dependency_fan_out_diamond(store: Store) -> None:
    """A diamond's dependents are removed exactly once each; a bystander stays."""
    names = ("leaf", "left", "right", "top", "side")
    leaf, left, right, top, side = (url(PUBLIC, n) for n in names)
    pre = GraphPrerenderer(
        {
            leaf + ".gts": Spec(),
            left + ".gts": Spec(imports=[leaf + ".gts"]),
            right + ".gts": Spec(imports=[leaf]),
            top + ".gts": Spec(imports=[left + ".gts", right + ".gts"]),
            side + ".gts": Spec(),
        }
    )
    lookup = make_lookup(store, pre)
    for module in (leaf, left, right, top, side):
        await lookup.get_cached_definitions(module)
    invalidated = await lookup.invalidate(leaf)
    assert len(invalidated) == len(set(invalidated))
    for module in (leaf, left, right, top):
        assert await store.read(Key(PUBLIC.url, module), by_alias=True) is None
    assert await store.read(Key(PUBLIC.url, side), by_alias=True) is not None


async def test_dependency_errors_are_aggregated_and_recover_after_fixes(store: Store) -> None:
    """A module failing through its deps lists their errors breadth-first, once each; after
    the deps are fixed and invalidated, it renders and its error is None again."""
    top, mid, bad1, bad2 = (url(PUBLIC, n) for n in ("top", "mid", "bad1", "bad2"))
    pre = GraphPrerenderer(
        {
            top + ".gts": Spec(imports=[mid + ".gts", bad2 + ".gts"]),
            mid + ".gts": Spec(imports=[bad1 + ".gts", bad2 + ".gts"]),
            bad1 + ".gts": Spec(fail="bad1 is broken"),
            bad2 + ".gts": Spec(fail="bad2 is broken"),
        }
    )
    lookup = make_lookup(store, pre)
    module = await lookup.get_cached_definitions(top)
    assert module is not None
    assert module.error is not None
    detail = module.error["error"]
    assert detail["deps"] == [mid, bad2]
    messages = [e["message"] for e in detail["additionalErrors"]]
    assert messages == [f"{mid}.gts: a dependency failed", "bad2 is broken", "bad1 is broken"]
    assert set(module.deps) == {mid, bad2}
    with pytest.raises(FilterRefersToNonexistentTypeError, match="failed to render"):
        await lookup.lookup_definition(CodeRef(top, "Card"))
    pre.change(bad1 + ".gts", Spec())
    pre.change(bad2 + ".gts", Spec())
    await lookup.invalidate(bad1)
    await lookup.invalidate(bad2)
    fixed = await lookup.get_cached_definitions(top)
    assert fixed is not None
    assert fixed.error is None
    row = await store.read(Key(PUBLIC.url, top), by_alias=True)
    assert row is not None
    assert row.error is None


async def test_import_cycle_of_failures_does_not_hang(store: Store) -> None:
    """Two modules importing each other and failing through a shared dependency answer
    with aggregated errors instead of waiting on each other."""
    a, b, c = url(PUBLIC, "a"), url(PUBLIC, "b"), url(PUBLIC, "c")
    pre = GraphPrerenderer(
        {
            a + ".gts": Spec(imports=[b + ".gts", c + ".gts"]),
            b + ".gts": Spec(imports=[a + ".gts", c + ".gts"]),
            c + ".gts": Spec(fail="c broke"),
        }
    )
    lookup = make_lookup(store, pre)
    module = await lookup.get_cached_definitions(a)
    assert module is not None
    assert module.error is not None
    messages = [e["message"] for e in module.error["error"]["additionalErrors"]]
    assert messages == [f"{b}.gts: a dependency failed", "c broke"]
    assert pre.renders(c + ".gts") == 1


async def test_error_ttl_expires_into_a_new_prerender(store: Store) -> None:
    """An error row older than 30 s counts as a miss and the module is rendered again."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec(fail="broken")})
    lookup = make_lookup(store, pre)
    await lookup.get_cached_definitions(url(PUBLIC, "a"))
    await lookup.get_cached_definitions(url(PUBLIC, "a"))
    assert pre.renders(url(PUBLIC, "a.gts")) == 1
    row = await store.read(Key(PUBLIC.url, url(PUBLIC, "a.gts")))
    assert row is not None
    assert row.created_at is not None
    await store.write(dataclasses.replace(row, created_at=row.created_at - 31_000))
    await lookup.get_cached_definitions(url(PUBLIC, "a"))
    assert pre.renders(url(PUBLIC, "a.gts")) == 2


async def test_public_and_private_scope_columns(store: Store) -> None:
    """Public rows are (public, ''); private rows are (realm-auth, owner); each reads back."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec(), url(PRIVATE, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    public = await lookup.get_cached_definitions(url(PUBLIC, "a"))
    private = await lookup.get_cached_definitions(url(PRIVATE, "a"))
    assert public is not None
    assert private is not None
    assert (public.cache_scope, public.cache_user_id) == ("public", "")
    assert (private.cache_scope, private.cache_user_id) == ("realm-auth", "owner-priv")
    assert await store.read(
        Key(PRIVATE.url, url(PRIVATE, "a"), "realm-auth", "owner-priv"), by_alias=True
    )
    assert await store.read(Key(PRIVATE.url, url(PRIVATE, "a")), by_alias=True) is None
    assert [c["user_id"] for c in pre.calls] == ["owner-pub", "owner-priv"]
    await lookup.get_cached_definitions(url(PRIVATE, "a"))
    assert len(pre.calls) == 2


async def test_prewarm_then_registered_lookup_hits(store: Store) -> None:
    """A pre-warmed module is then served to a registered lookup with no new prerender."""
    pre = GraphPrerenderer({url(PRIVATE, "a.gts"): Spec()})
    lookup = CachingDefinitionLookup(CachingLookup(store), pre)
    warmed = await lookup.populate_definition_cache_entry(
        module_url=url(PRIVATE, "a"),
        realm_url=PRIVATE.url,
        resolved_realm_url=PRIVATE.url,
        cache_scope="realm-auth",
        cache_user_id="owner-priv",
        prerender_user_id="indexer",
    )
    assert warmed is not None
    assert pre.calls[0]["user_id"] == "indexer"
    realm_lookup = lookup.for_realm(PRIVATE)
    assert (await realm_lookup.lookup_definition(CodeRef(url(PRIVATE, "a"), "Card")))["type"] == (
        "definition"
    )
    assert len(pre.calls) == 1


async def test_prewarm_of_a_failing_module_stores_nothing(store: Store) -> None:
    """Pre-warming a failing module returns None and leaves no row."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec(fail="broken")})
    lookup = CachingDefinitionLookup(CachingLookup(store), pre)
    warmed = await lookup.populate_definition_cache_entry(
        module_url=url(PUBLIC, "a.gts"),
        realm_url=PUBLIC.url,
        resolved_realm_url=PUBLIC.url,
        cache_scope="public",
        cache_user_id="",
        prerender_user_id="indexer",
    )
    assert warmed is None
    assert await store.read(Key(PUBLIC.url, url(PUBLIC, "a.gts"))) is None


async def test_clear_realm_and_clear_all(store: Store) -> None:
    """Clearing a realm (registered or not) keeps the other realm; clearing all empties."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec(), url(PRIVATE, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    await lookup.get_cached_definitions(url(PUBLIC, "a"))
    await lookup.get_cached_definitions(url(PRIVATE, "a"))
    unregistered = CachingDefinitionLookup(CachingLookup(store), pre)
    await unregistered.clear_realm_definitions(PUBLIC.url)
    assert await store.read(Key(PUBLIC.url, url(PUBLIC, "a")), by_alias=True) is None
    assert await lookup.lookup_cached_definition(CodeRef(url(PRIVATE, "a"), "Card")) is not None
    await lookup.clear_all_definitions()
    assert await lookup.lookup_cached_definition(CodeRef(url(PRIVATE, "a"), "Card")) is None


async def test_lookup_cached_definition_never_renders(store: Store) -> None:
    """lookup_cached_definition answers None on a miss and renders nothing."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    lookup = make_lookup(store, pre)
    assert await lookup.lookup_cached_definition(CodeRef(url(PUBLIC, "a"), "Card")) is None
    assert pre.calls == []


async def test_for_realm_view_stays_inside_its_realm(store: Store) -> None:
    """A realm view finds nothing outside its realm."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    view = make_lookup(store, pre).for_realm(PRIVATE)
    assert await view.get_cached_definitions(url(PUBLIC, "a")) is None
    assert await view.invalidate(url(PUBLIC, "a")) == []
    with pytest.raises(FilterRefersToNonexistentTypeError):
        await view.lookup_definition(CodeRef(url(PUBLIC, "a"), "Card"))
    assert pre.calls == []


async def test_diagnostics_column_is_flattened_meta_or_sql_null(database_url: str) -> None:
    """meta becomes one JSON object in diagnostics; without meta the column is SQL NULL."""
    store = PostgresStore(database_url)
    await store.open()
    try:
        pre = GraphPrerenderer(
            {url(PUBLIC, "a.gts"): Spec(), url(PUBLIC, "b.gts"): Spec(meta=False)}
        )
        lookup = make_lookup(store, pre)
        module = await lookup.get_cached_definitions(url(PUBLIC, "a"))
        await lookup.get_cached_definitions(url(PUBLIC, "b"))
        assert module is not None
        assert module.diagnostics == {"requestId": "req-1", "renderMs": 5}
    finally:
        await store.close()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        rows = await (
            await conn.execute(
                "SELECT name, diagnostics IS NULL, error IS NULL"
                " FROM fleetcache_entries ORDER BY name"
            )
        ).fetchall()
    assert rows == [(url(PUBLIC, "a.gts"), False, True), (url(PUBLIC, "b.gts"), True, True)]


async def test_definitions_are_found_by_internal_key_with_or_without_extension(
    store: Store,
) -> None:
    """A code ref with a bare module URL, one with the extension and one with a query all
    read definitions["<module without extension>/<name>"], the seed's internal key."""
    pre = GraphPrerenderer({url(PUBLIC, "person.gts"): Spec(exports=["Person", "Pet"])})
    lookup = make_lookup(store, pre)
    bare = await lookup.lookup_definition(CodeRef(url(PUBLIC, "person"), "Person"))
    with_extension = await lookup.lookup_definition(CodeRef(url(PUBLIC, "person.gts"), "Person"))
    with_query = await lookup.lookup_definition(CodeRef(url(PUBLIC, "person.gts?v=1"), "Pet"))
    assert bare == with_extension
    assert bare["moduleURL"] == url(PUBLIC, "person")
    assert with_query["definition"]["name"] == "Pet"
    module = await lookup.get_cached_definitions(url(PUBLIC, "person"))
    assert module is not None
    assert sorted(module.definitions) == [url(PUBLIC, "person/Person"), url(PUBLIC, "person/Pet")]
    assert await lookup.lookup_cached_definition(CodeRef(url(PUBLIC, "person"), "Pet")) is not None
    assert pre.renders(url(PUBLIC, "person.gts")) == 1


class ByNamePrerenderer(GraphPrerenderer):
    """A prerenderer that files definitions under the bare export name (not the protocol)."""

    async def prerender_module(self, **kwargs: Any) -> ModuleRenderResponse:
        """The graph's render with each definition re-keyed by its export name."""
        response = await super().prerender_module(**kwargs)
        renamed = {key.rsplit("/", 1)[1]: entry for key, entry in response.definitions.items()}
        return dataclasses.replace(response, definitions=renamed)


class FixedPrerenderer:
    """A prerenderer answering one fixed response, whatever it is asked."""

    def __init__(self, response: ModuleRenderResponse) -> None:
        self.response = response

    async def prerender_module(self, **_: Any) -> ModuleRenderResponse:
        """The fixed response."""
        return self.response


async def test_a_definition_filed_under_its_bare_name_is_not_found(store: Store) -> None:
    """A response keyed by export name instead of internal key has no definition for the
    code ref: the lookup reads the internal key only, as the seed's system does."""
    lookup = make_lookup(store, ByNamePrerenderer({url(PUBLIC, "a.gts"): Spec()}))
    with pytest.raises(FilterRefersToNonexistentTypeError, match="no such export"):
        await lookup.lookup_definition(CodeRef(url(PUBLIC, "a"), "Card"))


async def test_stored_definitions_and_errors_are_the_documents_as_received(store: Store) -> None:
    """What the cache stores is the definitions document as received (unknown fields kept),
    and the error as received with absolute deps; additionalErrors stays null when no
    dependency error was added."""
    module_url = url(PUBLIC, "odd.gts")
    definitions: dict[str, Any] = {
        f"{url(PUBLIC, 'odd')}/Odd": {
            "type": "definition",
            "moduleURL": url(PUBLIC, "odd"),
            "definition": {"name": "Odd", "fields": {"n": {"type": "number"}}},
            "types": [f"{url(PUBLIC, 'odd')}/Odd"],
            "addedByANewerServer": {"x": 1},
        }
    }
    error: Any = {
        "type": "module-error",
        "error": {"message": "odd", "status": 500, "additionalErrors": None, "stack": "at 1"},
    }

    ready = ModuleRenderResponse("ready", definitions=definitions)
    lookup = make_lookup(store, FixedPrerenderer(ready))
    module = await lookup.get_cached_definitions(module_url)
    row = await store.read(Key(PUBLIC.url, module_url), by_alias=True)
    assert module is not None
    assert row is not None
    assert row.value == definitions == module.definitions
    await lookup.invalidate(module_url)
    lookup.prerenderer = FixedPrerenderer(
        ModuleRenderResponse("error", definitions=definitions, deps=["./dep.gts"], error=error)
    )
    failed = await lookup.get_cached_definitions(module_url)
    assert failed is not None
    assert failed.error == {
        "type": "module-error",
        "error": {
            "message": "odd",
            "status": 500,
            "additionalErrors": None,
            "stack": "at 1",
            "deps": [],
        },
    }
    assert failed.deps == [url(PUBLIC, "dep")]


async def test_dependency_errors_are_appended_in_the_serialized_error_form(store: Store) -> None:
    """Each failing dependency's error is appended to additionalErrors as its whole
    SerializedError (with its own additionalErrors), once per (id, message, status)."""
    top, bad = url(PUBLIC, "top"), url(PUBLIC, "bad")
    pre = GraphPrerenderer(
        {top + ".gts": Spec(imports=[bad + ".gts"]), bad + ".gts": Spec(fail="bad is broken")}
    )
    lookup = make_lookup(store, pre)
    module = await lookup.get_cached_definitions(top)
    assert module is not None
    assert module.error is not None
    appended = module.error["error"]["additionalErrors"]
    assert appended == [
        {"message": "bad is broken", "status": 500, "deps": [], "additionalErrors": None}
    ]


async def test_incomplete_error_aggregation_is_answered_but_never_cached(store: Store) -> None:
    """When a dependency's outcome cannot be had within aggregation_timeout, the module's
    error is returned (cached=False) but not stored, so the next lookup renders again; once
    the dependency is known, the complete error is cached."""
    top, slow = url(PUBLIC, "top"), url(PUBLIC, "slow")
    pre = GraphPrerenderer(
        {top + ".gts": Spec(imports=[slow + ".gts"]), slow + ".gts": Spec(fail="slow broke")}
    )
    gate = pre.gates[slow + ".gts"] = asyncio.Event()
    lookup = make_lookup(store, pre, aggregation_timeout=0.05)
    for attempt in (1, 2):
        module = await lookup.get_cached_definitions(top)
        assert module is not None
        assert module.cached is False
        assert module.error is not None
        assert module.error["error"]["additionalErrors"] is None
        assert module.created_at is None
        assert await store.read(Key(PUBLIC.url, top + ".gts"), by_alias=True) is None
        assert pre.renders(top + ".gts") == attempt
    with pytest.raises(FilterRefersToNonexistentTypeError, match="failed to render"):
        await lookup.lookup_definition(CodeRef(top, "Card"))
    warmed = await lookup.populate_definition_cache_entry(
        module_url=top,
        realm_url=PUBLIC.url,
        resolved_realm_url=PUBLIC.url,
        cache_scope="public",
        cache_user_id="",
        prerender_user_id="indexer",
    )
    assert warmed is None
    gate.set()
    slow_module = await lookup.get_cached_definitions(slow)
    assert slow_module is not None
    assert slow_module.error is not None
    complete = await lookup.get_cached_definitions(top)
    assert complete is not None
    assert complete.cached is True
    assert complete.error is not None
    assert [e["message"] for e in complete.error["error"]["additionalErrors"] or []] == [
        "slow broke"
    ]
    row = await store.read(Key(PUBLIC.url, top + ".gts"), by_alias=True)
    assert row is not None
    assert row.error == complete.error


async def test_incomplete_aggregation_is_not_persisted_under_fleet_coordination(
    database_url: str,
) -> None:
    """With the Postgres coordinator on, an incomplete error still reaches the caller
    uncached (the winner stores nothing), and the complete one is stored."""
    top, slow = url(PUBLIC, "top"), url(PUBLIC, "slow")
    pre = GraphPrerenderer(
        {top + ".gts": Spec(imports=[slow + ".gts"]), slow + ".gts": Spec(fail="slow broke")}
    )
    gate = pre.gates[slow + ".gts"] = asyncio.Event()
    cache = await fleetcache.open(database_url, coordinate=True)
    try:
        lookup = CachingDefinitionLookup(cache, pre, aggregation_timeout=0.05)
        lookup.register_realm(PUBLIC)
        module = await lookup.get_cached_definitions(top)
        assert module is not None
        assert module.cached is False
        assert await cache.lookup.peek(Key(PUBLIC.url, top + ".gts")) is None
        gate.set()
        await lookup.get_cached_definitions(slow)
        complete = await lookup.get_cached_definitions(top)
        assert complete is not None
        assert complete.cached is True
        assert await cache.lookup.peek(Key(PUBLIC.url, top + ".gts")) is not None
    finally:
        await cache.close()


async def test_ten_failing_modules_at_once_on_a_pool_of_ten_aggregate_completely(
    database_url: str,
) -> None:
    """Ten modules failing through ten failing dependencies, looked up at once with the
    fleet coordinator on and a pool of ten: every error is cached complete (it lists its
    dependency's error), because a computation holds no pooled connection while its nested
    lookups of the dependencies need one."""
    graph = {url(PUBLIC, f"dep{i}.gts"): Spec(fail=f"dep{i} broke") for i in range(10)}
    graph |= {
        url(PUBLIC, f"m{i}.gts"): Spec(imports=[url(PUBLIC, f"dep{i}.gts")]) for i in range(10)
    }
    pre = GraphPrerenderer(graph)
    async with fleetcache.open(database_url, pool_size=10) as cache:
        lookup = CachingDefinitionLookup(cache, pre, aggregation_timeout=30)
        lookup.register_realm(PUBLIC)
        modules = await asyncio.wait_for(
            asyncio.gather(
                *(lookup.get_cached_definitions(url(PUBLIC, f"m{i}.gts")) for i in range(10))
            ),
            60,
        )
        for i, module in enumerate(modules):
            assert module is not None
            assert module.cached
            assert module.error is not None
            additional = module.error["error"]["additionalErrors"]
            assert [e["message"] for e in additional] == [f"dep{i} broke"]
            stored = await cache.peek(Key(PUBLIC.url, url(PUBLIC, f"m{i}.gts")))
            assert stored is not None
            assert stored.error == module.error


def test_the_seeds_flag_and_names_are_the_definitions_domains_own() -> None:
    """PRERENDER_COALESCE_ACROSS_PROCESSES=true turns coordination on (default off), and
    the seed's options name the seed's channels; the generic core uses none of them."""
    assert coalesce_flag_enabled({"PRERENDER_COALESCE_ACROSS_PROCESSES": "true"})
    assert not coalesce_flag_enabled({})
    assert not coalesce_flag_enabled({"PRERENDER_COALESCE_ACROSS_PROCESSES": "false"})
    options = seed_open_options({})
    assert options == {
        "coordinate": False,
        "populated_channel": "module_cache_populated",
        "invalidated_channel": "module_cache_invalidated",
    }
    assert seed_open_options({"PRERENDER_COALESCE_ACROSS_PROCESSES": "1"})["coordinate"]


async def test_a_definitions_fleet_on_the_seeds_names_renders_a_module_once(
    database_url: str,
) -> None:
    """Two caches opened as the seed's system opens them (its flag on, its channels) share
    one render of a module, and both get it."""
    pre = GraphPrerenderer({url(PUBLIC, "card.gts"): Spec()})
    gate = pre.gates[url(PUBLIC, "card.gts")] = asyncio.Event()
    options = seed_open_options({"PRERENDER_COALESCE_ACROSS_PROCESSES": "true"})
    async with (
        fleetcache.open(database_url, **options) as first,
        fleetcache.open(database_url, **options) as second,
    ):
        assert first.coordinator is not None
        lookups = []
        for cache in (first, second):
            lookup = CachingDefinitionLookup(cache, pre)
            lookup.register_realm(PUBLIC)
            lookups.append(lookup)
        pending = [
            asyncio.create_task(lookup.get_cached_definitions(url(PUBLIC, "card.gts")))
            for lookup in lookups
        ]
        await asyncio.sleep(0.3)
        gate.set()
        a, b = await asyncio.gather(*pending)
        assert a is not None
        assert b is not None
        assert a.definitions == b.definitions
        assert pre.renders(url(PUBLIC, "card.gts")) == 1


async def test_a_hit_gives_the_definitions_in_the_order_the_render_produced(
    store: Store,
) -> None:
    """A module's definitions (and diagnostics) read from the store by a fresh lookup have
    the same keys in the same order as the render that the miss returned (the seed's
    documents: type, moduleURL, definition, types), so their JSON text is identical."""
    pre = GraphPrerenderer({url(PUBLIC, "card.gts"): Spec(exports=["Card", "Pet"])})
    missed = await make_lookup(store, pre).get_cached_definitions(url(PUBLIC, "card"))
    hit = await make_lookup(store, pre).get_cached_definitions(url(PUBLIC, "card"))
    assert missed is not None
    assert hit is not None
    assert pre.renders(url(PUBLIC, "card.gts")) == 1
    for part in ("definitions", "diagnostics"):
        assert json.dumps(getattr(hit, part)) == json.dumps(getattr(missed, part)), part
    assert list(hit.definitions[url(PUBLIC, "card/Card")]) == [
        "type",
        "moduleURL",
        "definition",
        "types",
    ]


class Wrapping:
    """A codec that stores a value wrapped in an object (so its use shows in the row)."""

    def encode(self, value: Any) -> Any:
        return {"wrapped": value}

    def decode(self, document: Any) -> Any:
        return document["wrapped"]


@pytest.mark.postgres
async def test_the_definitions_lookup_keeps_every_option_of_its_cache(database_url: str) -> None:
    """Made over an open cache, the definitions lookup is that cache's lookup, with every
    option it was opened with: a module is stored with the cache's expiry and through its
    codec, and read again from its near tier without a second render."""
    pre = GraphPrerenderer({url(PUBLIC, "a.gts"): Spec()})
    async with fleetcache.open(database_url, ttl=60, near=100, codec=Wrapping()) as cache:
        lookup = CachingDefinitionLookup(cache, pre)
        assert lookup.lookup is cache.lookup
        lookup.register_realm(PUBLIC)
        module = await lookup.get_cached_definitions(url(PUBLIC, "a.gts"))
        assert module is not None
        row = await cache.store.read(Key(PUBLIC.url, url(PUBLIC, "a.gts")))
        assert row is not None
        assert row.created_at is not None
        assert row.expires_at == row.created_at + 60_000  # the cache's ttl
        assert row.value == {"wrapped": module.definitions}  # the cache's codec
        again = await lookup.get_cached_definitions(url(PUBLIC, "a.gts"))
        assert again == module
        assert cache.lookup.stats()["near_hits"] == 1  # the cache's near tier
        assert pre.renders(url(PUBLIC, "a.gts")) == 1


async def test_the_definitions_lookup_is_made_over_a_cache_and_nothing_else(store: Store) -> None:
    """The one constructor takes an open cache or its lookup; a store (the old second
    path) or a nonsensical aggregation timeout is a ConfigurationError."""
    pre = GraphPrerenderer({})
    with pytest.raises(ConfigurationError, match="made over an open cache"):
        CachingDefinitionLookup(store, pre)  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), float("inf"), "30", True):
        with pytest.raises(ConfigurationError, match="aggregation_timeout"):
            CachingDefinitionLookup(CachingLookup(store), pre, aggregation_timeout=bad)  # type: ignore[arg-type]
    assert not hasattr(CachingDefinitionLookup, "over")
