"""The definitions domain's data: realms, code refs and the prerenderer's render response.

A render response is stored in the cache as JSON, so its parts stay plain JSON dicts
(described by the TypedDicts below) rather than classes; :meth:`ModuleRenderResponse.from_json`
is the one place that checks their shape.

The JSON form of a render response::

    {
      "status": "ready" | "error",
      "definitions": {<export name>: <definition entry> | <error entry>, ...},
      "deps": [<module URL>, ...],
      "error": <error entry> | null,
      "meta": {"request_id": "...", "diagnostics": {...}}      (optional)
    }

    definition entry: {"type": "definition", "module_url": str, "definition": {...},
                       "types": [...]}
    error entry:      {"type": "module-error",
                       "error": {"message": str, "status": int, "deps": [str, ...],
                                 "additional_errors": [...]}}
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypeAlias, TypedDict, cast

from fleetcache.definitions.errors import MalformedRenderResponseError
from fleetcache.errors import ConfigurationError

__all__ = [
    "CodeRef",
    "DefinitionEntry",
    "DefinitionResult",
    "ModuleErrorDetail",
    "ModuleErrorEntry",
    "ModuleRenderResponse",
    "Realm",
    "RenderMeta",
    "RenderStatus",
    "Visibility",
    "definition_entry",
    "module_error",
]

#: Who may read a realm: anyone, or only its owner.
Visibility: TypeAlias = Literal["public", "private"]
#: Whether the prerenderer produced definitions (``ready``) or failed (``error``).
RenderStatus: TypeAlias = Literal["ready", "error"]

_VISIBILITIES: frozenset[str] = frozenset({"public", "private"})
_STATUSES: frozenset[str] = frozenset({"ready", "error"})


@dataclass(frozen=True, slots=True)
class Realm:
    """A realm: a URL (ending in ``/``) that modules live under, who may read it, its owner."""

    url: str
    visibility: Visibility
    owner_user_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.endswith("/"):
            raise ConfigurationError(f"realm URL must end with '/': {self.url!r}")
        if self.visibility not in _VISIBILITIES:
            raise ConfigurationError(
                f"realm {self.url!r}: visibility must be 'public' or 'private', "
                f"got {self.visibility!r}"
            )
        if not isinstance(self.owner_user_id, str):
            raise ConfigurationError(
                f"realm {self.url!r}: owner_user_id must be a string, "
                f"got {type(self.owner_user_id).__name__}"
            )


@dataclass(frozen=True, slots=True)
class CodeRef:
    """A reference to an exported type: the module URL it lives in and its export name."""

    module: str
    name: str


class ModuleErrorDetail(TypedDict):
    """What went wrong rendering a module: ``status`` is HTTP-like (404 = no such module);
    ``deps`` are the module URLs the failure involves."""

    message: str
    status: int
    deps: list[str]
    additional_errors: list[Any]


class ModuleErrorEntry(TypedDict):
    """An error entry: a whole module's error, or one export's."""

    type: Literal["module-error"]
    error: ModuleErrorDetail


class DefinitionEntry(TypedDict):
    """One export's definition as the prerenderer produced it."""

    type: Literal["definition"]
    module_url: str
    definition: dict[str, Any]
    types: list[Any]


#: What a definition key maps to: a definition, or the error that stopped it.
DefinitionResult: TypeAlias = DefinitionEntry | ModuleErrorEntry


class RenderMeta(TypedDict):
    """Optional facts about a render: the prerenderer's request id and its diagnostics."""

    request_id: NotRequired[str]
    diagnostics: NotRequired[dict[str, Any]]


def module_error(
    message: str,
    status: int,
    deps: Iterable[str] = (),
    additional_errors: Iterable[Any] = (),
) -> ModuleErrorEntry:
    """Build an error entry (``{"type": "module-error", "error": {...}}``)."""
    return {
        "type": "module-error",
        "error": {
            "message": message,
            "status": status,
            "deps": list(deps),
            "additional_errors": list(additional_errors),
        },
    }


def definition_entry(
    module_url: str, definition: Mapping[str, Any], types: Iterable[Any] = ()
) -> DefinitionEntry:
    """Build a definition entry (``{"type": "definition", ...}``)."""
    return {
        "type": "definition",
        "module_url": module_url,
        "definition": dict(definition),
        "types": list(types),
    }


