"""Module URL rules: canonical form, extensions, candidates, variants, missing modules, deps."""

from __future__ import annotations

from typing import Any

import pytest

from fleetcache.definitions.models import (
    CodeRef,
    ModuleRenderResponse,
    definition_entry,
    module_error,
)
from fleetcache.definitions.urls import (
    EXECUTABLE_EXTENSIONS,
    absolute_deps,
    candidates,
    canonicalize,
    has_executable_extension,
    internal_key_for,
    invalidation_variants,
    is_missing_module,
    trim_executable_extension,
)

R = "https://r.example/a/"


def test_executable_extensions_are_in_candidate_order() -> None:
    """The extensions are .gts, .ts, .gjs, .js, in that order."""
    assert EXECUTABLE_EXTENSIONS == (".gts", ".ts", ".gjs", ".js")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"{R}x.gts?v=2#frag", f"{R}x.gts"),
        (f"{R}x?v=2", f"{R}x"),
        (f"{R}x#top", f"{R}x"),
        (f"{R}x", f"{R}x"),
        (R, R),
    ],
)
def test_canonicalize_drops_query_and_fragment(url: str, expected: str) -> None:
    """canonicalize keeps scheme, host and path and drops the query and the fragment."""
    assert canonicalize(url) == expected


@pytest.mark.parametrize(
    ("url", "executable"),
    [
        (f"{R}x.gts", True),
        (f"{R}x.ts", True),
        (f"{R}x.gjs", True),
        (f"{R}x.js", True),
        (f"{R}x.gts?v=1", True),
        (f"{R}x.d.ts", False),
        (f"{R}x.json", False),
        (f"{R}x", False),
        (R, False),
    ],
)
def test_has_executable_extension(url: str, executable: bool) -> None:
    """Only .gts, .ts, .gjs and .js count as executable; .d.ts does not."""
    assert has_executable_extension(url) is executable


@pytest.mark.parametrize(
    ("url", "alias"),
    [
        (f"{R}x.gts", f"{R}x"),
        (f"{R}x.js?v=1", f"{R}x"),
        (f"{R}x", f"{R}x"),
        (f"{R}x.d.ts", f"{R}x.d.ts"),
        (f"{R}x.gts.gts", f"{R}x.gts"),
    ],
)
def test_trim_executable_extension_gives_the_alias(url: str, alias: str) -> None:
    """The alias is the canonical URL without one executable extension."""
    assert trim_executable_extension(url) == alias


def test_url_with_extension_is_its_own_only_candidate() -> None:
    """A URL that names its extension is tried as is, and only as is."""
    assert candidates(f"{R}x.ts") == [f"{R}x.ts"]
    assert candidates(f"{R}x.gts?v=3") == [f"{R}x.gts"]


def test_bare_url_candidates_try_each_extension_then_bare() -> None:
    """A bare URL is tried as x.gts, x.ts, x.gjs, x.js, then x."""
    assert candidates(f"{R}x") == [f"{R}x.gts", f"{R}x.ts", f"{R}x.gjs", f"{R}x.js", f"{R}x"]


def test_declaration_file_is_not_executable_so_gets_all_candidates() -> None:
    """x.d.ts is not executable, so it is treated like a bare URL."""
    base = f"{R}x.d.ts"
    assert candidates(base) == [base + ext for ext in EXECUTABLE_EXTENSIONS] + [base]


def test_directory_url_is_its_own_only_candidate() -> None:
    """A URL ending in '/' names no file, so no extension is appended."""
    assert candidates(R) == [R]


def test_invalidation_variants_cover_alias_and_every_extension() -> None:
    """Invalidating x.gts also reaches x and x with each executable extension."""
    assert invalidation_variants(f"{R}x.gts") == [
        f"{R}x.gts",
        f"{R}x",
        f"{R}x.ts",
        f"{R}x.gjs",
        f"{R}x.js",
    ]
    assert invalidation_variants(f"{R}x") == [
        f"{R}x",
        f"{R}x.gts",
        f"{R}x.ts",
        f"{R}x.gjs",
        f"{R}x.js",
    ]


