"""Cross-process populate coordination between real OS processes (the seed's PR and the
holes it left: a winner that dies, a winner that fails)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleet_worker import start
from fleetcache.definitions.testing import ModuleSpec, SimulatedPrerenderServer
from fleetcache_cli.shared import Fleet, Member
from waiting import eventually

pytestmark = pytest.mark.processes

REALM = "https://realm.example/"
REALM_ARG = f"{REALM},public,owner"


@pytest.fixture
async def server() -> AsyncIterator[SimulatedPrerenderServer]:
    """A simulated prerender server in this process; the fleet reaches it over HTTP."""
    async with SimulatedPrerenderServer() as s:
        yield s


async def start_fleet(
    fleet: Fleet[Any, Any], database_url: str, server: SimulatedPrerenderServer
) -> list[Member]:
    """Make every worker of ``fleet`` a coordinated member (long waits, fast crash probe)."""
    args = ["--url", database_url, "--coordinate", "--prerender", server.base_url]
    args += ["--realm", REALM_ARG, "--wait-timeout", "60", "--probe-interval", "0.5"]
    return list(await asyncio.gather(*(start(fleet, i, *args) for i in range(fleet.size))))


async def wait_for_render(server: SimulatedPrerenderServer, url: str, timeout: float = 20) -> None:
    """Wait until the server has received a render request for ``url``."""
    await eventually(lambda: server.render_counts().get(url, 0) > 0, timeout)


async def test_cold_fan_out_renders_each_module_once(
    database_url: str, server: SimulatedPrerenderServer
) -> None:
    """4 processes looking up the same 20 modules at once render each module exactly once,
    and every process gets every module."""
    urls = [f"{REALM}m{i}.gts" for i in range(20)]
    for url in urls:
        server.set_module(url, ModuleSpec(["Card"]))
    server.latency = 0.2
    with Fleet(4, name="test-member") as fleet:
        members = await start_fleet(fleet, database_url, server)
        for member in members:
            member.send("definitions", urls=urls)
        answers = [await member.receive(120) for member in members]
    for answer in answers:
        assert [r["outcome"] for r in answer["results"]] == ["ok"] * 20, answer
    assert server.render_counts() == dict.fromkeys(urls, 1)


async def test_killed_winner_is_replaced_within_seconds(
    database_url: str, server: SimulatedPrerenderServer
) -> None:
    """The winner is SIGKILLed mid-prerender (its lock vanishes, no NOTIFY): a waiting peer
    notices through the lock probe, renders the module itself, and every caller is answered
    long before the 60 s wait would have run out."""
    url = f"{REALM}slow.gts"
    server.set_module(url, ModuleSpec(["Card"]))
    server.latency = 5.0
    with Fleet(3, name="test-member") as fleet:
        winner, *peers = await start_fleet(fleet, database_url, server)
        winner.send("definitions", urls=[url])
        await wait_for_render(server, url)
        for peer in peers:
            peer.send("definitions", urls=[url])
        await asyncio.sleep(0.5)  # the peers lose the lock and park
        server.latency = 0.2
        killed_at = time.time()
        winner.kill()
        answers = [await peer.receive(40) for peer in peers]
        stats = [await peer.call("stats") for peer in peers]
    for answer in answers:
        assert answer["results"][0]["outcome"] == "ok", answer
        assert answer["t_end"] - killed_at < 30
    assert server.render_counts()[url] == 2
    probe_wakes = sum(s["stats"]["coordinator"]["woken_probe"] for s in stats)
    assert probe_wakes >= 1


async def test_failing_winner_wakes_its_peers_at_once(
    database_url: str, server: SimulatedPrerenderServer
) -> None:
    """The winner's prerender raises: its peers are woken by the NOTIFY sent after the
    rollback and answered (with the error) long before the 60 s wait."""
    url = f"{REALM}broken.gts"
    # A status the protocol does not retry, so the winner fails at once after the render.
    server.set_module(url, ModuleSpec(["Card"], http_status=422))
    server.latency = 2.0
    with Fleet(3, name="test-member") as fleet:
        winner, *peers = await start_fleet(fleet, database_url, server)
        winner.send("definitions", urls=[url])
        await wait_for_render(server, url)
        for peer in peers:
            peer.send("definitions", urls=[url])
        answers = [await member.receive(40) for member in (winner, *peers)]
        stats = [await peer.call("stats") for peer in peers]
    for answer in answers:
        assert answer["results"][0]["outcome"] == "raised", answer
        assert "PrerenderError" in answer["results"][0]["error"]
    finishes = [answer["t_end"] for answer in answers]
    assert max(finishes) - finishes[0] < 30
    notify_wakes = sum(s["stats"]["coordinator"]["woken_notify"] for s in stats)
    assert notify_wakes >= 1
