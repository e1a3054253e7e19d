"""The HTTP prerenderer speaking the seed system's prerender protocol: against the simulated
prerender server (in process and in another), and against httpx.MockTransport where a
socket adds nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from fleetcache.definitions.errors import (
    MalformedRenderResponseError,
    PrerenderError,
    PrerenderRequestInvalidError,
    PrerenderTimeoutError,
)
from fleetcache.definitions.models import ModuleRenderResponse
from fleetcache.definitions.prerenderer import (
    HttpPrerenderer,
    Prerenderer,
    RetryPolicy,
    request_timeout_from_env,
)
from fleetcache.definitions.testing import (
    ModuleSpec,
    SimulatedPrerenderControl,
    SimulatedPrerenderServer,
    SimulatedServerError,
    graph_from_json,
    graph_to_json,
    start_in_subprocess,
    stop_subprocess,
)
from fleetcache.definitions.urls import is_missing_module
from fleetcache.errors import ConfigurationError, NotOpenError

R = "https://r.example/a/"
BASE = "http://prerender.test"
ENDPOINT = f"{BASE}/prerender-module"
# Retries that cost next to nothing, for tests that make a server fail on purpose.
FAST = RetryPolicy(max_attempts=5, base_delay=0.001, max_delay=0.002)

GRAPH = {
    f"{R}person.gts": ModuleSpec(["Person", "Pet"], [f"{R}base.gts"]),
    f"{R}base.gts": ModuleSpec(["Base"]),
    f"{R}broken.gts": ModuleSpec(["Broken"], fail="SyntaxError: unexpected token"),
    f"{R}forbidden.gts": ModuleSpec(["Secret"], fail="not allowed", status=403),
    f"{R}middle.gts": ModuleSpec(["Middle"], [f"{R}broken"]),
    f"{R}uses-broken.gts": ModuleSpec(["UsesBroken"], [f"{R}base.gts", f"{R}middle.gts"]),
    f"{R}uses-missing.gts": ModuleSpec(["UsesMissing"], [f"{R}ghost.gts"]),
    f"{R}outage.gts": ModuleSpec(["Outage"], http_status=503),
    f"{R}refused.gts": ModuleSpec(["X"], http_status=422),
    f"{R}not-json.gts": ModuleSpec(["X"], raw_body="<html>gateway</html>"),
    f"{R}no-attributes.gts": ModuleSpec(["X"], raw_body='{"data": {"type": "x"}}'),
    f"{R}wrong-shape.gts": ModuleSpec(
        ["X"], raw_body='{"data": {"attributes": {"status": "ready", "deps": "a.gts"}}}'
    ),
}


def token_for(realm_url: str, user_id: str) -> str:
    """The auth token the tests send: it names the user and the realm."""
    return f"token:{user_id}@{realm_url}"


@pytest.fixture
async def server() -> AsyncIterator[SimulatedPrerenderServer]:
    """A simulated prerender server on a random port, serving GRAPH."""
    async with SimulatedPrerenderServer(GRAPH) as running:
        yield running


@pytest.fixture
async def prerenderer(server: SimulatedPrerenderServer) -> AsyncIterator[HttpPrerenderer]:
    """An HTTP prerenderer pointed at the simulated server, with fast retries."""
    async with HttpPrerenderer(
        server.base_url, auth=token_for, retry=FAST, request_timeout=10.0
    ) as client:
        yield client


@pytest.fixture
async def control(server: SimulatedPrerenderServer) -> AsyncIterator[SimulatedPrerenderControl]:
    """A control client for the simulated server's HTTP endpoints."""
    async with SimulatedPrerenderControl(server.base_url) as client:
        yield client


async def render(
    prerenderer: Prerenderer, url: str, priority: int | None = None
) -> ModuleRenderResponse:
    """Render url in realm R as user '@u'."""
    return await prerenderer.prerender_module(url=url, realm_url=R, user_id="@u", priority=priority)


