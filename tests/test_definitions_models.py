"""The definitions domain's data: realms, code refs, render responses and their errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fleetcache.errors
from fleetcache.definitions.errors import (
    DefinitionsError,
    FilterRefersToNonexistentTypeError,
    MalformedRenderResponseError,
    PrerenderError,
)
from fleetcache.definitions.models import (
    CodeRef,
    ModuleRenderResponse,
    Realm,
    definition_entry,
    error_deps,
    is_error_entry,
    module_error,
)
from fleetcache.errors import ConfigurationError, FleetcacheError

MODULE = "https://r.example/a/person.gts"
ALIAS = "https://r.example/a/person"


def ready_doc() -> dict[str, Any]:
    """A valid ready response (camelCase, as on the wire) with every optional part present."""
    return {
        "id": MODULE,
        "status": "ready",
        "nonce": "n-1",
        "isShimmed": False,
        "lastModified": 1_700_000_000_000,
        "createdAt": 1_700_000_000_500,
        "deps": ["https://r.example/a/base.gts", "https://base.example/card-api"],
        "definitions": {
            f"{ALIAS}/Person": {
                "type": "definition",
                "moduleURL": ALIAS,
                "definition": {"name": "Person", "fields": {"age": {"type": "number"}}},
                "types": [f"{ALIAS}/Person", "https://base.example/card-api/CardDef"],
            },
            f"{ALIAS}/Broken": {
                "type": "module-error",
                "error": {
                    "message": "Broken is not a card",
                    "status": 500,
                    "title": "Internal Server Error",
                    "deps": [],
                    "additionalErrors": [{"message": "more", "status": 500}],
                },
            },
        },
        "exports": ["Person", "Broken", "helper"],
        "meta": {"requestId": "req-1", "diagnostics": {"renderElapsedMs": 12.5}},
    }


def error_doc() -> dict[str, Any]:
    """A valid error response without meta."""
    return {
        "id": MODULE,
        "status": "error",
        "isShimmed": False,
        "deps": [],
        "definitions": {},
        "error": {
            "type": "module-error",
            "error": {"message": "module not found", "status": 404, "additionalErrors": None},
        },
    }


def test_ready_response_round_trips_with_snake_case_attributes() -> None:
    """A camelCase ready response parses into snake_case attributes and survives to_json."""
    doc = ready_doc()
    response = ModuleRenderResponse.from_json(doc)
    assert response.status == "ready"
    assert (response.id, response.nonce, response.is_shimmed) == (MODULE, "n-1", False)
    assert (response.last_modified, response.created_at) == (1_700_000_000_000, 1_700_000_000_500)
    assert response.exports == ["Person", "Broken", "helper"]
    assert response.deps == doc["deps"]
    assert response.definitions == doc["definitions"]
    assert response.meta == {"requestId": "req-1", "diagnostics": {"renderElapsedMs": 12.5}}
    assert response.to_json() == doc
    assert ModuleRenderResponse.from_json(response.to_json()) == response


def test_error_response_round_trips_without_meta() -> None:
    """An error response without meta round trips and to_json leaves the absent parts out."""
    doc = error_doc()
    response = ModuleRenderResponse.from_json(doc)
    assert response.error is not None
    assert response.error["error"]["status"] == 404
    assert response.meta is None
    assert response.to_json() == doc


def test_absent_optional_fields_take_their_defaults() -> None:
    """Only status is required: the rest, absent, take defaults."""
    response = ModuleRenderResponse.from_json({"status": "ready"})
    assert response == ModuleRenderResponse("ready")
    assert response.definitions == {}
    assert response.deps == []
    assert response.exports is None
    assert response.is_shimmed is False
    assert response.id is None
    minimal_error = {"status": "error", "error": {"error": {"message": "x", "status": 500}}}
    parsed = ModuleRenderResponse.from_json(minimal_error)
    assert parsed.error == {"error": {"message": "x", "status": 500}}
    entry = {"type": "definition", "definition": {"name": "X"}}
    bare = ModuleRenderResponse.from_json({"status": "ready", "definitions": {"k/X": entry}})
    assert bare.definitions == {"k/X": entry}


def test_null_optional_fields_take_their_defaults() -> None:
    """Optional fields that are null take the same defaults as absent ones."""
    doc = {
        "status": "ready",
        "id": None,
        "nonce": None,
        "isShimmed": None,
        "lastModified": None,
        "createdAt": None,
        "deps": None,
        "definitions": None,
        "exports": None,
        "error": None,
        "meta": None,
    }
    assert ModuleRenderResponse.from_json(doc) == ModuleRenderResponse("ready")
    with_nulls = ModuleRenderResponse.from_json(
        {
            "status": "error",
            "error": {
                "type": "module-error",
                "error": {"message": "x", "status": 500, "deps": None, "additionalErrors": None},
            },
            "meta": {"requestId": None, "diagnostics": None},
        }
    )
    assert with_nulls.error is not None
    assert with_nulls.error["error"].get("deps") is None


def test_unknown_fields_are_kept() -> None:
    """Fields a newer prerenderer adds are kept: at the top level (in extra and to_json), in
    definition and error entries, and in meta."""
    doc = ready_doc()
    doc["renderVersion"] = 7
    doc["definitions"][f"{ALIAS}/Person"]["displayName"] = "A person"
    doc["definitions"][f"{ALIAS}/Broken"]["error"]["stack"] = "at line 1"
    doc["meta"]["hostShellHash"] = "abc"
    response = ModuleRenderResponse.from_json(doc)
    assert response.extra == {"renderVersion": 7}
    assert response.definitions[f"{ALIAS}/Person"]["displayName"] == "A person"  # type: ignore[typeddict-item]
    assert response.to_json() == doc


def test_error_entries_of_type_error_or_without_type_are_accepted() -> None:
    """The seed's ErrorEntry type allows "error" as well as "module-error", or no type."""
    for entry in (
        {"type": "error", "error": {"message": "x", "status": 500}},
        {"error": {"message": "x", "status": 500}},
    ):
        response = ModuleRenderResponse.from_json(
            {"status": "error", "definitions": {"k/X": entry}, "error": entry}
        )
        assert response.definitions["k/X"] == entry
        assert is_error_entry(response.definitions["k/X"])


