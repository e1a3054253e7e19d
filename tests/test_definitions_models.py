"""The definitions domain's data: realms, code refs, render responses and their errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetcache.definitions.errors import (
    FilterRefersToNonexistentTypeError,
    MalformedRenderResponseError,
    PrerenderError,
)
from fleetcache.definitions.models import (
    CodeRef,
    ModuleRenderResponse,
    Realm,
    definition_entry,
    module_error,
)
from fleetcache.errors import ConfigurationError, DefinitionsError, FleetcacheError

MODULE = "https://r.example/a/person.gts"


def ready_doc() -> dict[str, Any]:
    """A valid ready response with every optional part present."""
    return {
        "status": "ready",
        "definitions": {
            "Person": {
                "type": "definition",
                "module_url": MODULE,
                "definition": {"name": "Person", "fields": {"age": {"type": "number"}}},
                "types": [f"{MODULE}/Person", "https://base.example/card-api/CardDef"],
            },
            "Broken": {
                "type": "module-error",
                "error": {
                    "message": "Broken is not a card",
                    "status": 500,
                    "deps": [],
                    "additional_errors": [{"message": "more"}],
                },
            },
        },
        "deps": ["https://r.example/a/base.gts", "https://base.example/card-api"],
        "error": None,
        "meta": {"request_id": "req-1", "diagnostics": {"render_ms": 12.5}},
    }


def error_doc() -> dict[str, Any]:
    """A valid error response without meta."""
    return {
        "status": "error",
        "definitions": {},
        "deps": [],
        "error": {
            "type": "module-error",
            "error": {
                "message": "module not found",
                "status": 404,
                "deps": [],
                "additional_errors": [],
            },
        },
    }


def test_ready_response_round_trips() -> None:
    """A ready response with definitions, per-export errors and meta survives from/to JSON."""
    doc = ready_doc()
    response = ModuleRenderResponse.from_json(doc)
    assert response.status == "ready"
    assert response.deps == doc["deps"]
    assert response.meta == {"request_id": "req-1", "diagnostics": {"render_ms": 12.5}}
    assert response.to_json() == doc
    assert ModuleRenderResponse.from_json(response.to_json()) == response


def test_error_response_round_trips_without_meta() -> None:
    """An error response without meta round trips and to_json leaves meta out."""
    doc = error_doc()
    response = ModuleRenderResponse.from_json(doc)
    assert response.error is not None
    assert response.error["error"]["status"] == 404
    assert response.meta is None
    assert response.to_json() == doc


def test_from_json_shares_no_state_with_its_input() -> None:
    """Mutating the parsed document or the to_json output never changes the response."""
    doc = ready_doc()
    response = ModuleRenderResponse.from_json(doc)
    doc["definitions"]["Person"]["definition"]["name"] = "Changed"
    doc["deps"].append("https://elsewhere.example/x")
    out = response.to_json()
    out["definitions"]["Person"]["types"].clear()
    assert response.to_json() == ready_doc()


def test_unknown_keys_are_ignored() -> None:
    """A newer prerenderer's extra keys are dropped, not refused."""
    doc = error_doc()
    doc["nonce"] = "abc"
    doc["error"]["error"]["stack"] = "at line 1"
    assert ModuleRenderResponse.from_json(doc).to_json() == error_doc()


def test_builders_make_valid_entries() -> None:
    """module_error and definition_entry build entries that from_json accepts."""
    response = ModuleRenderResponse(
        "error",
        definitions={"X": definition_entry(MODULE, {"name": "X"}, [f"{MODULE}/X"])},
        deps=["https://r.example/a/y"],
        error=module_error("boom", 500, ["https://r.example/a/y"]),
    )
    assert ModuleRenderResponse.from_json(response.to_json()) == response


def _without(key: str) -> dict[str, Any]:
    doc = ready_doc()
    del doc[key]
    return doc


def _with(path: tuple[str | int, ...], value: object, base: dict[str, Any] | None = None) -> Any:
    doc = copy.deepcopy(base if base is not None else ready_doc())
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


def _error_detail_without(key: str) -> dict[str, Any]:
    doc = error_doc()
    del doc["error"]["error"][key]
    return doc