def test_invalidation_variants_of_directory_url_is_itself() -> None:
    """A URL ending in '/' has no variants beyond itself."""
    assert invalidation_variants(R) == [R]
    assert invalidation_variants(f"{R}?q=1") == [R]


def _error(status: int, deps: list[str]) -> ModuleRenderResponse:
    return ModuleRenderResponse("error", error=module_error("nope", status, deps))


def test_404_without_deps_is_missing() -> None:
    """A module-error with status 404 and no deps means the module does not exist."""
    assert is_missing_module(_error(404, []), f"{R}x.gts")


def test_404_whose_deps_are_only_self_variants_is_missing() -> None:
    """A 404 that names only the module itself (any extension or alias) is still missing."""
    response = _error(404, [f"{R}x", f"{R}x.gts", "./x.ts", f"{R}x.gjs?v=1"])
    assert is_missing_module(response, f"{R}x.gts")
    assert is_missing_module(response, f"{R}x")


def test_404_naming_another_module_is_not_missing() -> None:
    """A 404 caused by a missing import is an ordinary error of this module."""
    assert not is_missing_module(_error(404, [f"{R}x.gts", f"{R}y.gts"]), f"{R}x.gts")
    assert not is_missing_module(_error(404, ["./y"]), f"{R}x.gts")


def test_other_statuses_and_ready_are_not_missing() -> None:
    """A 500 with no deps, or a ready response, is not a missing module."""
    assert not is_missing_module(_error(500, []), f"{R}x.gts")
    ready = ModuleRenderResponse("ready", {f"{R}x/X": definition_entry(f"{R}x", {"name": "X"})})
    assert not is_missing_module(ready, f"{R}x.gts")


def test_missing_module_needs_a_module_error_entry() -> None:
    """As in the seed's system, only an entry of type "module-error" can mean missing; a 404
    entry of type "error" (or without a type) is an ordinary error."""
    for kind in ("error", None):
        entry: Any = {"error": {"message": "nope", "status": 404}}
        if kind is not None:
            entry["type"] = kind
        assert not is_missing_module(entry, f"{R}x.gts")
    assert is_missing_module(
        {"type": "module-error", "error": {"message": "x", "status": 404}}, f"{R}x"
    )


@pytest.mark.parametrize(
    ("module", "key"),
    [
        (f"{R}person.gts", f"{R}person/Person"),
        (f"{R}person", f"{R}person/Person"),
        (f"{R}person.ts?v=2#top", f"{R}person/Person"),
        (f"{R}person.d.ts", f"{R}person.d.ts/Person"),
    ],
)
def test_internal_key_is_the_module_without_extension_slash_name(module: str, key: str) -> None:
    """The internal key of a code ref is trimExecutableExtension(module) + "/" + name."""
    assert internal_key_for(CodeRef(module, "Person")) == key


def test_missing_module_accepts_a_bare_error_entry() -> None:
    """is_missing_module also reads a stored error entry, and None is never missing."""
    assert is_missing_module(module_error("nope", 404), f"{R}x.gts")
    assert not is_missing_module(module_error("nope", 500), f"{R}x.gts")
    assert not is_missing_module(None, f"{R}x.gts")


def test_absolute_deps_resolve_trim_and_deduplicate_in_order() -> None:
    """Deps are resolved against the module URL, lose their extension, and appear once."""
    deps = [
        "./y.gts",
        f"{R}z",
        "../b/w.js",
        f"{R}y",
        "https://base.example/card-api.gts?v=9",
        "./z.ts",
        "./types.d.ts",
    ]
    assert absolute_deps(deps, f"{R}x.gts") == [
        f"{R}y",
        f"{R}z",
        "https://r.example/b/w",
        "https://base.example/card-api",
        f"{R}types.d.ts",
    ]


def test_absolute_deps_of_nothing_is_empty() -> None:
    """No deps give an empty list."""
    assert absolute_deps([], f"{R}x.gts") == []