def test_from_json_shares_no_state_with_its_input() -> None:
    """Mutating the parsed document or the to_json output never changes the response."""
    doc = ready_doc()
    response = ModuleRenderResponse.from_json(doc)
    doc["definitions"][f"{ALIAS}/Person"]["definition"]["name"] = "Changed"
    doc["deps"].append("https://elsewhere.example/x")
    out = response.to_json()
    out["definitions"][f"{ALIAS}/Person"]["types"].clear()
    assert response.to_json() == ready_doc()


def test_builders_make_valid_entries() -> None:
    """module_error and definition_entry build camelCase entries that from_json accepts."""
    error = module_error("boom", 500, ["https://r.example/a/y"], title="Internal Server Error")
    assert error == {
        "type": "module-error",
        "error": {
            "message": "boom",
            "status": 500,
            "deps": ["https://r.example/a/y"],
            "additionalErrors": None,
            "title": "Internal Server Error",
        },
    }
    response = ModuleRenderResponse(
        "error",
        definitions={f"{ALIAS}/X": definition_entry(ALIAS, {"name": "X"}, [f"{ALIAS}/X"])},
        deps=["https://r.example/a/y"],
        error=error,
    )
    assert ModuleRenderResponse.from_json(response.to_json()) == response
    assert error_deps(error) == ["https://r.example/a/y"]
    assert error_deps(None) == []


def _with(path: tuple[str | int, ...], value: object, base: dict[str, Any] | None = None) -> Any:
    doc = copy.deepcopy(base if base is not None else ready_doc())
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


def _without(path: tuple[str | int, ...], base: dict[str, Any] | None = None) -> Any:
    doc = copy.deepcopy(base if base is not None else ready_doc())
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return doc


PERSON = f"definitions[{ALIAS + '/Person'!r}]"
BROKEN = f"definitions[{ALIAS + '/Broken'!r}]"

