"""A simulated prerender service: a real HTTP server that renders a module graph given as data.

It stands in for the real (slow, external) prerenderer in tests, the demo and the
benchmark. It counts every render, so a test can check that a fleet rendered each module
exactly once, and its graph can be edited while it runs, so a demo can "edit" a module.

Run it in this process::

    async with SimulatedPrerenderServer({"https://r.example/a/x.gts": ModuleSpec(["X"])}) as s:
        prerenderer = HttpPrerenderer(s.base_url)

or in another OS process (it prints its base URL as the first line of stdout)::

    python -m fleetcache.definitions.simulated --graph graph.json [--latency-ms N] [--port 0]

Endpoints::

    POST   /prerender/module   {url, realm_url, user_id, priority} -> a render response
    GET    /renders            {url: count}            POST /renders/reset  forget renders
    GET    /priorities         {url: last priority}
    GET    /modules            {"modules": {url: spec}, "versions": {url: version}}
    PUT    /modules            {url, spec}  -> {url, version}
    DELETE /modules?url=...    -> {url, removed, version}

Rendering module ``U``: not in the graph (exact key; no extension guessing, that is the
caching layer's job) → a module-error with status 404 and no deps; ``fail`` set → a
module-error with that message (status ``status`` or 500); an import that fails, however
deep → a module-error whose deps list every import on a path to the failure; otherwise
``ready`` with one definition per export. The graph is read when a render starts, before
the simulated latency, as a real renderer reads the source first: an edit during a render
does not change that render's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from fleetcache.definitions.models import (
    DefinitionResult,
    ModuleRenderResponse,
    RenderMeta,
    definition_entry,
    module_error,
)
from fleetcache.definitions.urls import EXECUTABLE_EXTENSIONS, canonicalize
from fleetcache.errors import ConfigurationError, DefinitionsError, NotOpenError

__all__ = [
    "ModuleSpec",
    "SimulatedPrerenderControl",
    "SimulatedPrerenderServer",
    "SimulatedServerError",
    "graph_from_json",
    "graph_to_json",
    "main",
    "start_in_subprocess",
    "stop_subprocess",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_DEFAULT_FAIL_STATUS = 500
_MISSING_STATUS = 404
# Fleet fan-out opens many connections at once; the asyncio default backlog (100) is small.
_LISTEN_BACKLOG = 1024
# A request head larger than this is refused (asyncio's StreamReader limit).
_MAX_HEAD_BYTES = 64 * 1024
_SPEC_KEYS = frozenset({"exports", "imports", "fail", "status", "http_status", "raw_body"})


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
        for url, spec in graph.items():
            self.set(url, spec)

    def set(self, url: str, spec: ModuleSpec) -> int:
        _check_module_url(url, "module")
        if not isinstance(spec, ModuleSpec):
            raise ConfigurationError(f"spec for {url!r} must be a ModuleSpec, got {spec!r}")
        self.specs[url] = spec
        self.versions[url] = self.versions.get(url, 0) + 1
        return self.versions[url]

    def remove(self, url: str) -> bool:
        if self.specs.pop(url, None) is None:
            return False
        self.versions[url] += 1
        return True

    def resolve_import(self, url: str) -> str | None:
        if url in self.specs:
            return url
        return next((url + ext for ext in EXECUTABLE_EXTENSIONS if url + ext in self.specs), None)

    def render(self, url: str) -> ModuleRenderResponse:
        spec = self.specs.get(url)
        if spec is None:
            return ModuleRenderResponse(
                "error", error=module_error(f"module not found: {url}", _MISSING_STATUS)
            )
        imports = list(spec.imports)
        if spec.fail is not None:
            return ModuleRenderResponse(
                "error",
                deps=imports,
                error=module_error(spec.fail, spec.status or _DEFAULT_FAIL_STATUS),
            )
        bad, roots = self._failing_imports(url)
        if roots:
            root, reason, status = roots[0]
            more = f" (and {len(roots) - 1} more)" if len(roots) > 1 else ""
            return ModuleRenderResponse(
                "error",
                deps=imports,
                error=module_error(
                    f"a dependency failed to render: {root}: {reason}{more}", status, bad
                ),
            )
        version = self.versions[url]
        definitions: dict[str, DefinitionResult] = {
            name: definition_entry(
                url, {"name": name, "kind": "card", "version": version}, [f"{url}/{name}"]
            )
            for name in spec.exports
        }
        return ModuleRenderResponse("ready", definitions, deps=imports)

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


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"


class _HttpError(Exception):
    """Answer the request with this status and message (JSON ``{"error": message}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_response(doc: object, status: int = 200) -> _Response:
    return _Response(status, json.dumps(doc).encode())


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
        # Render bookkeeping: written by render handlers and reset_renders(), read by
        # render_counts()/priorities(); all run on the server's loop, so no lock is needed.
        self._counts: dict[str, int] = {}
        self._priorities: dict[str, int | None] = {}
        # Connection handler tasks, so close() can end keep-alive connections a client
        # left open (asyncio.Server.close() only stops listening).
        self._connections: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``; raises :class:`NotOpenError` before :meth:`start`."""
        if self._base_url is None or self._server is None:
            raise NotOpenError("SimulatedPrerenderServer is not started")
        return self._base_url

    async def start(self) -> str:
        """Listen, and return the base URL."""
        if self._server is not None:
            return self.base_url
        self._server = await asyncio.start_server(
            self._serve_connection,
            self._host,
            self._port,
            backlog=_LISTEN_BACKLOG,
            limit=_MAX_HEAD_BYTES,
        )
        port = self._server.sockets[0].getsockname()[1]
        self._base_url = f"http://{self._host}:{port}"
        return self._base_url

    async def close(self) -> None:
        """Stop listening and end every open connection; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # A connection accepted just before close() registers itself on its first step.
        await asyncio.sleep(0)
        while self._connections:
            connections = list(self._connections)
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()

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

    # --- what was rendered ---------------------------------------------------------------

    def render_counts(self) -> dict[str, int]:
        """How many render requests each URL received since the start or the last reset."""
        return dict(self._counts)

    def priorities(self) -> dict[str, int | None]:
        """The last priority each URL was requested with."""
        return dict(self._priorities)

    def reset_renders(self) -> None:
        """Forget the render counts and priorities."""
        self._counts.clear()
        self._priorities.clear()

    # --- HTTP ----------------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _HttpError as exc:
                    # The stream is out of sync after a bad head; answer and hang up.
                    await _write_response(
                        writer, _json_response({"error": exc.message}, exc.status), False
                    )
                    return
                if request is None:
                    return
                response = await self._dispatch(request)
                await _write_response(writer, response, request.keep_alive)
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the client went away mid-request; nothing to answer
        except asyncio.CancelledError:
            # Only close() cancels this task, which it owns. Ending normally rather than
            # cancelled avoids Python 3.11's streams callback logging the CancelledError.
            return
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            # A close() that lands while we wait here must not end the task cancelled either.
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _dispatch(self, request: _Request) -> _Response:
        routes = {
            ("POST", "/prerender/module"): self._handle_render,
            ("GET", "/renders"): self._handle_get_renders,
            ("POST", "/renders/reset"): self._handle_reset_renders,
            ("GET", "/priorities"): self._handle_get_priorities,
            ("GET", "/modules"): self._handle_get_modules,
            ("PUT", "/modules"): self._handle_put_module,
            ("DELETE", "/modules"): self._handle_delete_module,
        }
        handler = routes.get((request.method, request.path))
        try:
            if handler is None:
                if any(path == request.path for _, path in routes):
                    raise _HttpError(405, f"{request.method} is not allowed on {request.path}")
                raise _HttpError(404, f"no such endpoint: {request.path}")
            return await handler(request)
        except _HttpError as exc:
            return _json_response({"error": exc.message}, exc.status)
        except ConfigurationError as exc:
            return _json_response({"error": str(exc)}, 400)
        except Exception:
            # A bug here must not kill the connection silently; log it and answer 500.
            logger.exception(
                "simulated prerender server failed on %s %s", request.method, request.path
            )
            return _json_response({"error": "internal error"}, 500)

    async def _handle_render(self, request: _Request) -> _Response:
        doc = _json_body(request)
        url = _field(doc, "url", str)
        _field(doc, "realm_url", str)
        _field(doc, "user_id", str)
        priority = doc.get("priority")
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise _HttpError(400, f"'priority' must be an integer or null, got {priority!r}")
        self._counts[url] = self._counts.get(url, 0) + 1
        self._priorities[url] = priority
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Read the graph before the latency, as a real renderer reads the source first.
        spec = self._graph.specs.get(url)
        rendered = self._graph.render(url)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if spec is not None and (spec.http_status is not None or spec.raw_body is not None):
            body = spec.raw_body if spec.raw_body is not None else "simulated prerender failure"
            status = spec.http_status or 200
            return _Response(status, body.encode(), "text/plain; charset=utf-8")
        meta: RenderMeta = {
            "request_id": str(uuid.uuid4()),
            "diagnostics": {"render_ms": round((loop.time() - started) * 1000, 3)},
        }
        return _json_response(dataclasses.replace(rendered, meta=meta).to_json())

    async def _handle_get_renders(self, request: _Request) -> _Response:
        return _json_response(self.render_counts())

    async def _handle_reset_renders(self, request: _Request) -> _Response:
        self.reset_renders()
        return _json_response({"reset": True})

    async def _handle_get_priorities(self, request: _Request) -> _Response:
        return _json_response(self.priorities())

    async def _handle_get_modules(self, request: _Request) -> _Response:
        return _json_response(
            {"modules": graph_to_json(self._graph.specs), "versions": dict(self._graph.versions)}
        )

    async def _handle_put_module(self, request: _Request) -> _Response:
        doc = _json_body(request)
        url = _field(doc, "url", str)
        version = self.set_module(url, ModuleSpec.from_json(doc.get("spec")))
        return _json_response({"url": url, "version": version})

    async def _handle_delete_module(self, request: _Request) -> _Response:
        urls = request.query.get("url")
        if not urls:
            raise _HttpError(400, "DELETE /modules needs ?url=")
        removed = self.remove_module(urls[0])
        return _json_response(
            {"url": urls[0], "removed": removed, "version": self.module_version(urls[0])}
        )


def _json_body(request: _Request) -> dict[str, Any]:
    try:
        doc = json.loads(request.body)
    except ValueError as exc:
        raise _HttpError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _HttpError(400, "body must be a JSON object")
    return doc


def _field(doc: Mapping[str, Any], name: str, kind: type[_T]) -> _T:
    value = doc.get(name)
    if not isinstance(value, kind):
        raise _HttpError(400, f"{name!r} must be a {kind.__name__}, got {value!r}")
    return value


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """Read one HTTP/1.1 request; None when the client closed between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _HttpError(400, "incomplete request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _HttpError(431, "request head too large") from exc
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _HttpError(400, f"bad request line: {request_line!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _HttpError(501, "chunked request bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as exc:
        raise _HttpError(400, "bad Content-Length") from exc
    body = await reader.readexactly(length) if length > 0 else b""
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when asked.
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    split = urlsplit(target)
    return _Request(method, split.path, parse_qs(split.query), body, keep_alive)


async def _write_response(
    writer: asyncio.StreamWriter, response: _Response, keep_alive: bool
) -> None:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Unknown"
    head = (
        f"HTTP/1.1 {response.status} {phrase}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + response.body)
    await writer.drain()


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
