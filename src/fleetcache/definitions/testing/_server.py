"""The simulated prerender service: an aiohttp server answering the real prerender protocol."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from fleetcache.definitions.models import RenderMeta
from fleetcache.definitions.prerenderer import (
    JOB_PRIORITY_HEADER,
    REQUEST_ID_HEADER,
    SERVER_STATUS_HEADER,
)
from fleetcache.definitions.testing._errors import SimulatedServerError
from fleetcache.definitions.testing._graph import (
    ModuleGraph,
    ModuleSpec,
    check_status,
    graph_to_json,
    status_title,
)
from fleetcache.errors import ConfigurationError, NotOpenError

_DRAINING_STATUS = 410
_JSON_API = "application/vnd.api+json"
_REQUEST_TYPE = "prerender-module-request"
_RESULT_TYPE = "prerender-module-result"
# Fleet fan-out opens many connections at once; the default backlog (128) is small.
_LISTEN_BACKLOG = 1024
# close() gives a request still being answered this long before cancelling it.
_SHUTDOWN_GRACE = 0.25


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
    doc = {"errors": [{"status": status, "title": status_title(status), "message": message}]}
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
    """An HTTP prerender service on 127.0.0.1 (a random free port by default), speaking
    the seed system's protocol (see :class:`~fleetcache.definitions.HttpPrerenderer`) over
    a graph of :class:`ModuleSpec`::

        async with SimulatedPrerenderServer({"https://r.example/a/x.gts": ModuleSpec(["X"])}) as s:
            prerenderer = HttpPrerenderer(s.base_url, auth="token")

    Creating one does no I/O: ``await start()`` (or ``async with``) listens, ``close()``
    stops. Every method must be called from the event loop the server was started on.
    ``latency`` (seconds, settable at run time) is slept per render without blocking other
    requests. The graph is read when a render starts, before the latency, as a real renderer
    reads the source first: an edit during a render does not change that render's answer.
    A request answered by an injected fault (:meth:`fail_next`, :meth:`drain`) is an attempt
    but not a render. To run one in another OS process, see :func:`start_in_subprocess`;
    to drive one from another process, :class:`SimulatedPrerenderControl`.

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
        self._graph = ModuleGraph(graph or {})
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

    async def __aexit__(self, *exc_info: object) -> None:
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
        check_status(status, "status", 200)
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
                status=fault.status, text=f"simulated {status_title(fault.status)}", headers=headers
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