# (document, path of the field at fault, part of the message)
MALFORMED = [
    pytest.param([], "", "the response must be an object, got list", id="not-an-object"),
    pytest.param(None, "", "the response must be an object, got null", id="null"),
    pytest.param(_without(("status",)), "status", "must be 'ready' or 'error'", id="no-status"),
    pytest.param(_with(("status",), "done"), "status", "got 'done'", id="bad-status"),
    pytest.param(_with(("id",), 3), "id", "must be a string, got int", id="id-int"),
    pytest.param(_with(("nonce",), 3), "nonce", "must be a string", id="nonce-int"),
    pytest.param(
        _with(("isShimmed",), "no"), "isShimmed", "must be a boolean, got str", id="shimmed"
    ),
    pytest.param(_with(("lastModified",), "x"), "lastModified", "must be a number", id="lm"),
    pytest.param(_with(("createdAt",), True), "createdAt", "got bool", id="created-bool"),
    pytest.param(_with(("definitions",), []), "definitions", "must be an object", id="defs"),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Person", "type"), "card"),
        f"{PERSON}.type",
        "must be 'definition', 'module-error' or 'error'",
        id="definition-bad-type",
    ),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Person"), "Person"),
        PERSON,
        "must be an object, got str",
        id="definition-not-object",
    ),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Person", "definition"), []),
        f"{PERSON}.definition",
        "must be an object, got list",
        id="definition-body-list",
    ),
    pytest.param(
        _without(("definitions", f"{ALIAS}/Person", "definition")),
        f"{PERSON}.definition",
        "must be an object, got null",
        id="definition-body-missing",
    ),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Person", "moduleURL"), 3),
        f"{PERSON}.moduleURL",
        "must be a string",
        id="definition-module-url",
    ),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Person", "types"), "CardDef"),
        f"{PERSON}.types",
        "must be a list",
        id="definition-types",
    ),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Person", "types", 1), 7),
        f"{PERSON}.types[1]",
        "must be a string, got int",
        id="definition-type-int",
    ),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Broken", "error", "status"), "500"),
        f"{BROKEN}.error.status",
        "must be an integer, got str",
        id="per-export-error-status",
    ),
    pytest.param(
        _with(("definitions", f"{ALIAS}/Broken", "error", "additionalErrors"), {}),
        f"{BROKEN}.error.additionalErrors",
        "must be a list, got dict",
        id="additional-errors-object",
    ),
    pytest.param(_with(("deps",), "a.gts"), "deps", "must be a list, got str", id="deps-str"),
    pytest.param(_with(("deps", 1), 7), "deps[1]", "must be a string, got int", id="dep-int"),
    pytest.param(_with(("exports",), "Person"), "exports", "must be a list", id="exports"),
    pytest.param(
        _with(("error",), None, error_doc()), "error", "is absent", id="error-status-no-error"
    ),
    pytest.param(
        _with(("status",), "ready", error_doc()), "error", "is set", id="ready-with-error"
    ),
    pytest.param(
        _with(("error", "type"), "oops", error_doc()),
        "error.type",
        "must be 'module-error' or 'error'",
        id="error-entry-type",
    ),
    pytest.param(
        _with(("error", "error"), "boom", error_doc()),
        "error.error",
        "must be an object, got str",
        id="error-entry-detail",
    ),
    pytest.param(
        _without(("error", "error", "message"), error_doc()),
        "error.error.message",
        "must be a string, got null",
        id="error-no-message",
    ),
    pytest.param(
        _with(("error", "error", "status"), True, error_doc()),
        "error.error.status",
        "must be an integer, got bool",
        id="error-status-bool",
    ),
    pytest.param(
        _with(("error", "error", "deps"), [None], error_doc()),
        "error.error.deps[0]",
        "must be a string",
        id="error-dep-null",
    ),
    pytest.param(
        _with(("error", "error", "title"), 5, error_doc()),
        "error.error.title",
        "must be a string",
        id="error-title",
    ),
    pytest.param(_with(("meta",), "req-1"), "meta", "must be an object", id="meta-str"),
    pytest.param(
        _with(("meta", "requestId"), 1), "meta.requestId", "must be a string", id="meta-id"
    ),
    pytest.param(
        _with(("meta", "diagnostics"), [1]),
        "meta.diagnostics",
        "must be an object",
        id="meta-diagnostics",
    ),
]


