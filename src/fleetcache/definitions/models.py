"""The definitions domain's data: realms, code refs and the prerenderer's render response.

A response's parts stay plain JSON dicts exactly as received (that is what the cache
stores); the TypedDicts describe them, and :meth:`ModuleRenderResponse.from_json` is the
one place that checks their shape.
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
    "ModuleErrorEntry",
    "ModuleRenderResponse",
    "Realm",
    "RenderMeta",
    "RenderStatus",
    "SerializedError",
    "Visibility",
    "definition_entry",
    "error_deps",
    "is_error_entry",
    "module_error",
]

#: Who may read a realm: anyone, or only its owner.
Visibility: TypeAlias = Literal["public", "private"]
#: Whether the prerenderer produced definitions (``ready``) or failed (``error``).
RenderStatus: TypeAlias = Literal["ready", "error"]

_VISIBILITIES: frozenset[str] = frozenset({"public", "private"})
_STATUSES: frozenset[str] = frozenset({"ready", "error"})
# The seed's system writes "module-error"; its ErrorEntry type also allows "error".
_ERROR_TYPES: frozenset[str] = frozenset({"module-error", "error"})


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


# The wire documents keep their camelCase keys (they are stored as received), hence the
# N815 waivers below: the keys are the protocol's, not Python names.


class SerializedError(TypedDict):
    """What went wrong rendering a module (the seed's ``SerializedError``): ``status`` is
    HTTP-like (404 = no such module); ``deps`` are the module URLs the failure involves;
    ``additionalErrors`` are more errors (e.g. the failing dependencies'), in this same form.
    """

    message: str
    status: int
    title: NotRequired[str | None]
    id: NotRequired[str | None]
    deps: NotRequired[list[str] | None]
    additionalErrors: NotRequired[list[Any] | None]


class ModuleErrorEntry(TypedDict):
    """An error entry: a whole module's error, or one export's."""

    type: NotRequired[Literal["module-error", "error"]]
    error: SerializedError


class DefinitionEntry(TypedDict):
    """One export's definition as the prerenderer produced it; ``moduleURL`` is the module's
    URL without its executable extension and ``types`` the internal keys of its ancestry."""

    type: Literal["definition"]
    moduleURL: NotRequired[str]
    definition: dict[str, Any]
    types: NotRequired[list[str]]


#: What an internal key maps to: a definition, or the error that stopped it.
DefinitionResult: TypeAlias = DefinitionEntry | ModuleErrorEntry


class RenderMeta(TypedDict):
    """Optional facts about a render: the request id it answered and the server's
    diagnostics."""

    requestId: NotRequired[str | None]
    diagnostics: NotRequired[dict[str, Any] | None]


def module_error(
    message: str,
    status: int,
    deps: Iterable[str] = (),
    additional_errors: Iterable[Any] | None = None,
    *,
    title: str | None = None,
) -> ModuleErrorEntry:
    """Build an error entry (``{"type": "module-error", "error": {...}}``);
    ``additionalErrors`` is null unless ``additional_errors`` is given, as the seed writes it."""
    detail: SerializedError = {
        "message": message,
        "status": status,
        "deps": list(deps),
        "additionalErrors": None if additional_errors is None else list(additional_errors),
    }
    if title is not None:
        detail["title"] = title
    return {"type": "module-error", "error": detail}


def definition_entry(
    module_url: str, definition: Mapping[str, Any], types: Iterable[str] = ()
) -> DefinitionEntry:
    """Build a definition entry (``{"type": "definition", "moduleURL": ..., ...}``)."""
    return {
        "type": "definition",
        "moduleURL": module_url,
        "definition": dict(definition),
        "types": list(types),
    }


def is_error_entry(result: DefinitionResult) -> bool:
    """Whether a definitions value is an error entry rather than a definition."""
    return result.get("type") != "definition"


def error_deps(entry: ModuleErrorEntry | None) -> list[str]:
    """The deps an error entry names (``[]`` when it names none or there is no error)."""
    if entry is None:
        return []
    return list(entry["error"].get("deps") or [])


@dataclass(frozen=True, slots=True)
class ModuleRenderResponse:
    """What the prerenderer answers for one module (the seed's ``ModuleRenderResponse``).

    ``definitions`` maps an internal key (``<module URL without extension>/<export>``) to a
    definition or error entry, as received; ``deps`` are the module URLs this module
    imports; ``error`` is set iff ``status`` is ``"error"``; ``meta`` (optional) carries
    ``requestId`` and ``diagnostics``. ``id`` (the module URL), ``nonce``, ``is_shimmed``,
    ``last_modified`` and ``created_at`` (ms) and ``exports`` (every export name; None
    when the server did not say) are informational. ``extra`` keeps top-level fields this
    release does not know, so :meth:`to_json` gives them back.

    Its JSON form (camelCase; the ``data.attributes`` of a ``prerender-module`` answer)::

        {
          "id": <module URL>,                    "status": "ready" | "error",
          "nonce": str,  "isShimmed": bool,      "lastModified": ms,  "createdAt": ms,
          "deps": [<module URL>, ...],
          "definitions": {<internal key>: <definition entry> | <error entry>, ...},
          "exports": [<export name>, ...],       (optional)
          "error": <error entry>,                (optional; set when status is "error")
          "meta": {"requestId": str, "diagnostics": {...}}      (optional)
        }

        internal key:     trimExecutableExtension(module URL) + "/" + export name
        definition entry: {"type": "definition", "moduleURL": <URL without extension>,
                           "definition": {...}, "types": [<internal key>, ...]}
        error entry:      {"type": "module-error" (or "error"),
                           "error": {"message": str, "status": int, "title"?: str,
                                     "id"?: str | null, "deps"?: [str, ...],
                                     "additionalErrors": [...] | null, ...}}

    Every field but ``status`` (and, in entries, ``definition``, ``error.message`` and
    ``error.status``) may be absent or null and takes its default.
    """

    status: RenderStatus
    definitions: dict[str, DefinitionResult] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    error: ModuleErrorEntry | None = None
    meta: RenderMeta | None = None
    id: str | None = None
    nonce: str | None = None
    is_shimmed: bool = False
    last_modified: float | None = None
    created_at: float | None = None
    exports: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: object) -> ModuleRenderResponse:
        """Parse a decoded JSON document (camelCase), checking the type of every field.

        Raises :class:`MalformedRenderResponseError` naming the first field at fault (its
        ``path``). Absent or null optional fields take their defaults; unknown fields are
        kept (top-level ones in ``extra``, the others where they are). The result shares
        no mutable state with ``obj``.
        """
        doc = _expect_dict(obj, "")
        status = doc.get("status")
        if status not in _STATUSES:
            raise _malformed("status", f"must be 'ready' or 'error', got {status!r}")
        raw_definitions = _optional_dict(doc, "definitions", "") or {}
        definitions = {
            key: _parse_definition_result(value, f"definitions[{key!r}]")
            for key, value in raw_definitions.items()
        }
        raw_error = doc.get("error")
        error = None if raw_error is None else _parse_error_entry(raw_error, "error")
        if status == "error" and error is None:
            raise _malformed("error", "is absent, but 'status' is 'error'")
        if status == "ready" and error is not None:
            raise _malformed("error", "is set, but 'status' is 'ready'")
        raw_meta = doc.get("meta")
        return cls(
            status=cast(RenderStatus, status),
            definitions=definitions,
            deps=_optional_str_list(doc, "deps", "") or [],
            error=error,
            meta=None if raw_meta is None else _parse_meta(raw_meta),
            id=_optional_str(doc, "id", ""),
            nonce=_optional_str(doc, "nonce", ""),
            is_shimmed=_optional_bool(doc, "isShimmed", ""),
            last_modified=_optional_number(doc, "lastModified", ""),
            created_at=_optional_number(doc, "createdAt", ""),
            exports=_optional_str_list(doc, "exports", ""),
            extra=copy.deepcopy({k: v for k, v in doc.items() if k not in _KNOWN_FIELDS}),
        )

    def to_json(self) -> dict[str, Any]:
        """The camelCase JSON document :meth:`from_json` reads back (a fresh copy, safe to
        mutate); optional fields that are None are left out."""
        doc: dict[str, Any] = copy.deepcopy(self.extra)
        optional = {
            "id": self.id,
            "nonce": self.nonce,
            "lastModified": self.last_modified,
            "createdAt": self.created_at,
            "exports": None if self.exports is None else list(self.exports),
            "error": copy.deepcopy(self.error),
            "meta": copy.deepcopy(self.meta),
        }
        doc.update(
            status=self.status,
            isShimmed=self.is_shimmed,
            deps=list(self.deps),
            definitions=copy.deepcopy(self.definitions),
        )
        doc.update({key: value for key, value in optional.items() if value is not None})
        return doc


_KNOWN_FIELDS: frozenset[str] = frozenset(
    {
        "id",
        "status",
        "nonce",
        "isShimmed",
        "lastModified",
        "createdAt",
        "deps",
        "definitions",
        "exports",
        "error",
        "meta",
    }
)


# --- validation helpers: each returns a fresh value or raises naming the path -------------


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _malformed(path: str, problem: str) -> MalformedRenderResponseError:
    return MalformedRenderResponseError(f"{path or 'the response'} {problem}", path=path)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _expect_dict(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(path, f"must be an object, got {_type_name(value)}")
    if not all(isinstance(k, str) for k in value):
        raise _malformed(path, "has a key that is not a string")
    return cast(dict[str, Any], value)


def _expect_str_list(value: object, path: str) -> list[str]:
    if not isinstance(value, list):
        raise _malformed(path, f"must be a list, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _malformed(f"{path}[{i}]", f"must be a string, got {_type_name(item)}")
    return list(value)


def _optional_dict(doc: Mapping[str, Any], key: str, parent: str) -> dict[str, Any] | None:
    value = doc.get(key)
    return None if value is None else _expect_dict(value, _join(parent, key))


def _optional_str(doc: Mapping[str, Any], key: str, parent: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise _malformed(_join(parent, key), f"must be a string, got {_type_name(value)}")
    return value


def _optional_bool(doc: Mapping[str, Any], key: str, parent: str) -> bool:
    value = doc.get(key)
    if value is not None and not isinstance(value, bool):
        raise _malformed(_join(parent, key), f"must be a boolean, got {_type_name(value)}")
    return bool(value)


def _optional_number(doc: Mapping[str, Any], key: str, parent: str) -> float | None:
    value = doc.get(key)
    # bool is an int subclass; true is a mistake, not 1.
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
        raise _malformed(_join(parent, key), f"must be a number, got {_type_name(value)}")
    return value


def _optional_str_list(doc: Mapping[str, Any], key: str, parent: str) -> list[str] | None:
    value = doc.get(key)
    return None if value is None else _expect_str_list(value, _join(parent, key))


def _optional_list(doc: Mapping[str, Any], key: str, parent: str) -> None:
    value = doc.get(key)
    if value is not None and not isinstance(value, list):
        raise _malformed(_join(parent, key), f"must be a list, got {_type_name(value)}")


def _check_serialized_error(value: object, path: str) -> None:
    detail = _expect_dict(value, path)
    message = detail.get("message")
    if not isinstance(message, str):
        raise _malformed(_join(path, "message"), f"must be a string, got {_type_name(message)}")
    status = detail.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        raise _malformed(_join(path, "status"), f"must be an integer, got {_type_name(status)}")
    _optional_str(detail, "title", path)
    _optional_str(detail, "id", path)
    _optional_str_list(detail, "deps", path)
    _optional_list(detail, "additionalErrors", path)


def _parse_error_entry(value: object, path: str) -> ModuleErrorEntry:
    doc = _expect_dict(value, path)
    kind = doc.get("type")
    if kind is not None and kind not in _ERROR_TYPES:
        raise _malformed(_join(path, "type"), f"must be 'module-error' or 'error', got {kind!r}")
    _check_serialized_error(doc.get("error"), _join(path, "error"))
    return cast(ModuleErrorEntry, copy.deepcopy(doc))


def _parse_definition_entry(doc: dict[str, Any], path: str) -> DefinitionEntry:
    _expect_dict(doc.get("definition"), _join(path, "definition"))
    _optional_str(doc, "moduleURL", path)
    _optional_str_list(doc, "types", path)
    return cast(DefinitionEntry, copy.deepcopy(doc))


def _parse_definition_result(value: object, path: str) -> DefinitionResult:
    doc = _expect_dict(value, path)
    kind = doc.get("type")
    if kind == "definition":
        return _parse_definition_entry(doc, path)
    # An entry without a type is an error entry when it carries an error (the seed's
    # ErrorEntry type leaves its "type" optional).
    if kind in _ERROR_TYPES or (kind is None and "error" in doc):
        return _parse_error_entry(doc, path)
    raise _malformed(
        _join(path, "type"), f"must be 'definition', 'module-error' or 'error', got {kind!r}"
    )


def _parse_meta(value: object) -> RenderMeta:
    doc = _expect_dict(value, "meta")
    _optional_str(doc, "requestId", "meta")
    _optional_dict(doc, "diagnostics", "meta")
    return cast(RenderMeta, copy.deepcopy(doc))