def free_port() -> int:
    """A port nothing listens on (free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- against the simulated server ------------------------------------------------------------


async def test_ready_module_speaks_the_seed_response(
    prerenderer: HttpPrerenderer, server: SimulatedPrerenderServer
) -> None:
    """A working module answers a ModuleRenderResponse: id, definitions by internal key with
    moduleURL without extension, exports, imports as deps, and meta echoing the request id."""
    response = await render(prerenderer, f"{R}person.gts")
    assert response.status == "ready"
    assert response.error is None
    assert response.id == f"{R}person.gts"
    assert response.nonce
    assert response.created_at is not None
    assert response.exports == ["Person", "Pet"]
    assert sorted(response.definitions) == [f"{R}person/Person", f"{R}person/Pet"]
    person = response.definitions[f"{R}person/Person"]
    assert person["type"] == "definition"
    assert person["moduleURL"] == f"{R}person"
    assert person["definition"] == {"name": "Person", "kind": "card", "version": 1}
    assert response.deps == [f"{R}base.gts"]
    assert response.meta is not None
    assert response.meta["requestId"] == server.requests()[0].request_id
    assert "renderElapsedMs" in (response.meta["diagnostics"] or {})


async def test_the_request_on_the_wire_follows_the_protocol(
    prerenderer: HttpPrerenderer, server: SimulatedPrerenderServer
) -> None:
    """The server sees JSON:API headers, a uuid4 request id, the priority header, the realm
    as affinity and the token from the auth function."""
    await render(prerenderer, f"{R}base.gts", priority=3)
    [seen] = server.requests()
    assert seen.content_type == "application/vnd.api+json"
    assert seen.accept == "application/vnd.api+json"
    assert seen.request_id is not None
    assert uuid.UUID(seen.request_id).version == 4
    assert (seen.priority, seen.priority_header) == (3, "3")
    assert (seen.realm, seen.auth) == (R, f"token:@u@{R}")
    assert seen.status == 201


async def test_missing_module_is_a_404_module_error(prerenderer: HttpPrerenderer) -> None:
    """A module not in the graph answers a 404 module-error with no deps."""
    response = await render(prerenderer, f"{R}ghost.gts")
    assert response.status == "error"
    assert response.error is not None
    assert response.error["error"]["status"] == 404
    assert response.error["error"].get("deps") == []
    assert is_missing_module(response, f"{R}ghost.gts")


async def test_lookup_is_by_exact_url(prerenderer: HttpPrerenderer) -> None:
    """The server guesses no extensions: person.ts and bare person are missing."""
    for url in (f"{R}person.ts", f"{R}person"):
        assert is_missing_module(await render(prerenderer, url), url)


async def test_failing_module_reports_its_message_and_status(
    prerenderer: HttpPrerenderer,
) -> None:
    """A module with `fail` answers a module-error with that message, 500 unless given."""
    broken = await render(prerenderer, f"{R}broken.gts")
    assert broken.status == "error"
    assert broken.error is not None
    assert broken.error["error"]["message"] == "SyntaxError: unexpected token"
    assert broken.error["error"]["status"] == 500
    assert broken.error["error"]["additionalErrors"] is None
    assert not is_missing_module(broken, f"{R}broken.gts")
    forbidden = await render(prerenderer, f"{R}forbidden.gts")
    assert forbidden.error is not None
    assert forbidden.error["error"]["status"] == 403


async def test_failing_import_fails_the_importer_naming_the_chain(
    prerenderer: HttpPrerenderer,
) -> None:
    """A transitive import failure fails the module; error deps list the failing path."""
    response = await render(prerenderer, f"{R}uses-broken.gts")
    assert response.status == "error"
    assert response.deps == [f"{R}base.gts", f"{R}middle.gts"]
    assert response.error is not None
    detail = response.error["error"]
    assert detail.get("deps") == [f"{R}middle.gts", f"{R}broken.gts"]
    assert "dependency failed" in detail["message"]
    assert f"{R}broken.gts" in detail["message"]
    assert detail["status"] == 500


async def test_missing_import_is_a_404_that_is_not_a_missing_module(
    prerenderer: HttpPrerenderer,
) -> None:
    """Importing a missing module gives a 404 naming it, which is not this module missing."""
    response = await render(prerenderer, f"{R}uses-missing.gts")
    assert response.error is not None
    assert response.error["error"]["status"] == 404
    assert response.error["error"].get("deps") == [f"{R}ghost.gts"]
    assert not is_missing_module(response, f"{R}uses-missing.gts")


async def test_priority_is_passed_through_and_only_a_non_negative_one_is_a_header(
    prerenderer: HttpPrerenderer,
    server: SimulatedPrerenderServer,
    control: SimulatedPrerenderControl,
) -> None:
    """The body carries the priority as given (0 and negatives included, None left out); the
    job priority header is sent only for a non-negative integer."""
    await render(prerenderer, f"{R}person.gts", priority=0)
    await render(prerenderer, f"{R}base.gts", priority=-7)
    await render(prerenderer, f"{R}broken.gts", priority=None)
    expected = {f"{R}person.gts": 0, f"{R}base.gts": -7, f"{R}broken.gts": None}
    assert server.priorities() == expected
    assert await control.priorities() == expected
    assert [r.priority_header for r in server.requests()] == ["0", None, None]
    await render(prerenderer, f"{R}person.gts", priority=10)
    assert server.priorities()[f"{R}person.gts"] == 10


async def test_render_counts_in_process_and_over_http(
    prerenderer: HttpPrerenderer,
    server: SimulatedPrerenderServer,
    control: SimulatedPrerenderControl,
) -> None:
    """Every render is counted per URL, readable in process and over HTTP, and reset."""
    await asyncio.gather(*(render(prerenderer, f"{R}person.gts") for _ in range(5)))
    await render(prerenderer, f"{R}ghost.gts")
    expected = {f"{R}person.gts": 5, f"{R}ghost.gts": 1}
    assert server.render_counts() == expected
    assert await control.render_counts() == expected
    assert await control.attempt_counts() == expected
    assert len(await control.requests()) == 6
    await control.reset_renders()
    assert server.render_counts() == {}
    assert server.priorities() == {}
    assert server.requests() == []


async def test_concurrent_renders_with_latency_all_complete() -> None:
    """Many renders in flight at once, each sleeping, all get their answer."""
    async with SimulatedPrerenderServer(GRAPH, latency=0.2) as slow:
        async with HttpPrerenderer(slow.base_url, auth="t") as client:
            urls = [f"{R}person.gts", f"{R}base.gts", f"{R}broken.gts"] * 10
            responses = await asyncio.gather(*(render(client, url) for url in urls))
        assert [r.status for r in responses[:3]] == ["ready", "ready", "error"]
        assert slow.render_counts() == dict.fromkeys(urls[:3], 10)


async def test_changing_a_module_bumps_its_version(
    prerenderer: HttpPrerenderer,
    server: SimulatedPrerenderServer,
    control: SimulatedPrerenderControl,
) -> None:
    """Each set or remove, in process or over HTTP, bumps the module's version."""
    url = f"{R}base.gts"

    async def version() -> object:
        response = await render(prerenderer, url)
        return response.definitions[f"{R}base/Base"]["definition"].get("version")  # type: ignore[typeddict-item]

    assert await version() == 1
    assert server.set_module(url, ModuleSpec(["Base"])) == 2
    assert await version() == 2
    assert await control.set_module(url, ModuleSpec(["Base", "Extra"])) == 3
    assert await version() == 3
    assert await control.remove_module(url) is True
    assert is_missing_module(await render(prerenderer, url), url)
    assert await control.remove_module(url) is False
    assert server.set_module(url, ModuleSpec(["Base"])) == 5
    assert await version() == 5