@pytest.mark.parametrize(("doc", "path", "problem"), MALFORMED)
def test_wrong_types_are_refused_naming_the_field_path(
    doc: object, path: str, problem: str
) -> None:
    """A field of the wrong type raises MalformedRenderResponseError naming its path."""
    with pytest.raises(MalformedRenderResponseError) as caught:
        ModuleRenderResponse.from_json(doc)
    assert caught.value.path == path
    assert problem in caught.value.problem
    if path:
        assert caught.value.problem.startswith(path)
    assert isinstance(caught.value, DefinitionsError)


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
urls = st.builds(lambda s: f"https://r.example/{s}.gts", st.text("abc/", max_size=6))
error_entries = st.builds(
    module_error,
    st.text(max_size=10),
    st.integers(100, 599),
    st.lists(urls, max_size=3),
    st.none() | st.lists(json_values, max_size=2),
)
definition_entries = st.builds(
    definition_entry,
    urls,
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    st.lists(urls, max_size=3),
)


@st.composite
def responses(draw: st.DrawFn) -> ModuleRenderResponse:
    """Any valid render response."""
    error = draw(st.none() | error_entries)
    meta = draw(
        st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "requestId": st.text(max_size=8),
                "diagnostics": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
            },
        )
    )
    return ModuleRenderResponse(
        "ready" if error is None else "error",
        definitions=draw(
            st.dictionaries(st.text(max_size=6), definition_entries | error_entries, max_size=3)
        ),
        deps=draw(st.lists(urls, max_size=4)),
        error=error,
        meta=meta,  # type: ignore[arg-type]  # fixed_dictionaries is typed as dict[str, Any]
        id=draw(st.none() | urls),
        nonce=draw(st.none() | st.text(max_size=6)),
        is_shimmed=draw(st.booleans()),
        last_modified=draw(st.none() | st.integers(0, 2**53)),
        exports=draw(st.none() | st.lists(st.text(max_size=5), max_size=3)),
    )


@given(responses())
def test_every_valid_response_round_trips(response: ModuleRenderResponse) -> None:
    """from_json(to_json(r)) == r for any valid response."""
    assert ModuleRenderResponse.from_json(response.to_json()) == response


def test_realm_accepts_public_and_private() -> None:
    """A realm with a URL ending in '/' and a known visibility is accepted."""
    assert Realm("https://r.example/a/", "public", "").visibility == "public"
    assert Realm("https://r.example/b/", "private", "@owner:x").owner_user_id == "@owner:x"


@pytest.mark.parametrize(
    ("url", "visibility", "problem"),
    [
        ("https://r.example/a", "public", "must end with '/'"),
        ("https://r.example/a/", "secret", "visibility must be 'public' or 'private'"),
    ],
)
def test_realm_rejects_bad_configuration(url: str, visibility: str, problem: str) -> None:
    """A realm URL without a trailing '/' or an unknown visibility is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match=problem):
        Realm(url, visibility, "")  # type: ignore[arg-type]  # the point is a bad value


def test_nonexistent_type_error_names_the_code_ref_and_cause() -> None:
    """The nonexistent-type error carries its code ref and cause and says both."""
    ref = CodeRef(MODULE, "Pet")
    error = FilterRefersToNonexistentTypeError(ref, "module has no export 'Pet'")
    assert error.code_ref == ref
    assert error.cause == "module has no export 'Pet'"
    assert str(error) == (
        f"filter refers to a nonexistent type: {MODULE}/Pet: module has no export 'Pet'"
    )
    assert isinstance(error, DefinitionsError)
    assert isinstance(error, FleetcacheError)


def test_the_definitions_error_root_is_the_domains_own() -> None:
    """DefinitionsError lives in the definitions package, under the one root; the core's
    error module does not name the domain."""
    assert DefinitionsError.__module__ == "fleetcache.definitions.errors"
    assert issubclass(DefinitionsError, FleetcacheError)
    assert not hasattr(fleetcache.errors, "DefinitionsError")


def test_prerender_error_names_url_endpoint_and_status() -> None:
    """A PrerenderError says which module failed where, and keeps the HTTP status."""
    error = PrerenderError(MODULE, "HTTP 503", endpoint="http://p/prerender-module", status=503)
    assert (error.url, error.status) == (MODULE, 503)
    assert MODULE in str(error)
    assert "http://p/prerender-module" in str(error)
    assert isinstance(error, DefinitionsError)