MALFORMED = [
    pytest.param([], "the response must be an object, got list", id="not-an-object"),
    pytest.param(None, "the response must be an object, got null", id="null"),
    pytest.param(_without("status"), "has no 'status'", id="missing-status"),
    pytest.param(
        _with(("status",), "done"), "'status' must be 'ready' or 'error'", id="bad-status"
    ),
    pytest.param(_without("definitions"), "has no 'definitions'", id="missing-definitions"),
    pytest.param(_with(("definitions",), []), "'definitions' must be an object", id="defs-list"),
    pytest.param(
        _with(("definitions", "Person", "type"), "card"),
        "definitions\\['Person'\\].type must be 'definition' or 'module-error'",
        id="definition-bad-type",
    ),
    pytest.param(
        _with(("definitions", "Person"), "Person"),
        "definitions\\['Person'\\] must be an object, got str",
        id="definition-not-object",
    ),
    pytest.param(
        _with(("definitions", "Person", "definition"), []),
        "definitions\\['Person'\\].definition must be an object",
        id="definition-body-list",
    ),
    pytest.param(
        _with(("definitions", "Person", "module_url"), 3),
        "definitions\\['Person'\\].module_url must be a string",
        id="definition-module-url",
    ),
    pytest.param(
        _with(("definitions", "Person", "types"), "CardDef"),
        "definitions\\['Person'\\].types must be a list",
        id="definition-types",
    ),
    pytest.param(
        _with(("definitions", "Broken", "error", "status"), "500"),
        "definitions\\['Broken'\\].error.status must be an integer, got str",
        id="per-export-error-status",
    ),
    pytest.param(_without("deps"), "has no 'deps'", id="missing-deps"),
    pytest.param(_with(("deps",), "a.gts"), "'deps' must be a list, got str", id="deps-str"),
    pytest.param(_with(("deps", 1), 7), "'deps'\\[1\\] must be a string, got int", id="dep-int"),
    pytest.param(_without("error"), "has no 'error'", id="missing-error"),
    pytest.param(
        _with(("error",), None, error_doc()),
        "'status' is 'error' but 'error' is null",
        id="error-status-without-error",
    ),
    pytest.param(
        _with(("status",), "ready", error_doc()),
        "'status' is 'ready' but 'error' is set",
        id="ready-with-error",
    ),
    pytest.param(
        _with(("error", "type"), "error", error_doc()),
        "'error'.type must be 'module-error', got 'error'",
        id="error-entry-type",
    ),
    pytest.param(
        _with(("error", "error"), "boom", error_doc()),
        "'error'.error must be an object",
        id="error-entry-detail",
    ),
    pytest.param(_error_detail_without("message"), "has no 'message'", id="error-no-message"),
    pytest.param(_error_detail_without("status"), "has no 'status'", id="error-no-status"),
    pytest.param(_error_detail_without("deps"), "has no 'deps'", id="error-no-deps"),
    pytest.param(
        _error_detail_without("additional_errors"),
        "has no 'additional_errors'",
        id="error-no-additional",
    ),
    pytest.param(
        _with(("error", "error", "status"), True, error_doc()),
        "'error'.error.status must be an integer, got bool",
        id="error-status-bool",
    ),
    pytest.param(
        _with(("error", "error", "deps"), [None], error_doc()),
        "'error'.error.deps\\[0\\] must be a string",
        id="error-dep-null",
    ),
    pytest.param(_with(("meta",), "req-1"), "'meta' must be an object", id="meta-str"),
    pytest.param(
        _with(("meta", "request_id"), 1), "meta.request_id must be a string", id="meta-id"
    ),
    pytest.param(
        _with(("meta", "diagnostics"), [1]),
        "meta.diagnostics must be an object",
        id="meta-diagnostics",
    ),
]


@pytest.mark.parametrize(("doc", "problem"), MALFORMED)
def test_malformed_response_is_rejected_naming_the_problem(doc: object, problem: str) -> None:
    """Each malformed shape raises MalformedRenderResponseError saying what is wrong."""
    with pytest.raises(MalformedRenderResponseError, match=problem) as caught:
        ModuleRenderResponse.from_json(doc)
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
    st.lists(json_values, max_size=2),
)
definition_entries = st.builds(
    definition_entry,
    urls,
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    st.lists(json_values, max_size=3),
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
                "request_id": st.text(max_size=8),
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


def test_prerender_error_names_url_endpoint_and_status() -> None:
    """A PrerenderError says which module failed where, and keeps the HTTP status."""
    error = PrerenderError(MODULE, "HTTP 503", endpoint="http://p/prerender/module", status=503)
    assert (error.url, error.status) == (MODULE, 503)
    assert MODULE in str(error)
    assert "http://p/prerender/module" in str(error)
    assert isinstance(error, DefinitionsError)
