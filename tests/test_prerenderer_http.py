"""The HTTP prerenderer against the simulated prerender server (in process and in another)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from fleetcache.definitions.errors import MalformedRenderResponseError, PrerenderError
from fleetcache.definitions.models import ModuleRenderResponse
from fleetcache.definitions.prerenderer import HttpPrerenderer, Prerenderer
from fleetcache.definitions.simulated import (
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

GRAPH = {
    f"{R}person.gts": ModuleSpec(["Person", "Pet"], [f"{R}base.gts"]),
    f"{R}base.gts": ModuleSpec(["Base"]),
    f"{R}broken.gts": ModuleSpec(["Broken"], fail="SyntaxError: unexpected token"),
    f"{R}forbidden.gts": ModuleSpec(["Secret"], fail="not allowed", status=403),
    f"{R}middle.gts": ModuleSpec(["Middle"], [f"{R}broken"]),
    f"{R}uses-broken.gts": ModuleSpec(["UsesBroken"], [f"{R}base.gts", f"{R}middle.gts"]),
    f"{R}uses-missing.gts": ModuleSpec(["UsesMissing"], [f"{R}ghost.gts"]),
    f"{R}outage.gts": ModuleSpec(["Outage"], http_status=503),
    f"{R}not-json.gts": ModuleSpec(["X"], raw_body="<html>gateway</html>"),
    f"{R}wrong-shape.gts": ModuleSpec(["X"], raw_body='{"status": "done"}'),
}


@pytest.fixture
async def server() -> AsyncIterator[SimulatedPrerenderServer]:
    """A simulated prerender server on a random port, serving GRAPH."""
    async with SimulatedPrerenderServer(GRAPH) as running:
        yield running


@pytest.fixture
async def prerenderer(server: SimulatedPrerenderServer) -> AsyncIterator[HttpPrerenderer]:
    """An HTTP prerenderer pointed at the simulated server."""
    async with HttpPrerenderer(server.base_url, timeout=10.0) as client:
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


async def test_ready_module_has_definitions_deps_and_meta(prerenderer: HttpPrerenderer) -> None:
    """A working module renders one definition per export, its imports as deps, and meta."""
    response = await render(prerenderer, f"{R}person.gts")
    assert response.status == "ready"
    assert response.error is None
    assert sorted(response.definitions) == ["Person", "Pet"]
    person = response.definitions["Person"]
    assert person["type"] == "definition"
    assert person["module_url"] == f"{R}person.gts"
    assert person["definition"] == {"name": "Person", "kind": "card", "version": 1}
    assert response.deps == [f"{R}base.gts"]
    assert response.meta is not None
    assert response.meta["request_id"]
    assert "render_ms" in response.meta["diagnostics"]


async def test_missing_module_is_a_404_module_error(prerenderer: HttpPrerenderer) -> None:
    """A module not in the graph answers a 404 module-error with no deps."""
    response = await render(prerenderer, f"{R}ghost.gts")
    assert response.status == "error"
    assert response.error is not None
    assert response.error["error"]["status"] == 404
    assert response.error["error"]["deps"] == []
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
    assert detail["deps"] == [f"{R}middle.gts", f"{R}broken.gts"]
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
    assert response.error["error"]["deps"] == [f"{R}ghost.gts"]
    assert not is_missing_module(response, f"{R}uses-missing.gts")


async def test_priority_is_passed_through_untouched(
    prerenderer: HttpPrerenderer,
    server: SimulatedPrerenderServer,
    control: SimulatedPrerenderControl,
) -> None:
    """The priority reaches the server as given, including 0, negatives and None."""
    await render(prerenderer, f"{R}person.gts", priority=0)
    await render(prerenderer, f"{R}base.gts", priority=-7)
    await render(prerenderer, f"{R}broken.gts", priority=None)
    expected = {f"{R}person.gts": 0, f"{R}base.gts": -7, f"{R}broken.gts": None}
    assert server.priorities() == expected
    assert await control.priorities() == expected
    await render(prerenderer, f"{R}person.gts", priority=10)
    assert server.priorities()[f"{R}person.gts"] == 10


async def test_render_counts_in_process_and_over_http(
    prerenderer: HttpPrerenderer,
    server: SimulatedPrerenderServer,
    control: SimulatedPrerenderControl,
) -> None:
    """Every render request is counted per URL, readable in process and over HTTP, and reset."""
    await asyncio.gather(*(render(prerenderer, f"{R}person.gts") for _ in range(5)))
    await render(prerenderer, f"{R}ghost.gts")
    expected = {f"{R}person.gts": 5, f"{R}ghost.gts": 1}
    assert server.render_counts() == expected
    assert await control.render_counts() == expected
    await control.reset_renders()
    assert server.render_counts() == {}
    assert server.priorities() == {}


async def test_concurrent_renders_with_latency_all_complete(prerenderer: HttpPrerenderer) -> None:
    """Many renders in flight at once, each sleeping, all get their answer."""
    async with SimulatedPrerenderServer(GRAPH, latency=0.2) as slow:
        async with HttpPrerenderer(slow.base_url) as client:
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
        return response.definitions["Base"]["definition"].get("version")  # type: ignore[typeddict-item]

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
    async with (
        SimulatedPrerenderServer(GRAPH, latency=0.5) as slow,
        HttpPrerenderer(slow.base_url) as client,
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
    assert old.definitions["Base"]["definition"]["version"] == 1  # type: ignore[typeddict-item]
    assert new.definitions["Base"]["definition"]["version"] == 2  # type: ignore[typeddict-item]


async def test_bad_control_requests_are_refused(control: SimulatedPrerenderControl) -> None:
    """A graph edit with a bad URL is answered 400 and raised as SimulatedServerError."""
    with pytest.raises(SimulatedServerError, match="400"):
        await control.set_module("relative/x.gts", ModuleSpec(["X"]))


async def test_server_not_listening_raises_prerender_error() -> None:
    """Nothing listening at the address gives a PrerenderError naming the URL and endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now.
    async with HttpPrerenderer(f"http://127.0.0.1:{port}", timeout=5.0) as client:
        with pytest.raises(PrerenderError) as caught:
            await render(client, f"{R}person.gts")
    assert caught.value.url == f"{R}person.gts"
    assert caught.value.status is None
    assert f"{R}person.gts" in str(caught.value)
    assert f"http://127.0.0.1:{port}/prerender/module" in str(caught.value)