async def test_an_edit_during_a_render_does_not_change_that_render() -> None:
    """A render reads the graph when it starts, so an edit mid-render shows up only later."""
    url = f"{R}base.gts"
    key = f"{R}base/Base"
    async with (
        SimulatedPrerenderServer(GRAPH, latency=0.5) as slow,
        HttpPrerenderer(slow.base_url, auth="t") as client,
    ):
        first = asyncio.create_task(render(client, url))
        # The count goes up in the same step as the graph is read, so this marks the start.
        for _ in range(1000):  # bounded: at most ~10 s
            if url in slow.render_counts():
                break
            await asyncio.sleep(0.01)
        slow.set_module(url, ModuleSpec(["Base"]))
        old = await first
        new = await render(client, url)
    assert old.definitions[key]["definition"]["version"] == 1  # type: ignore[typeddict-item]
    assert new.definitions[key]["definition"]["version"] == 2  # type: ignore[typeddict-item]


async def test_bad_control_requests_are_refused(control: SimulatedPrerenderControl) -> None:
    """A graph edit with a bad URL is answered 400 and raised as SimulatedServerError."""
    with pytest.raises(SimulatedServerError, match="400"):
        await control.set_module("relative/x.gts", ModuleSpec(["X"]))


async def test_the_server_refuses_a_request_the_protocol_does_not_allow(
    server: SimulatedPrerenderServer,
) -> None:
    """A body that is not a prerender-module-request with every required attribute, or is
    not sent as JSON:API, is refused (so a broken client cannot pass against it)."""
    good = {
        "affinityType": "realm",
        "affinityValue": R,
        "realm": R,
        "url": f"{R}base.gts",
        "auth": "t",
        "renderOptions": {},
    }
    json_api = {"Content-Type": "application/vnd.api+json"}
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        bad_type = await client.post(
            "/prerender-module",
            json={"data": {"type": "x", "attributes": good}},
            headers=json_api,
        )
        no_auth = await client.post(
            "/prerender-module",
            json={"data": {"type": "prerender-module-request", "attributes": {**good, "auth": ""}}},
            headers=json_api,
        )
        plain_json = await client.post(
            "/prerender-module",
            json={"data": {"type": "prerender-module-request", "attributes": good}},
        )
    assert bad_type.status_code == 400
    assert no_auth.status_code == 400
    assert "Missing prerender prerender-module-request attributes: auth" in no_auth.text
    assert plain_json.status_code == 415
    assert server.render_counts() == {}


