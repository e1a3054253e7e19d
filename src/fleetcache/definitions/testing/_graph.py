"""The simulated module graph: what each module renders to, and its JSON form."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from fleetcache.definitions.models import (
    DefinitionResult,
    ModuleRenderResponse,
    definition_entry,
    module_error,
)
from fleetcache.definitions.urls import (
    EXECUTABLE_EXTENSIONS,
    canonicalize,
    trim_executable_extension,
)
from fleetcache.errors import ConfigurationError

_DEFAULT_FAIL_STATUS = 500
_MISSING_STATUS = 404
_SPEC_KEYS = frozenset({"exports", "imports", "fail", "status", "http_status", "raw_body"})


def _now_ms() -> int:
    return int(time.time() * 1000)


def status_title(status: int) -> str:
    """The HTTP reason phrase of ``status`` ("Error" for a status without one)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """One module of the simulated graph.

    ``exports`` become definitions; ``imports`` are absolute module URLs (an import without
    an extension resolves to the first ``x.gts``, ``x.ts``, ``x.gjs``, ``x.js`` in the
    graph, as a bundler would). ``fail`` makes the module fail to render with that message
    and ``status`` (default 500). Two flags simulate a broken prerender *service* rather than
    a broken module: ``http_status`` makes the server answer the render request with that
    HTTP status, and ``raw_body`` makes it answer with that body verbatim (HTTP 200 unless
    ``http_status`` says otherwise).

    Rendering module ``U``: not in the graph (exact key; no extension guessing, that is the
    caching layer's job) → a module-error with status 404 and no deps; ``fail`` set → a
    module-error with that message; an import that fails, however deep → a module-error
    whose deps list every import on a path to the failure; otherwise ``ready`` with one
    definition per export, filed under its internal key (``<U without extension>/<export>``)
    and stamped with the module's version (every edit bumps it).
    """

    exports: Sequence[str]
    imports: Sequence[str] = ()
    fail: str | None = None
    status: int | None = None
    http_status: int | None = None
    raw_body: str | None = None

    def __post_init__(self) -> None:
        # Stored as tuples so a spec is immutable and hashable whatever sequence was passed.
        object.__setattr__(self, "exports", _str_tuple(self.exports, "exports"))
        object.__setattr__(self, "imports", _str_tuple(self.imports, "imports"))
        for imported in self.imports:
            _check_module_url(imported, "import")
        if self.fail is not None and not isinstance(self.fail, str):
            raise ConfigurationError(f"fail must be a string or None, got {self.fail!r}")
        check_status(self.status, "status", 100)
        check_status(self.http_status, "http_status", 200)
        if self.raw_body is not None and not isinstance(self.raw_body, str):
            raise ConfigurationError(f"raw_body must be a string or None, got {self.raw_body!r}")

    @classmethod
    def from_json(cls, obj: object) -> ModuleSpec:
        """Read a spec from its JSON form; unknown keys are refused (they are likely typos)."""
        if not isinstance(obj, dict):
            raise ConfigurationError(f"a module spec must be an object, got {obj!r}")
        unknown = set(obj) - _SPEC_KEYS
        if unknown:
            raise ConfigurationError(f"unknown module spec keys: {sorted(unknown)}")
        if "exports" not in obj:
            raise ConfigurationError("a module spec needs 'exports'")
        return cls(
            exports=obj["exports"],
            imports=obj.get("imports", ()),
            fail=obj.get("fail"),
            status=obj.get("status"),
            http_status=obj.get("http_status"),
            raw_body=obj.get("raw_body"),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form :meth:`from_json` reads (None fields left out)."""
        doc: dict[str, Any] = {"exports": list(self.exports), "imports": list(self.imports)}
        for name in ("fail", "status", "http_status", "raw_body"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        return doc


def _str_tuple(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigurationError(f"{what} must be a list of strings, got {value!r}")
    if not all(isinstance(item, str) for item in value):
        raise ConfigurationError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def check_status(value: object, what: str, lowest: int) -> None:
    """Refuse ``value`` unless it is None or an HTTP status from ``lowest`` to 599."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= 599:
        raise ConfigurationError(f"{what} must be an HTTP status {lowest}-599, got {value!r}")


def _check_module_url(url: object, what: str) -> str:
    if not isinstance(url, str):
        raise ConfigurationError(f"{what} URL must be a string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or canonicalize(url) != url:
        raise ConfigurationError(
            f"{what} URL must be an absolute http(s) URL without query or fragment: {url!r}"
        )
    return url


def graph_from_json(obj: object) -> dict[str, ModuleSpec]:
    """Read a graph ``{module URL: spec}`` from its JSON form."""
    if not isinstance(obj, dict):
        raise ConfigurationError(f"a module graph must be an object, got {type(obj).__name__}")
    return {
        _check_module_url(url, "module"): ModuleSpec.from_json(spec) for url, spec in obj.items()
    }


def graph_to_json(graph: Mapping[str, ModuleSpec]) -> dict[str, Any]:
    """The JSON form of a graph, as :func:`graph_from_json` reads it."""
    return {url: spec.to_json() for url, spec in graph.items()}


class ModuleGraph:
    """The modules, their versions and what each renders to (see :class:`ModuleSpec`).

    Only the server's event loop touches it.
    """

    def __init__(self, graph: Mapping[str, ModuleSpec]) -> None:
        self.specs: dict[str, ModuleSpec] = {}
        # A module's version survives its removal, so a re-added module gets a new one.
        self.versions: dict[str, int] = {}
        # When each module last changed (ms), for the response's lastModified.
        self.modified: dict[str, int] = {}
        for url, spec in graph.items():
            self.set(url, spec)

    def set(self, url: str, spec: ModuleSpec) -> int:
        _check_module_url(url, "module")
        if not isinstance(spec, ModuleSpec):
            raise ConfigurationError(f"spec for {url!r} must be a ModuleSpec, got {spec!r}")
        self.specs[url] = spec
        self.versions[url] = self.versions.get(url, 0) + 1
        self.modified[url] = _now_ms()
        return self.versions[url]

    def remove(self, url: str) -> bool:
        if self.specs.pop(url, None) is None:
            return False
        self.versions[url] += 1
        self.modified[url] = _now_ms()
        return True

    def resolve_import(self, url: str) -> str | None:
        if url in self.specs:
            return url
        return next((url + ext for ext in EXECUTABLE_EXTENSIONS if url + ext in self.specs), None)

    def render(self, url: str) -> ModuleRenderResponse:
        """The module's render response, with the facts every answer carries."""
        return dataclasses.replace(
            self._render(url),
            id=url,
            nonce=uuid.uuid4().hex,
            created_at=_now_ms(),
            last_modified=self.modified.get(url),
        )

    def _render(self, url: str) -> ModuleRenderResponse:
        spec = self.specs.get(url)
        if spec is None:
            return ModuleRenderResponse(
                "error",
                error=module_error(
                    f"module not found: {url}", _MISSING_STATUS, title=status_title(_MISSING_STATUS)
                ),
            )
        imports = list(spec.imports)
        if spec.fail is not None:
            status = spec.status or _DEFAULT_FAIL_STATUS
            return ModuleRenderResponse(
                "error",
                deps=imports,
                error=module_error(spec.fail, status, title=status_title(status)),
            )
        bad, roots = self._failing_imports(url)
        if roots:
            root, reason, status = roots[0]
            more = f" (and {len(roots) - 1} more)" if len(roots) > 1 else ""
            return ModuleRenderResponse(
                "error",
                deps=imports,
                error=module_error(
                    f"a dependency failed to render: {root}: {reason}{more}",
                    status,
                    bad,
                    title=status_title(status),
                ),
            )
        version = self.versions[url]
        # Filed by internal key, as the seed's prerenderer files them.
        alias = trim_executable_extension(url)
        definitions: dict[str, DefinitionResult] = {
            f"{alias}/{name}": definition_entry(
                alias, {"name": name, "kind": "card", "version": version}, [f"{alias}/{name}"]
            )
            for name in spec.exports
        }
        return ModuleRenderResponse("ready", definitions, deps=imports, exports=list(spec.exports))

    def _failing_imports(self, url: str) -> tuple[list[str], list[tuple[str, str, int]]]:
        """Every module reachable from ``url`` that leads to a failure (``bad``), and the
        failures themselves (``roots``: url, reason, status), both in discovery order."""
        order: list[str] = []
        importers: dict[str, set[str]] = {}
        roots: dict[str, tuple[str, int]] = {}
        seen = {url}
        queue = [url]
        # Breadth first over the working modules; a missing or failing import is a root.
        while queue:
            module = queue.pop(0)
            for imported in self.specs[module].imports:
                target = self.resolve_import(imported)
                key = target or imported
                importers.setdefault(key, set()).add(module)
                if key in seen:
                    continue
                seen.add(key)
                order.append(key)
                if target is None:
                    roots[key] = ("module not found", _MISSING_STATUS)
                elif (failure := self.specs[target].fail) is not None:
                    roots[key] = (failure, self.specs[target].status or _DEFAULT_FAIL_STATUS)
                else:
                    queue.append(target)
        # Walk back from the roots: whatever imports a bad module is bad too.
        bad = set(roots)
        pending = list(roots)
        while pending:
            for importer in importers.get(pending.pop(), ()):
                if importer not in bad:
                    bad.add(importer)
                    pending.append(importer)
        return (
            [key for key in order if key in bad and key != url],
            [(key, *roots[key]) for key in order if key in roots],
        )
