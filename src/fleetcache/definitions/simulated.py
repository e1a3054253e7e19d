"""A simulated prerender service speaking the seed system's protocol, over a module graph
given as data.

It stands in for the real (slow, external) prerender service in tests, the demo and the
benchmark: a real HTTP server (aiohttp.web) that answers ``POST /prerender-module`` as the
seed's prerender manager does (see :mod:`fleetcache.definitions.prerenderer`). It counts
every attempt and every render, so a test can check that a fleet rendered each module
exactly once; its graph can be edited while it runs, so a demo can "edit" a module; and it
can be told to answer a module with failures first (``draining``, 503, ...), so a test can
watch the client retry.

Run it in this process::

    async with SimulatedPrerenderServer({"https://r.example/a/x.gts": ModuleSpec(["X"])}) as s:
        prerenderer = HttpPrerenderer(s.base_url, auth="token")

or in another OS process (it prints its base URL as the first line of stdout)::

    python -m fleetcache.definitions.simulated --graph graph.json [--latency-ms N] [--port 0]

Endpoints::

    POST   /prerender-module   JSON:API prerender-module-request -> 201 prerender-module-result
    GET    /renders            {url: renders}       POST /renders/reset  forget renders
    GET    /attempts           {url: requests}      GET  /requests       every request, in order
    GET    /priorities         {url: last priority}
    POST   /faults             {url, times, status, drainingHeader}: answer the next ``times``
                               requests for url with that status (and the draining header)
    GET    /modules            {"modules": {url: spec}, "versions": {url: version}}
    PUT    /modules            {url, spec}  -> {url, version}
    DELETE /modules?url=...    -> {url, removed, version}

Rendering module ``U``: not in the graph (exact key; no extension guessing, that is the
caching layer's job) → a module-error with status 404 and no deps; ``fail`` set → a
module-error with that message (status ``status`` or 500); an import that fails, however
deep → a module-error whose deps list every import on a path to the failure; otherwise
``ready`` with one definition per export, filed under its internal key
(``<U without extension>/<export>``). The graph is read when a render starts, before the
simulated latency, as a real renderer reads the source first: an edit during a render does
not change that render's answer. A request answered by an injected fault is an attempt but
not a render.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from aiohttp import web

from fleetcache.definitions.models import (
    DefinitionResult,
    ModuleRenderResponse,
    RenderMeta,
    definition_entry,
    module_error,
)
from fleetcache.definitions.prerenderer import (
    JOB_PRIORITY_HEADER,
    REQUEST_ID_HEADER,
    SERVER_STATUS_HEADER,
)
from fleetcache.definitions.urls import (
    EXECUTABLE_EXTENSIONS,
    canonicalize,
    trim_executable_extension,
)
from fleetcache.errors import ConfigurationError, DefinitionsError, NotOpenError
from fleetcache.logcontext import get_logger

__all__ = [
    "ModuleSpec",
    "RecordedRequest",
    "SimulatedPrerenderControl",
    "SimulatedPrerenderServer",
    "SimulatedServerError",
    "graph_from_json",
    "graph_to_json",
    "main",
    "start_in_subprocess",
    "stop_subprocess",
]

logger = get_logger(__name__)

_DEFAULT_FAIL_STATUS = 500
_MISSING_STATUS = 404
_DRAINING_STATUS = 410
_JSON_API = "application/vnd.api+json"
_REQUEST_TYPE = "prerender-module-request"
_RESULT_TYPE = "prerender-module-result"
# Fleet fan-out opens many connections at once; the default backlog (128) is small.
_LISTEN_BACKLOG = 1024
# close() gives a request still being answered this long before cancelling it.
_SHUTDOWN_GRACE = 0.25
_SPEC_KEYS = frozenset({"exports", "imports", "fail", "status", "http_status", "raw_body"})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class SimulatedServerError(DefinitionsError):
    """The simulated prerender server could not be started or refused a control request."""


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
        _check_status(self.status, "status", 100)
        _check_status(self.http_status, "http_status", 200)
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


def _check_status(value: object, what: str, lowest: int) -> None:
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


class _ModuleGraph:
    """The modules and their versions. Only the server's event loop touches it."""

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
                    f"module not found: {url}", _MISSING_STATUS, title=_title(_MISSING_STATUS)
                ),
            )
        imports = list(spec.imports)
        if spec.fail is not None:
            status = spec.status or _DEFAULT_FAIL_STATUS
            return ModuleRenderResponse(
                "error",
                deps=imports,
                error=module_error(spec.fail, status, title=_title(status)),
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
                    title=_title(status),
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


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One ``POST /prerender-module`` the server received (an attempt), as it came in.

    ``priority`` is the body's, ``priority_header`` the ``x-boxel-job-priority`` header
    (None when absent); ``status`` is the HTTP status it was answered with.
    """

    url: str
    realm: str
    auth: str
    request_id: str | None
    priority: int | None
    priority_header: str | None
    content_type: str | None
    accept: str | None
    status: int

    def to_json(self) -> dict[str, Any]:
        """The JSON form served by ``GET /requests``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class _Fault:
    status: int
    draining_header: bool


class _HttpError(Exception):
    """Answer the request with this status and message (a JSON:API errors document)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _errors_response(status: int, message: str) -> web.Response:
    doc = {"errors": [{"status": status, "title": _title(status), "message": message}]}
    return web.json_response(doc, status=status, content_type=_JSON_API)


@web.middleware
async def _answer_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _HttpError as exc:
        return _errors_response(exc.status, exc.message)
    except ConfigurationError as exc:
        return _errors_response(400, str(exc))


class SimulatedPrerenderServer:
    """An HTTP prerender service on 127.0.0.1 (a random free port by default).

    Creating one does no I/O: ``await start()`` (or ``async with``) listens, ``close()``
    stops. Every method must be called from the event loop the server was started on.
    ``latency`` (seconds, settable at run time) is slept per render without blocking other
    requests.
    """

    def __init__(
        self,
        graph: Mapping[str, ModuleSpec] | None = None,
        *,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if latency < 0:
            raise ConfigurationError(f"latency must be >= 0 seconds, got {latency}")
        self.latency = latency
        self._host = host
        self._port = port
        self._graph = _ModuleGraph(graph or {})
        # Bookkeeping, all written by request handlers (and reset_renders/fail_next) and
        # read by the accessors below; everything runs on the server's loop, so no lock.
        self._counts: Counter[str] = Counter()
        self._priorities: dict[str, int | None] = {}
        self._requests: list[RecordedRequest] = []
        self._faults: dict[str, deque[_Fault]] = {}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``; raises :class:`NotOpenError` before :meth:`start`."""
        if self._base_url is None or self._runner is None:
            raise NotOpenError("SimulatedPrerenderServer is not started")
        return self._base_url

    async def start(self) -> str:
        """Listen, and return the base URL."""
        if self._runner is not None:
            return self.base_url
        app = web.Application(middlewares=[_answer_errors])
        app.add_routes(
            [
                web.post("/prerender-module", self._handle_render),
                web.get("/renders", self._handle_get_renders),
                web.post("/renders/reset", self._handle_reset_renders),
                web.get("/attempts", self._handle_get_attempts),
                web.get("/requests", self._handle_get_requests),
                web.get("/priorities", self._handle_get_priorities),
                web.post("/faults", self._handle_post_fault),
                web.get("/modules", self._handle_get_modules),
                web.put("/modules", self._handle_put_module),
                web.delete("/modules", self._handle_delete_module),
            ]
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, backlog=_LISTEN_BACKLOG)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SimulatedServerError(
                f"could not listen on {self._host}:{self._port}: {exc}"
            ) from exc
        port = runner.addresses[0][1]
        self._runner = runner
        self._base_url = f"http://{self._host}:{port}"
        return self._base_url

    async def close(self) -> None:
        """Stop listening and end every open connection (a request still being answered
        gets a moment, then is cancelled); safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimulatedPrerenderServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the graph ---------------------------------------------------------------------

    def set_module(self, url: str, spec: ModuleSpec) -> int:
        """Add or replace a module; returns its new version (every change bumps it)."""
        return self._graph.set(url, spec)

    def remove_module(self, url: str) -> bool:
        """Remove a module (bumping its version); False if it was not there."""
        return self._graph.remove(url)

    def module_version(self, url: str) -> int:
        """The module's current version (0 if it was never in the graph)."""
        return self._graph.versions.get(url, 0)

    def graph(self) -> dict[str, ModuleSpec]:
        """A copy of the current graph."""
        return dict(self._graph.specs)

    # --- faults ----------------------------------------------------------------------------

    def fail_next(
        self, url: str, times: int = 1, *, status: int = 503, draining_header: bool = False
    ) -> None:
        """Answer the next ``times`` requests for ``url`` with ``status`` (and the
        ``X-Boxel-Prerender-Server-Status: draining`` header if asked) instead of rendering."""
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise ConfigurationError(f"times must be an integer >= 0, got {times!r}")
        _check_status(status, "status", 200)
        queue = self._faults.setdefault(url, deque())
        queue.extend([_Fault(status, draining_header)] * times)

    def drain(
        self, url: str, times: int = 1, *, via: Literal["status", "header"] = "status"
    ) -> None:
        """Answer the next ``times`` requests for ``url`` as a draining server does: status
        410 (``via="status"``), or a 200 carrying the draining status header
        (``via="header"``; the header alone must make a client retry)."""
        if via == "status":
            self.fail_next(url, times, status=_DRAINING_STATUS)
        else:
            self.fail_next(url, times, status=200, draining_header=True)

    # --- what was asked and rendered -------------------------------------------------------

    def render_counts(self) -> dict[str, int]:
        """How many renders of each URL were done (requests not answered by a fault) since
        the start or the last reset."""
        return dict(self._counts)

    def attempt_counts(self) -> dict[str, int]:
        """How many render requests each URL received, faults and retries included."""
        return dict(Counter(r.url for r in self._requests))

    def request_ids(self) -> dict[str, list[str | None]]:
        """The ``x-boxel-prerender-request-id`` of every request, per URL, in order."""
        ids: dict[str, list[str | None]] = {}
        for recorded in self._requests:
            ids.setdefault(recorded.url, []).append(recorded.request_id)
        return ids

    def requests(self) -> list[RecordedRequest]:
        """Every render request received, in order."""
        return list(self._requests)

    def priorities(self) -> dict[str, int | None]:
        """The last priority (from the request body) each URL was requested with."""
        return dict(self._priorities)

    def reset_renders(self) -> None:
        """Forget the render counts, requests and priorities (pending faults stay)."""
        self._counts.clear()
        self._priorities.clear()
        self._requests.clear()

    # --- HTTP ----------------------------------------------------------------------------

    async def _handle_render(self, request: web.Request) -> web.StreamResponse:
        content_type = request.headers.get("Content-Type")
        if content_type is None or not content_type.startswith(_JSON_API):
            raise _HttpError(415, f"Content-Type must be {_JSON_API}, got {content_type!r}")
        attributes = _render_attributes(await _json_body(request))
        url: str = attributes["url"]
        priority = attributes.get("priority")
        request_id = request.headers.get(REQUEST_ID_HEADER)
        queue = self._faults.get(url)
        fault = queue.popleft() if queue else None
        self._requests.append(
            RecordedRequest(
                url=url,
                realm=attributes["realm"],
                auth=attributes["auth"],
                request_id=request_id,
                priority=priority,
                priority_header=request.headers.get(JOB_PRIORITY_HEADER),
                content_type=content_type,
                accept=request.headers.get("Accept"),
                status=fault.status if fault else 201,
            )
        )
        self._priorities[url] = priority
        echo = {REQUEST_ID_HEADER: request_id} if request_id else {}
        if fault is not None:
            headers = {
                **echo,
                **({SERVER_STATUS_HEADER: "draining"} if fault.draining_header else {}),
            }
            return web.Response(
                status=fault.status, text=f"simulated {_title(fault.status)}", headers=headers
            )
        self._counts[url] += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Read the graph before the latency, as a real renderer reads the source first.
        spec = self._graph.specs.get(url)
        rendered = self._graph.render(url)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if spec is not None and (spec.http_status is not None or spec.raw_body is not None):
            body = spec.raw_body if spec.raw_body is not None else "simulated prerender failure"
            return web.Response(status=spec.http_status or 201, text=body, headers=echo)
        meta: RenderMeta = {
            "requestId": request_id,
            "diagnostics": {"renderElapsedMs": round((loop.time() - started) * 1000, 3)},
        }
        document = {
            "data": {
                "type": _RESULT_TYPE,
                "id": url,
                "attributes": dataclasses.replace(rendered, meta=meta).to_json(),
            }
        }
        return web.json_response(document, status=201, content_type=_JSON_API, headers=echo)

    async def _handle_get_renders(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.render_counts())

    async def _handle_reset_renders(self, request: web.Request) -> web.StreamResponse:
        self.reset_renders()
        return web.json_response({"reset": True})

    async def _handle_get_attempts(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.attempt_counts())

    async def _handle_get_requests(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([r.to_json() for r in self._requests])

    async def _handle_get_priorities(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.priorities())

    async def _handle_post_fault(self, request: web.Request) -> web.StreamResponse:
        doc = await _json_body(request)
        url = _field(doc, "url", str)
        times = doc.get("times", 1)
        status = doc.get("status", 503)
        self.fail_next(url, times, status=status, draining_header=bool(doc.get("drainingHeader")))
        return web.json_response({"url": url, "pending": len(self._faults.get(url, ()))})

    async def _handle_get_modules(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"modules": graph_to_json(self._graph.specs), "versions": dict(self._graph.versions)}
        )

    async def _handle_put_module(self, request: web.Request) -> web.StreamResponse:
        doc = await _json_body(request)
        url = _field(doc, "url", str)
        version = self.set_module(url, ModuleSpec.from_json(doc.get("spec")))
        return web.json_response({"url": url, "version": version})

    async def _handle_delete_module(self, request: web.Request) -> web.StreamResponse:
        url = request.query.get("url")
        if not url:
            raise _HttpError(400, "DELETE /modules needs ?url=")
        removed = self.remove_module(url)
        return web.json_response(
            {"url": url, "removed": removed, "version": self.module_version(url)}
        )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        doc = json.loads(await request.read())
    except ValueError as exc:
        raise _HttpError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _HttpError(400, "body must be a JSON object")
    return doc


def _field(doc: Mapping[str, Any], name: str, kind: type[str]) -> str:
    value = doc.get(name)
    if not isinstance(value, kind):
        raise _HttpError(400, f"{name!r} must be a {kind.__name__}, got {value!r}")
    return value


def _render_attributes(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of a prerender-module request, checked as the seed's client checks
    them before sending (so a request our client would not send is refused here too)."""
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("type") != _REQUEST_TYPE:
        raise _HttpError(400, f"body must be a JSON:API document of type {_REQUEST_TYPE!r}")
    attributes = data.get("attributes")
    if not isinstance(attributes, dict):
        raise _HttpError(400, "data.attributes must be an object")
    missing = [
        name
        for name in ("affinityValue", "realm", "url", "auth")
        if not isinstance(attributes.get(name), str) or not attributes[name].strip()
    ]
    if attributes.get("affinityType") != "realm":
        missing.append("affinityType")
    if missing:
        raise _HttpError(400, f"Missing prerender {_REQUEST_TYPE} attributes: {', '.join(missing)}")
    priority = attributes.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        raise _HttpError(400, f"'priority' must be an integer, got {priority!r}")
    options = attributes.get("renderOptions")
    if options is not None and not isinstance(options, dict):
        raise _HttpError(400, f"'renderOptions' must be an object, got {options!r}")
    return attributes


class SimulatedPrerenderControl:
    """An HTTP client for a simulated server's control endpoints (counts, graph edits), for
    drivers in another process than the server. ``async with`` or :meth:`aclose` it."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SimulatedServerError(
                f"{method} {self.base_url}{path} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not response.is_success:
            raise SimulatedServerError(
                f"{method} {self.base_url}{path} answered HTTP {response.status_code}: "
                f"{response.text[:200]}"
            )
        return response.json()

    async def render_counts(self) -> dict[str, int]:
        """``GET /renders``."""
        counts: dict[str, int] = await self._call("GET", "/renders")
        return counts

    async def priorities(self) -> dict[str, int | None]:
        """``GET /priorities``."""
        seen: dict[str, int | None] = await self._call("GET", "/priorities")
        return seen

    async def reset_renders(self) -> None:
        """``POST /renders/reset``."""
        await self._call("POST", "/renders/reset")

    async def attempt_counts(self) -> dict[str, int]:
        """``GET /attempts``."""
        counts: dict[str, int] = await self._call("GET", "/attempts")
        return counts

    async def requests(self) -> list[dict[str, Any]]:
        """``GET /requests``: every render request, as :meth:`RecordedRequest.to_json`."""
        recorded: list[dict[str, Any]] = await self._call("GET", "/requests")
        return recorded

    async def fail_next(
        self, url: str, times: int = 1, *, status: int = 503, draining_header: bool = False
    ) -> None:
        """``POST /faults``: see :meth:`SimulatedPrerenderServer.fail_next`."""
        await self._call(
            "POST",
            "/faults",
            json={"url": url, "times": times, "status": status, "drainingHeader": draining_header},
        )

    async def set_module(self, url: str, spec: ModuleSpec) -> int:
        """``PUT /modules``; returns the module's new version."""
        doc = await self._call("PUT", "/modules", json={"url": url, "spec": spec.to_json()})
        return int(doc["version"])

    async def remove_module(self, url: str) -> bool:
        """``DELETE /modules?url=...``; False if the module was not there."""
        doc = await self._call("DELETE", "/modules", params={"url": url})
        return bool(doc["removed"])

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def __aenter__(self) -> SimulatedPrerenderControl:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --- another OS process --------------------------------------------------------------------


def start_in_subprocess(
    graph: Mapping[str, ModuleSpec],
    latency: float = 0.0,
    *,
    port: int = 0,
    startup_timeout: float = 30.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server in a new OS process; return the process and its base URL.

    Blocks until the server listens (at most ``startup_timeout`` seconds). End it with
    :func:`stop_subprocess`, which also closes its pipes.
    """
    process = subprocess.Popen(
        [
            sys.executable,
            # Same as `-m fleetcache.definitions.simulated`, but without runpy's warning when
            # the package __init__ has already imported this module.
            "-c",
            "import sys; from fleetcache.definitions.simulated import main; sys.exit(main())",
            "--graph",
            "-",
            "--latency-ms",
            repr(latency * 1000),
            "--port",
            str(port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    stdin, stdout = process.stdin, process.stdout
    if stdin is None or stdout is None:  # pragma: no cover - PIPE always gives both
        stop_subprocess(process)
        raise SimulatedServerError("subprocess pipes were not created")
    # readline() has no timeout, so read in a thread and give up after the deadline.
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    try:
        # A child that dies at once closes its stdin; its exit code is reported below.
        with contextlib.suppress(BrokenPipeError):
            stdin.write(json.dumps(graph_to_json(graph)).encode())
            stdin.close()
        reader.start()
        reader.join(startup_timeout)
        if reader.is_alive():
            raise SimulatedServerError(
                f"simulated prerender server did not print its URL within {startup_timeout} s"
            )
        base_url = lines[0].decode().strip() if lines else ""
        if not base_url.startswith("http://"):
            process.wait(startup_timeout)
            raise SimulatedServerError(
                f"simulated prerender server failed to start "
                f"(exit code {process.returncode}, first line {base_url!r})"
            )
    except BaseException:
        stop_subprocess(process)
        if reader.is_alive():
            reader.join()  # the child is gone, so readline() returns at once
        raise
    return process, base_url


def stop_subprocess(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Terminate a server started by :func:`start_in_subprocess` (SIGKILL if it does not
    stop within ``timeout`` seconds), close its pipes, and return its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            # Closing stdin flushes it, which fails if the child died before reading.
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
    return process.returncode


async def _serve_until_signalled(
    graph: Mapping[str, ModuleSpec], latency: float, host: str, port: int
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with SimulatedPrerenderServer(graph, latency=latency, host=host, port=port) as server:
        # The parent reads this first line to learn where we listen.
        sys.stdout.write(server.base_url + "\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve a graph until SIGTERM/SIGINT, printing the base URL first."""
    parser = argparse.ArgumentParser(
        prog="python -m fleetcache.definitions.simulated",
        description="Serve a simulated prerenderer for a module graph given as JSON.",
    )
    parser.add_argument("--graph", required=True, help="graph JSON file ('-' for stdin)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="render latency (ms)")
    parser.add_argument("--port", type=int, default=0, help="port (0: a random free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)
    if args.graph == "-":
        raw = json.load(sys.stdin)
    else:
        with open(args.graph, encoding="utf-8") as source:
            raw = json.load(source)
    graph = graph_from_json(raw)
    asyncio.run(_serve_until_signalled(graph, args.latency_ms / 1000, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