@pytest.mark.parametrize("via", ["status", "header"])
async def test_draining_is_retried_with_one_request_id_until_it_renders(
    prerenderer: HttpPrerenderer, server: SimulatedPrerenderServer, via: str
) -> None:
    """A module answering "draining" (410, or the status header on a 200) 3 times is
    retried under one request id, and renders on the 4th attempt."""
    url = f"{R}person.gts"
    server.drain(url, 3, via=via)  # type: ignore[arg-type]
    response = await render(prerenderer, url)
    assert response.status == "ready"
    assert server.attempt_counts() == {url: 4}
    assert server.render_counts() == {url: 1}
    [ids] = server.request_ids().values()
    assert len(set(ids)) == 1
    assert [r.status for r in server.requests()] == [410 if via == "status" else 200] * 3 + [201]


@pytest.mark.parametrize("status", [503, 500, 502])
async def test_server_errors_are_retried_until_it_renders(
    prerenderer: HttpPrerenderer, control: SimulatedPrerenderControl, status: int
) -> None:
    """A 503 or any other 5xx is retried; the call succeeds once the server renders."""
    url = f"{R}base.gts"
    await control.fail_next(url, 2, status=status)
    response = await render(prerenderer, url)
    assert response.status == "ready"
    assert await control.attempt_counts() == {url: 3}
    assert await control.render_counts() == {url: 1}
    assert len({r["request_id"] for r in await control.requests()}) == 1


async def test_a_refused_connection_is_retried_until_the_server_listens() -> None:
    """Nothing listening at first (connection refused): the client retries, and renders
    once the server is up (it is started during the client's first backoff wait)."""
    port = free_port()
    server = SimulatedPrerenderServer(GRAPH, port=port)
    waits: list[float] = []

    async def start_server_while_waiting(seconds: float) -> None:
        waits.append(seconds)
        await server.start()

    async with (
        HttpPrerenderer(
            f"http://127.0.0.1:{port}", auth="t", retry=FAST, sleep=start_server_while_waiting
        ) as client,
    ):
        try:
            response = await render(client, f"{R}base.gts")
        finally:
            await server.close()
    assert response.status == "ready"
    assert waits == [FAST.base_delay]
    assert server.attempt_counts() == {f"{R}base.gts": 1}


async def test_retries_that_never_succeed_end_in_a_prerender_error(
    prerenderer: HttpPrerenderer, server: SimulatedPrerenderServer
) -> None:
    """A server that keeps answering 503 is tried max_attempts times, then a PrerenderError
    carries the status, the attempts and the one request id they all used."""
    url = f"{R}outage.gts"
    with pytest.raises(PrerenderError) as caught:
        await render(prerenderer, url)
    error = caught.value
    assert (error.url, error.status, error.attempts) == (url, 503, FAST.max_attempts)
    assert f"Prerender request to {prerenderer.endpoint} failed with status 503" in str(error)
    assert f"gave up after {FAST.max_attempts} attempts" in str(error)
    assert server.request_ids()[url] == [error.request_id] * FAST.max_attempts