async def test_http_error_answer_raises_prerender_error(prerenderer: HttpPrerenderer) -> None:
    """A non-2xx answer is a PrerenderError carrying the status and naming the URL."""
    with pytest.raises(PrerenderError, match="HTTP 503") as caught:
        await render(prerenderer, f"{R}outage.gts")
    assert caught.value.status == 503
    assert caught.value.url == f"{R}outage.gts"


async def test_wrong_endpoint_raises_prerender_error(server: SimulatedPrerenderServer) -> None:
    """A base URL whose endpoint does not exist (404 from the server) is a PrerenderError."""
    async with HttpPrerenderer(f"{server.base_url}/nowhere/") as client:
        with pytest.raises(PrerenderError, match="HTTP 404") as caught:
            await render(client, f"{R}person.gts")
    assert caught.value.endpoint == f"{server.base_url}/nowhere/prerender/module"


async def test_timeout_raises_prerender_error() -> None:
    """A render slower than the client's timeout is a PrerenderError, not a hang."""
    async with (
        SimulatedPrerenderServer(GRAPH, latency=30.0) as slow,
        HttpPrerenderer(slow.base_url, timeout=0.2) as client,
    ):
        with pytest.raises(PrerenderError, match=r"no answer within 0\.2 s"):
            await render(client, f"{R}person.gts")


@pytest.mark.parametrize(
    ("module", "problem"),
    [("not-json.gts", "body is not JSON"), ("wrong-shape.gts", "'status' must be")],
)
async def test_malformed_body_raises_malformed_render_response_error(
    prerenderer: HttpPrerenderer, module: str, problem: str
) -> None:
    """A 200 whose body is not JSON, or not a render response, is a MalformedRenderResponseError."""
    with pytest.raises(MalformedRenderResponseError, match=problem) as caught:
        await render(prerenderer, f"{R}{module}")
    assert caught.value.url == f"{R}{module}"


async def test_closed_prerenderer_refuses_to_render(server: SimulatedPrerenderServer) -> None:
    """After aclose, prerender_module raises NotOpenError instead of an httpx error."""
    client = HttpPrerenderer(server.base_url)
    await client.aclose()
    with pytest.raises(NotOpenError):
        await render(client, f"{R}person.gts")


@pytest.mark.parametrize(
    ("base_url", "timeout"), [("127.0.0.1:8080", 1.0), ("ftp://h/", 1.0), ("http://h", 0.0)]
)
def test_http_prerenderer_rejects_bad_configuration(base_url: str, timeout: float) -> None:
    """A base URL that is not http(s)://host, or a timeout <= 0, is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        HttpPrerenderer(base_url, timeout=timeout)


def test_http_prerenderer_is_a_prerenderer() -> None:
    """HttpPrerenderer satisfies the Prerenderer protocol."""
    assert issubclass(HttpPrerenderer, Prerenderer)


async def test_connection_close_and_http10_are_honoured(server: SimulatedPrerenderServer) -> None:
    """A client that asks to close (or speaks HTTP/1.0) gets one answer and then EOF."""
    port = int(server.base_url.rsplit(":", 1)[1])
    for request in (
        b"GET /renders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /renders HTTP/1.0\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), timeout=10)  # read() waits for EOF
        finally:
            writer.close()
            await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Connection: close\r\n" in answer
        assert answer.endswith(b"{}")


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
            HttpPrerenderer(base_url) as client,
            SimulatedPrerenderControl(base_url) as control,
        ):
            response = await render(client, f"{R}person.gts", priority=3)
            assert response.status == "ready"
            assert await control.render_counts() == {f"{R}person.gts": 1}
            assert await control.priorities() == {f"{R}person.gts": 3}
    finally:
        exit_code = await asyncio.to_thread(stop_subprocess, process)
    assert process.poll() is not None
    assert exit_code == 0  # SIGTERM is handled: the server closed itself and exited