@dataclass(frozen=True, slots=True)
class ModuleRenderResponse:
    """What the prerenderer answers for one module.

    ``definitions`` maps a definition key (the export name) to a definition or error entry;
    ``deps`` are the module URLs this module imports; ``error`` is set iff ``status`` is
    ``"error"``; ``meta`` (optional) carries ``request_id`` and ``diagnostics``.
    """

    status: RenderStatus
    definitions: dict[str, DefinitionResult] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    error: ModuleErrorEntry | None = None
    meta: RenderMeta | None = None

    @classmethod
    def from_json(cls, obj: object) -> ModuleRenderResponse:
        """Parse a decoded JSON document, checking every part of its shape.

        Raises :class:`MalformedRenderResponseError` naming the first thing that is wrong.
        Unknown keys are ignored (a newer prerenderer may add some); the opaque parts
        (``definition``, ``types``, ``additional_errors``, ``diagnostics``) are kept as is.
        The result shares no mutable state with ``obj``.
        """
        doc = _expect_dict(obj, "the response")
        status = _require(doc, "status", "the response")
        if status not in _STATUSES:
            raise MalformedRenderResponseError(
                f"'status' must be 'ready' or 'error', got {status!r}"
            )
        raw_definitions = _expect_dict(
            _require(doc, "definitions", "the response"), "'definitions'"
        )
        definitions: dict[str, DefinitionResult] = {}
        for key, value in raw_definitions.items():
            definitions[key] = _parse_definition_result(value, f"definitions[{key!r}]")
        deps = _expect_str_list(_require(doc, "deps", "the response"), "'deps'")
        raw_error = _require(doc, "error", "the response")
        error = None if raw_error is None else _parse_error_entry(raw_error, "'error'")
        if status == "error" and error is None:
            raise MalformedRenderResponseError("'status' is 'error' but 'error' is null")
        if status == "ready" and error is not None:
            raise MalformedRenderResponseError("'status' is 'ready' but 'error' is set")
        raw_meta = doc.get("meta")
        meta = None if raw_meta is None else _parse_meta(raw_meta)
        return cls(
            status=cast(RenderStatus, status),
            definitions=definitions,
            deps=deps,
            error=error,
            meta=meta,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON document :meth:`from_json` reads back (a fresh copy, safe to mutate).

        ``meta`` is left out when it is None.
        """
        doc: dict[str, Any] = {
            "status": self.status,
            "definitions": copy.deepcopy(self.definitions),
            "deps": list(self.deps),
            "error": copy.deepcopy(self.error),
        }
        if self.meta is not None:
            doc["meta"] = copy.deepcopy(self.meta)
        return doc


# --- validation helpers: each returns a fresh value or raises naming the path -------------


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _expect_dict(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedRenderResponseError(f"{where} must be an object, got {_type_name(value)}")
    if not all(isinstance(k, str) for k in value):
        raise MalformedRenderResponseError(f"{where} has a key that is not a string")
    return cast(dict[str, Any], value)


def _require(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise MalformedRenderResponseError(f"{where} has no {key!r}")
    return doc[key]


def _expect_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedRenderResponseError(f"{where} must be a string, got {_type_name(value)}")
    return value


def _expect_list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedRenderResponseError(f"{where} must be a list, got {_type_name(value)}")
    return copy.deepcopy(value)


def _expect_str_list(value: object, where: str) -> list[str]:
    items = _expect_list(value, where)
    for i, item in enumerate(items):
        _expect_str(item, f"{where}[{i}]")
    return items


def _parse_error_entry(value: object, where: str) -> ModuleErrorEntry:
    doc = _expect_dict(value, where)
    kind = _require(doc, "type", where)
    if kind != "module-error":
        raise MalformedRenderResponseError(f"{where}.type must be 'module-error', got {kind!r}")
    detail = _expect_dict(_require(doc, "error", where), f"{where}.error")
    message = _expect_str(_require(detail, "message", f"{where}.error"), f"{where}.error.message")
    status = _require(detail, "status", f"{where}.error")
    # bool is an int subclass; a status of true is a mistake, not 1.
    if not isinstance(status, int) or isinstance(status, bool):
        raise MalformedRenderResponseError(
            f"{where}.error.status must be an integer, got {_type_name(status)}"
        )
    deps = _expect_str_list(_require(detail, "deps", f"{where}.error"), f"{where}.error.deps")
    additional = _expect_list(
        _require(detail, "additional_errors", f"{where}.error"),
        f"{where}.error.additional_errors",
    )
    return module_error(message, status, deps, additional)


def _parse_definition_entry(doc: dict[str, Any], where: str) -> DefinitionEntry:
    module_url = _expect_str(_require(doc, "module_url", where), f"{where}.module_url")
    definition = _expect_dict(_require(doc, "definition", where), f"{where}.definition")
    types = _expect_list(_require(doc, "types", where), f"{where}.types")
    return definition_entry(module_url, copy.deepcopy(definition), types)


def _parse_definition_result(value: object, where: str) -> DefinitionResult:
    doc = _expect_dict(value, where)
    kind = _require(doc, "type", where)
    if kind == "definition":
        return _parse_definition_entry(doc, where)
    if kind == "module-error":
        return _parse_error_entry(doc, where)
    raise MalformedRenderResponseError(
        f"{where}.type must be 'definition' or 'module-error', got {kind!r}"
    )


def _parse_meta(value: object) -> RenderMeta:
    doc = _expect_dict(value, "'meta'")
    meta: RenderMeta = {}
    if "request_id" in doc:
        meta["request_id"] = _expect_str(doc["request_id"], "meta.request_id")
    if "diagnostics" in doc:
        meta["diagnostics"] = copy.deepcopy(_expect_dict(doc["diagnostics"], "meta.diagnostics"))
    return meta