@pytest.mark.parametrize("status", [404, 422, 400])
async def test_other_client_errors_are_not_retried(
    prerenderer: HttpPrerenderer, server: SimulatedPrerenderServer, status: int
) -> None:
    """A 4xx other than 410 fails at once with the protocol's message naming the status."""
    url = f"{R}base.gts"
    server.fail_next(url, 1, status=status)
    with pytest.raises(PrerenderError) as caught:
        await render(prerenderer, url)
    assert caught.value.status == status
    assert (
        f"Prerender request to {prerenderer.endpoint} failed with status {status}: simulated "
        in str(caught.value)
    )
    assert server.attempt_counts() == {url: 1}


async def test_wrong_endpoint_is_a_404_prerender_error(server: SimulatedPrerenderServer) -> None:
    """A base URL whose endpoint does not exist (404 from the server) is not retried."""
    async with HttpPrerenderer(f"{server.base_url}/nowhere/", auth="t", retry=FAST) as client:
        with pytest.raises(PrerenderError, match="failed with status 404") as caught:
            await render(client, f"{R}person.gts")
    assert caught.value.endpoint == f"{server.base_url}/nowhere/prerender-module"
    assert caught.value.attempts == 1


async def test_a_timed_out_attempt_is_not_retried_and_says_where_the_time_went() -> None:
    """An attempt slower than the request timeout is a PrerenderTimeoutError at once: it
    names the request id, the attempt k/N, the realm and the elapsed time."""
    url = f"{R}person.gts"
    async with (
        SimulatedPrerenderServer(GRAPH, latency=30.0) as slow,
        HttpPrerenderer(slow.base_url, auth="t", retry=FAST, request_timeout=0.2) as client,
    ):
        with pytest.raises(PrerenderTimeoutError) as caught:
            await render(client, url)
        attempts = slow.attempt_counts()
    error = caught.value
    assert attempts == {url: 1}
    assert (error.attempt, error.max_attempts, error.realm_url) == (1, FAST.max_attempts, R)
    assert error.elapsed >= 0.2
    message = str(error)
    assert f"requestId={error.request_id}" in message
    assert f"attempt=1/{FAST.max_attempts}" in message
    assert f"affinity=realm:{R}" in message
    assert "elapsed=" in message
    assert "aborted after 200ms" in message


async def test_created_without_data_attributes_is_a_malformed_response(
    prerenderer: HttpPrerenderer, server: SimulatedPrerenderServer
) -> None:
    """A 201 whose body has no data.attributes is a MalformedRenderResponseError (not
    retried) naming that path."""
    url = f"{R}no-attributes.gts"
    with pytest.raises(MalformedRenderResponseError, match=r"no data\.attributes") as caught:
        await render(prerenderer, url)
    assert caught.value.path == "data.attributes"
    assert caught.value.url == url
    assert server.attempt_counts() == {url: 1}


@pytest.mark.parametrize(
    ("module", "problem", "path"),
    [
        ("not-json.gts", "body is not JSON", None),
        ("wrong-shape.gts", "deps must be a list, got str", "deps"),
    ],
)
async def test_malformed_body_raises_malformed_render_response_error(
    prerenderer: HttpPrerenderer, module: str, problem: str, path: str | None
) -> None:
    """A 201 whose body is not JSON, or whose attributes are not a render response, is a
    MalformedRenderResponseError naming the field."""
    with pytest.raises(MalformedRenderResponseError, match=problem) as caught:
        await render(prerenderer, f"{R}{module}")
    assert caught.value.url == f"{R}{module}"
    assert caught.value.path == path


async def test_closed_prerenderer_refuses_to_render(server: SimulatedPrerenderServer) -> None:
    """After aclose, prerender_module raises NotOpenError instead of an httpx error."""
    client = HttpPrerenderer(server.base_url, auth="t")
    await client.aclose()
    with pytest.raises(NotOpenError):
        await render(client, f"{R}person.gts")


