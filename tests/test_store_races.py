"""The closure guarantee under random races between real OS processes (Postgres, sqlite).

Each trial: the test writes X (value "old", aliased, so the closure has a second round).
Process P1 takes a stamp for D, reads X and, after a random pause, writes D (deps [X])
computed from what it read. Process P2, after its own random pause, invalidates X, with
``expand`` lingering a random moment inside the transaction. Afterwards no D computed
from the old X may exist. The test also counts the trials where the two really raced (D's
write overlapped the invalidation in time) and fails if too few did: a test whose races
never overlap could not fail.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import store_race_worker
from fleetcache.stores.base import Entry, Key, Store
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore
from fleetcache_cli.shared import Fleet, Member

pytestmark = pytest.mark.processes

NS = "https://race.example/"
TRIALS = 200


@asynccontextmanager
async def workers(kind: str, target: str) -> AsyncIterator[tuple[Member, Member]]:
    """P1 and P2 (``store_race_worker`` on two worker processes), stopped on exit."""
    with Fleet(2, name="test-member") as fleet:
        started = [fleet.serve(i, store_race_worker.serve, (kind, target)) for i in range(2)]
        for member in started:
            assert (await member.receive())["ready"]
        yield started[0], started[1]


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
async def test_random_races_leave_no_dependent_computed_from_old_data(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """200 random races between a populate of D (another process) and an invalidation of
    its dependency X (a third process): no D computed from the old X survives, and enough
    races really overlapped for that to mean something."""
    target = (
        str(request.getfixturevalue("database_url"))
        if kind == "postgres"
        else str(tmp_path / "race.sqlite3")
    )
    store: Store = PostgresStore(target, max_size=2) if kind == "postgres" else SqliteStore(target)
    await store.open()
    rng = random.Random(4645)
    survivors: list[str] = []
    overlapped = refused = found = 0
    try:
        async with workers(kind, target) as (p1, p2):
            for trial in range(TRIALS):
                x, d = f"x{trial}", f"d{trial}"
                await store.write(Entry(Key(NS, x), {"v": "old"}, alias=f"{x}~"))
                p1.send("populate", x=x, d=d, delay=rng.uniform(0, 0.012))
                p2.send("invalidate", x=x, delay=rng.uniform(0, 0.012), hold=rng.uniform(0, 0.004))
                pop, inv = await p1.receive(), await p2.receive()
                row = await store.read(Key(NS, d))
                if row is not None and row.value == {"from": "old"}:
                    survivors.append(d)
                if pop["saw_old"]:
                    refused += not pop["wrote"]
                    found += pop["wrote"] and d in inv["names"]
                    overlapped += (
                        pop["t_write"] < inv["t_end"] and pop["t_written"] > inv["t_start"]
                    )
    finally:
        await store.close()
    print(
        f"{kind}: {overlapped} of {TRIALS} writes overlapped the invalidation; "
        f"{refused} stale writes refused, {found} found by the closure; "
        f"{len(survivors)} stale rows survived"
    )
    assert survivors == []
    assert overlapped >= 20, f"only {overlapped} races overlapped: the test proves little"
    assert refused >= 20
    assert found >= 20
