"""Expiry across real OS processes on one Postgres database: an expired key is computed
once by the fleet, and within its stale window every process is served the stale value at
once while exactly one of them refreshes it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from fleet_worker import start
from fleetcache_cli.shared import Fleet, Member

pytestmark = pytest.mark.processes

NS = "https://realm.example/"


async def start_workers(fleet: Fleet[Any, Any], database_url: str) -> list[Member]:
    """Every worker of ``fleet`` a coordinated member."""
    args = ("--url", database_url, "--coordinate")
    return list(await asyncio.gather(*(start(fleet, i, *args) for i in range(fleet.size))))


async def computations(members: list[Member]) -> int:
    """How many computations the fleet ran in all."""
    answers = await asyncio.gather(*(m.call("stats") for m in members))
    return sum(int(a["stats"]["lookup"]["computations"]) for a in answers)


async def get_all(members: list[Member], **command: Any) -> list[dict[str, Any]]:
    """Every member gets the key at once; their answers."""
    for member in members:
        member.send("get", ns=NS, name="hot", **command)
    return [await member.receive(60) for member in members]


async def test_an_expired_key_is_computed_once_by_the_fleet(database_url: str) -> None:
    """Four processes ask for a key whose ttl (no stale window) has passed: exactly one
    recomputation across the fleet, and all four get it."""
    with Fleet(4, name="test-member") as fleet:
        members = await start_workers(fleet, database_url)
        first = await members[0].call("get", ns=NS, name="hot", ttl=1.0, version=1)
        await asyncio.sleep(1.2)
        answers = await get_all(members, ttl=1.0, version=2, compute_ms=300)
        assert {a["value"]["version"] for a in answers} == {2}
        assert len({a["value"]["began"] for a in answers}) == 1
        assert first["value"]["version"] == 1
        assert await computations(members) == 2


async def test_in_the_stale_window_everyone_gets_the_stale_value_and_one_refresh_runs(
    database_url: str,
) -> None:
    """Past the ttl but within the stale window, four processes asking at once are all
    served the old value (none waits for the one-second refresh), exactly one process
    refreshes it, and afterwards every process gets the new value."""
    with Fleet(4, name="test-member") as fleet:
        members = await start_workers(fleet, database_url)
        await members[0].call("get", ns=NS, name="hot", ttl=1.0, stale_ttl=60.0, version=1)
        await asyncio.sleep(1.2)
        answers = await get_all(members, ttl=1.0, stale_ttl=60.0, version=2, compute_ms=1000)
        assert {a["value"]["version"] for a in answers} == {1}  # nobody waited for the refresh
        deadline = time.monotonic() + 30
        while True:
            again = await get_all(members, ttl=1.0, stale_ttl=60.0, version=3, compute_ms=1000)
            if {a["value"]["version"] for a in again} == {2}:
                break
            assert time.monotonic() < deadline, again
            await asyncio.sleep(0.2)
        assert await computations(members) == 2  # the first, and one refresh


async def test_a_refresh_keeps_the_ttl_of_the_calls_that_asked_for_it(database_url: str) -> None:
    """A key written with ttl=1, then read in its stale window by four processes asking
    ttl=30: one refresh stores the new value for 30 s, so reads after the old ttl has passed
    again are fresh hits in every process and no second refresh runs."""
    with Fleet(4, name="test-member") as fleet:
        members = await start_workers(fleet, database_url)
        await members[0].call("get", ns=NS, name="hot", ttl=1.0, stale_ttl=60.0, version=1)
        await asyncio.sleep(1.2)  # past the ttl the key was written with
        answers = await get_all(members, ttl=30.0, stale_ttl=60.0, version=2, compute_ms=300)
        assert {a["value"]["version"] for a in answers} == {1}
        deadline = time.monotonic() + 30
        while True:
            again = await get_all(members, ttl=30.0, stale_ttl=60.0, version=3)
            if {a["value"]["version"] for a in again} == {2}:
                break
            assert time.monotonic() < deadline, again
            await asyncio.sleep(0.2)
        served_stale = await stale_served(members)
        await asyncio.sleep(1.2)  # past 1 s again: the refreshed value must still be fresh
        later = await get_all(members, ttl=30.0, stale_ttl=60.0, version=4)
        assert {a["value"]["version"] for a in later} == {2}
        assert await stale_served(members) == served_stale  # fresh hits, no refresh started
        assert await computations(members) == 2  # the first, and one refresh


async def stale_served(members: list[Member]) -> int:
    """How many stale values the fleet served in all."""
    answers = await asyncio.gather(*(m.call("stats") for m in members))
    return sum(int(a["stats"]["lookup"]["stale_served"]) for a in answers)