@pytest.mark.parametrize(
    ("base_url", "kwargs"),
    [
        ("127.0.0.1:8080", {"auth": "t"}),
        ("ftp://h/", {"auth": "t"}),
        ("http://h", {"auth": "t", "request_timeout": 0.0}),
        ("http://h", {"auth": 42}),
    ],
)
def test_http_prerenderer_rejects_bad_configuration(base_url: str, kwargs: Any) -> None:
    """A base URL that is not http(s)://host, a timeout <= 0 or an auth that is neither a
    token nor a function is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        HttpPrerenderer(base_url, **kwargs)


def test_http_prerenderer_is_a_prerenderer() -> None:
    """HttpPrerenderer satisfies the Prerenderer protocol."""
    assert issubclass(HttpPrerenderer, Prerenderer)


def test_graph_json_round_trips_and_rejects_typos() -> None:
    """A graph survives to/from JSON, and an unknown spec key is a ConfigurationError."""
    assert graph_from_json(graph_to_json(GRAPH)) == GRAPH
    with pytest.raises(ConfigurationError, match="unknown module spec keys"):
        graph_from_json({f"{R}x.gts": {"exports": ["X"], "fails": "typo"}})
    with pytest.raises(ConfigurationError, match="absolute http"):
        ModuleSpec(["X"], imports=["./relative.gts"])


@pytest.mark.processes
async def test_server_in_a_subprocess_serves_renders_and_stops() -> None:
    """start_in_subprocess gives a URL that renders; stopping it ends the process cleanly."""
    process, base_url = await asyncio.to_thread(start_in_subprocess, GRAPH, 0.0)
    try:
        assert process.poll() is None
        async with (
            HttpPrerenderer(base_url, auth="t", retry=FAST) as client,
            SimulatedPrerenderControl(base_url) as control,
        ):
            await control.fail_next(f"{R}person.gts", 1, status=410)
            response = await render(client, f"{R}person.gts", priority=3)
            assert response.status == "ready"
            assert await control.render_counts() == {f"{R}person.gts": 1}
            assert await control.attempt_counts() == {f"{R}person.gts": 2}
            assert await control.priorities() == {f"{R}person.gts": 3}
    finally:
        exit_code = await asyncio.to_thread(stop_subprocess, process)
    assert process.poll() is not None
    assert exit_code == 0  # SIGTERM is handled: the server closed itself and exited


@pytest.mark.processes
def test_the_definitions_package_never_loads_the_simulated_server() -> None:
    """In a fresh interpreter, ``import fleetcache.definitions`` with a star import and every
    public name looked up loads neither aiohttp nor ``fleetcache.definitions.testing``."""
    code = (
        "import sys\n"
        "import fleetcache.definitions as definitions\n"
        "from fleetcache.definitions import *\n"
        "for name in definitions.__all__: getattr(definitions, name)\n"
        "loaded = [m for m in sys.modules if m.partition('.')[0] == 'aiohttp'\n"
        "          or m.startswith('fleetcache.definitions.testing')]\n"
        "print(sorted(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


# --- against httpx.MockTransport ---------------------------------------------------------------


def attributes_doc(url: str) -> dict[str, Any]:
    """A minimal ready ModuleRenderResponse for url."""
    return {"id": url, "status": "ready", "deps": [], "definitions": {}}


def created(url: str) -> httpx.Response:
    """The 201 a prerender server answers for url."""
    data = {"type": "prerender-module-result", "id": url, "attributes": attributes_doc(url)}
    return httpx.Response(201, json={"data": data})


class Recorder:
    """A MockTransport handler that answers from a script and keeps every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        """Answer the next scripted response (the last one repeats), or raise it."""
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def mock_client(
    recorder: Recorder,
    *,
    auth: Any = "secret-token",
    retry: RetryPolicy = FAST,
    sleep: Callable[[float], Any] | None = None,
) -> HttpPrerenderer:
    """An HttpPrerenderer whose requests go to ``recorder`` instead of a socket."""
    extra: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
    return HttpPrerenderer(
        BASE, auth=auth, retry=retry, transport=httpx.MockTransport(recorder), **extra
    )


async def test_exact_request_body_and_headers_with_one_id_across_retries() -> None:
    """The body is the JSON:API prerender-module-request (priority present when given), the
    headers are the protocol's, and every retry carries the same uuid4 request id."""
    url = f"{R}person.gts"
    recorder = Recorder(httpx.Response(503), httpx.Response(410), created(url))
    async with mock_client(recorder) as client:
        response = await client.prerender_module(url=url, realm_url=R, user_id="@u", priority=10)
    assert response.id == url
    assert len(recorder.requests) == 3
    first = recorder.requests[0]
    assert (first.method, str(first.url)) == ("POST", ENDPOINT)
    assert json.loads(first.content) == {
        "data": {
            "type": "prerender-module-request",
            "attributes": {
                "affinityType": "realm",
                "affinityValue": R,
                "realm": R,
                "url": url,
                "auth": "secret-token",
                "renderOptions": {},
                "priority": 10,
            },
        }
    }
    assert first.headers["content-type"] == "application/vnd.api+json"
    assert first.headers["accept"] == "application/vnd.api+json"
    assert first.headers["x-boxel-job-priority"] == "10"
    request_ids = {r.headers["x-boxel-prerender-request-id"] for r in recorder.requests}
    assert len(request_ids) == 1
    assert uuid.UUID(request_ids.pop()).version == 4
    assert all(r.content == first.content for r in recorder.requests)


async def test_no_priority_means_no_priority_attribute_nor_header() -> None:
    """priority=None leaves the attribute and the header out; a negative one is sent in the
    body only; each call gets a new request id."""
    recorder = Recorder(created(f"{R}x.gts"))
    async with mock_client(recorder) as client:
        await client.prerender_module(url=f"{R}x.gts", realm_url=R, user_id="@u", priority=None)
        await client.prerender_module(url=f"{R}x.gts", realm_url=R, user_id="@u", priority=-1)
    none, negative = recorder.requests
    assert "priority" not in json.loads(none.content)["data"]["attributes"]
    assert "x-boxel-job-priority" not in none.headers
    assert json.loads(negative.content)["data"]["attributes"]["priority"] == -1
    assert "x-boxel-job-priority" not in negative.headers
    ids = [r.headers["x-boxel-prerender-request-id"] for r in recorder.requests]
    assert ids[0] != ids[1]


@pytest.mark.parametrize(
    ("realm_url", "url", "auth", "missing"),
    [
        (R, f"{R}x.gts", "", "auth"),
        (R, f"{R}x.gts", "   ", "auth"),
        (R, f"{R}x.gts", lambda realm, user: "", "auth"),
        ("", f"{R}x.gts", "t", "affinityValue, realm"),
        (R, "", "", "url, auth"),
    ],
)
async def test_missing_attributes_are_refused_before_any_network_call(
    realm_url: str, url: str, auth: Any, missing: str
) -> None:
    """An empty realm, URL or auth token is refused with the protocol's message listing what
    is missing, and no request is sent."""
    recorder = Recorder(created(url))
    async with mock_client(recorder, auth=auth) as client:
        with pytest.raises(PrerenderRequestInvalidError) as caught:
            await client.prerender_module(url=url, realm_url=realm_url, user_id="@u", priority=1)
    assert f"Missing prerender prerender-module-request attributes: {missing}" in str(caught.value)
    assert caught.value.missing == tuple(missing.split(", "))
    assert isinstance(caught.value, PrerenderError)
    assert recorder.requests == []


async def test_auth_function_gets_the_realm_and_user_and_may_be_async() -> None:
    """A callable auth is asked (realm_url, user_id) per render, sync or async."""
    seen: list[tuple[str, str]] = []

    async def mint(realm_url: str, user_id: str) -> str:
        seen.append((realm_url, user_id))
        return f"minted-for-{user_id}"

    recorder = Recorder(created(f"{R}x.gts"))
    async with mock_client(recorder, auth=mint) as client:
        await client.prerender_module(url=f"{R}x.gts", realm_url=R, user_id="@alice", priority=None)
    assert seen == [(R, "@alice")]
    assert json.loads(recorder.requests[0].content)["data"]["attributes"]["auth"] == (
        "minted-for-@alice"
    )


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(410, text="going away"),
        httpx.Response(409, headers={"X-Boxel-Prerender-Server-Status": "draining"}),
        httpx.Response(503),
        httpx.Response(500, text="boom"),
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ConnectTimeout("connect timed out"),
    ],
    ids=["410", "draining-header", "503", "500", "refused", "reset", "disconnected", "connect"],
)
async def test_retryable_failures_are_retried_then_succeed(
    failure: httpx.Response | Exception,
) -> None:
    """410, the draining header (even on a 4xx), 5xx and connection failures are retried."""
    recorder = Recorder(failure, failure, created(f"{R}x.gts"))
    async with mock_client(recorder) as client:
        response = await client.prerender_module(
            url=f"{R}x.gts", realm_url=R, user_id="@u", priority=None
        )
    assert response.status == "ready"
    assert len(recorder.requests) == 3


async def test_backoff_doubles_from_the_base_delay_up_to_the_cap_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The waits are 200 ms doubling, capped; each retry is a WARNING naming the request id."""
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    recorder = Recorder(httpx.Response(503))
    policy = RetryPolicy(max_attempts=6, base_delay=0.2, max_delay=1.0)
    caplog.set_level(logging.WARNING, logger="fleetcache.definitions.prerenderer")
    async with mock_client(recorder, retry=policy, sleep=record) as client:
        with pytest.raises(PrerenderError) as caught:
            await client.prerender_module(url=f"{R}x.gts", realm_url=R, user_id="@u", priority=0)
    assert waits == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert len(recorder.requests) == 6
    retries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 5
    assert all(caught.value.request_id in r.getMessage() for r in retries)
    assert "attempt 1/6" in retries[0].getMessage()


async def test_any_2xx_with_attributes_is_accepted() -> None:
    """As the seed's client does, any 2xx (not only 201) with data.attributes is a success."""
    ok = httpx.Response(200, json={"data": {"attributes": attributes_doc(f"{R}x.gts")}})
    async with mock_client(Recorder(ok)) as client:
        response = await client.prerender_module(
            url=f"{R}x.gts", realm_url=R, user_id="@u", priority=None
        )
    assert response.status == "ready"


@pytest.mark.parametrize(
    "body", [{"data": {}}, {"data": {"attributes": None}}, {"data": []}, {}, []]
)
async def test_success_without_attributes_is_refused_once(body: Any) -> None:
    """A 201 whose data.attributes is missing or null is a typed error, not retried."""
    recorder = Recorder(httpx.Response(201, json=body))
    async with mock_client(recorder) as client:
        with pytest.raises(MalformedRenderResponseError, match=r"no data\.attributes") as caught:
            await client.prerender_module(url=f"{R}x.gts", realm_url=R, user_id="@u", priority=1)
    assert caught.value.path == "data.attributes"
    assert len(recorder.requests) == 1


def test_retry_policy_from_env_honours_the_seed_settings_and_floors() -> None:
    """PRERENDER_MANAGER_RETRY_* set the policy; too-small values are raised to the seed's
    floors (1 attempt, 50 ms, 1000 ms); unset or non-numeric values take the defaults."""
    assert RetryPolicy.from_env({}) == RetryPolicy(12, 0.2, 180.0)
    env = {
        "PRERENDER_MANAGER_RETRY_ATTEMPTS": "3",
        "PRERENDER_MANAGER_RETRY_DELAY_MS": "100",
        "PRERENDER_MANAGER_MAX_DELAY_MS": "5000",
    }
    assert RetryPolicy.from_env(env) == RetryPolicy(3, 0.1, 5.0)
    floors = {
        "PRERENDER_MANAGER_RETRY_ATTEMPTS": "0",
        "PRERENDER_MANAGER_RETRY_DELAY_MS": "1",
        "PRERENDER_MANAGER_MAX_DELAY_MS": "10",
    }
    assert RetryPolicy.from_env(floors) == RetryPolicy(1, 0.05, 1.0)
    assert RetryPolicy.from_env({"PRERENDER_MANAGER_RETRY_ATTEMPTS": "many"}).max_attempts == 12


def test_request_timeout_from_env_follows_the_seed_fallbacks() -> None:
    """The manager request timeout, else the request timeout, else render + 60 s, else
    120 s; never under 1 s."""
    assert request_timeout_from_env({}) == 120.0
    assert request_timeout_from_env({"RENDER_TIMEOUT_MS": "90000"}) == 150.0
    assert request_timeout_from_env({"PRERENDER_REQUEST_TIMEOUT_MS": "30000"}) == 30.0
    assert request_timeout_from_env({"PRERENDER_MANAGER_REQUEST_TIMEOUT_MS": "5"}) == 1.0
    assert (
        request_timeout_from_env(
            {"PRERENDER_MANAGER_REQUEST_TIMEOUT_MS": "2500", "PRERENDER_REQUEST_TIMEOUT_MS": "9"}
        )
        == 2.5
    )


def test_retry_policy_rejects_nonsense() -> None:
    """Zero attempts or a base delay above the cap is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError):
        RetryPolicy(base_delay=2.0, max_delay=1.0)
