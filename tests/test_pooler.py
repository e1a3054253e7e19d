"""fleetcache behind a real PgBouncer in transaction mode (the ``pgbouncer`` fixture, in
front of the test server): pooled statements through the pooler with no server-side
prepared statement and no session state, the session (LISTEN and the fleet's locks)
direct, and a session pointed at the pooler refused at open, naming the fix."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import fleetcache
from conn_worker import start
from fleetcache import Key, Produced
from fleetcache.embedded import PgBouncer, start_pgbouncer
from fleetcache.errors import ConfigurationError
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME
from fleetcache.stores.postgres import PostgresStore
from fleetcache_cli.shared import Fleet, Member
from waiting import eventually

pytestmark = pytest.mark.postgres

NS = "https://realm.example/"


def through(bouncer: PgBouncer, database_url: str) -> str:
    """The test database, reached through ``bouncer``."""
    return bouncer.conninfo_for(str(conninfo_to_dict(database_url)["dbname"]))


@pytest.fixture
def pooled_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """The test database through the transaction pooler."""
    return through(pgbouncer, database_url)


@pytest.fixture(scope="module")
def session_pooler(postgres_server_url: str) -> Iterator[PgBouncer]:
    """A second PgBouncer, in session mode (one server connection per client)."""
    bouncer = start_pgbouncer(postgres_server_url, pool_mode="session")
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A direct connection to the test database, for looking at pg_locks."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


async def produce(key: Key) -> Produced[dict[str, str]]:
    """A quick computation."""
    await asyncio.sleep(0.01)
    return Produced({"name": key.name})


async def refused(url: str, **options: Any) -> str:
    """The message of the ConfigurationError opening ``url`` with ``options`` raises."""
    with pytest.raises(ConfigurationError) as info:
        async with fleetcache.open(url, connect_budget=2.0, **options):
            pass
    return str(info.value)


async def last_statements(admin: psycopg.AsyncConnection[Any]) -> list[str]:
    """The last statement of every other backend of the test database (the pooler's
    server connections among them)."""
    cursor = await admin.execute(
        "SELECT query FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return [str(query) for (query,) in await cursor.fetchall()]


async def test_a_session_through_the_transaction_pooler_is_refused_naming_the_fix(
    pooled_url: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    """Opening with the pooler as the only URL raises ConfigurationError saying the
    session goes through a transaction pooler and naming session_url; every
    configuration has the session (LISTEN), so each is refused, before it LISTENs or
    locks anything: no server connection of the pooler ran a LISTEN or holds a lock."""
    for options in ({}, {"coordinate": False}, {"near": 100}):
        message = await refused(pooled_url, **options)
        assert "transaction pooler" in message, message
        assert "session_url=" in message, message
    statements = await last_statements(admin)
    assert statements, "the pooler kept no server connection to look at"
    assert not [query for query in statements if "LISTEN" in query.upper()], statements
    assert await pooled_server_locks(admin, set()) == 0


@pytest.mark.slow  # waits out a timeout on purpose
async def test_a_session_url_naming_the_pooler_is_refused_though_the_pool_is_direct(
    pooled_url: str, database_url: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    """With the pool direct and session_url naming the transaction pooler (the two URLs
    swapped), the open is refused too: the session's LISTEN does not hear a NOTIFY sent
    to it. What it leaves on the pooler's server connection is a LISTEN on a check
    channel of its own, and no lock."""
    message = await refused(database_url, session_url=pooled_url)
    assert "transaction pooler" in message, message
    assert "did not arrive" in message, message
    assert "session_url=" in message, message
    listens = [q for q in await last_statements(admin) if "LISTEN" in q.upper()]
    assert all("fleetcache_session_check_" in q for q in listens), listens
    assert await pooled_server_locks(admin, set()) == 0


async def test_a_pooler_in_session_mode_gives_a_session_and_is_accepted(
    session_pooler: PgBouncer, database_url: str
) -> None:
    """The check refuses only poolers that share server connections between clients: a
    PgBouncer in session mode (one server connection per client) carries the session,
    and a key is computed under the fleet's lock through it."""
    url = through(session_pooler, database_url)
    async with fleetcache.open(url, near=10) as cache:
        entry = await cache.get(Key(NS, "through-session-mode"), produce)
        assert entry is not None
        assert cache.stats()["coordinator"]["lock_won"] == 1
        assert cache.stats()["connections"]["session"]["up"]


async def test_pooled_statements_through_the_pooler_use_no_prepared_statements(
    pooled_url: str, database_url: str
) -> None:
    """With the pool through the transaction pooler and the session direct, 8 tasks
    sharing 4 pooled connections miss, fill and hit 40 keys 3 times each with no error:
    no pooled connection prepares a statement (psycopg would after 5 runs, and the pooler
    would then run the next one on a server connection that never saw it prepared)."""
    async with fleetcache.open(pooled_url, session_url=database_url, pool_size=4) as cache:
        store = cache.store
        assert isinstance(store, PostgresStore)
        keys = [Key(NS, f"prepared-{i}") for i in range(40)]

        async def task(offset: int) -> None:
            for round_ in range(3):
                for i in range(len(keys)):
                    key = keys[(i + offset * 5 + round_) % len(keys)]
                    entry = await cache.get(key, produce)
                    assert entry is not None
                    assert entry.value == {"name": key.name}

        await asyncio.gather(*(task(offset) for offset in range(8)))
        async with store.pool.connection() as conn:
            assert conn.prepare_threshold is None
        assert cache.stats()["connections"]["pool"]["max_size"] == 4


async def test_prepared_statements_stay_on_for_a_direct_pool_and_obey_the_option(
    database_url: str,
) -> None:
    """Without a session URL of its own the pool is direct and keeps psycopg's prepared
    statements; ``prepared_statements=`` overrides the default either way."""
    for options, threshold in (
        ({}, 5),
        ({"prepared_statements": False}, None),
        ({"session_url": database_url}, 5),
    ):
        async with fleetcache.open(database_url, **options) as cache:
            store = cache.store
            assert isinstance(store, PostgresStore)
            async with store.pool.connection() as conn:
                assert conn.prepare_threshold == threshold, options


async def session_lock_holders(admin: psycopg.AsyncConnection[Any]) -> list[tuple[str, bool]]:
    """Every one-bigint advisory lock (the fleet's key locks) held in this database: the
    application_name of the backend holding it, and whether that backend is idle (not in
    a transaction: a session lock outliving its statement)."""
    cursor = await admin.execute(
        "SELECT a.application_name, a.state = 'idle'"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return [(str(name), bool(idle)) for name, idle in await cursor.fetchall()]


async def pooled_server_locks(admin: psycopg.AsyncConnection[Any], sessions: set[int]) -> int:
    """Advisory locks held by backends of this database that are not the fleet's
    sessions (the pooler's server connections): what a lock leaked through it leaves."""
    cursor = await admin.execute(
        "SELECT count(*) FROM pg_locks l"
        " WHERE l.locktype = 'advisory' AND l.granted AND NOT (l.pid = ANY(%s))"
        " AND l.pid <> pg_backend_pid()"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (list(sessions),),
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.processes
async def test_a_fleet_through_the_pooler_computes_each_key_once_and_hears_its_notifies(
    pooled_url: str, database_url: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    """Four processes, each with its pool through the transaction pooler and its session
    direct, ask for the same 30 keys at once: each key is computed once in the fleet,
    every loser is woken by a NOTIFY (the crash probe is off, and no wait times out), no
    request fails (no prepared-statement error), the key locks are held by the sessions
    and none is left on the pooler's server connections; then one process's invalidation
    of 10 keys reaches the others' near tiers, which stop serving the old values."""
    options = {
        "session_url": database_url,
        "near": 1000,
        "probe_interval": 600.0,
        "wait_timeout": 60.0,
        "pool_size": 3,
    }
    with Fleet(4, name="test-member") as fleet:
        started = await asyncio.gather(*(start(fleet, i, pooled_url, **options) for i in range(4)))
        workers = [worker for worker, _ in started]
        assert all(ready["ready"] for _, ready in started), started
        names = [f"fleet-{i}-{uuid.uuid4().hex[:6]}" for i in range(30)]
        for worker in workers:
            worker.send("gets", ns=NS, names=names, compute_s=0.3, tag="first")
        holders: list[tuple[str, bool]] = []
        answers: list[dict[str, Any]] = []
        receiving = asyncio.gather(*(worker.receive(120) for worker in workers))
        while not receiving.done():
            holders += await session_lock_holders(admin)
            await asyncio.wait({receiving}, timeout=0.05)
        answers = receiving.result()
        for answer in answers:
            assert answer["errors"] == [], answer["errors"]
            assert len(answer["values"]) == len(names)
        assert all(a["values"] == answers[0]["values"] for a in answers)
        assert holders, "no key lock was ever seen held"
        assert {name for name, _ in holders} == {DEFAULT_APPLICATION_NAME}, holders

        stats = [await worker.call("stats") for worker in workers]
        assert sum(s["computed"] for s in stats) == len(names)
        coordinators = [s["stats"]["coordinator"] for s in stats]
        assert sum(c["woken_notify"] for c in coordinators) > 0, coordinators
        assert sum(c["woken_timeout"] + c["woken_probe"] for c in coordinators) == 0
        assert all(c["computed_unlocked"] == 0 for c in coordinators)
        sessions = {s["stats"]["connections"]["session"]["backend_pid"] for s in stats}
        assert len(sessions) == 4
        assert all(s["stats"]["connections"]["session"]["gaps"] == 0 for s in stats)
        assert await session_lock_holders(admin) == []
        assert await pooled_server_locks(admin, sessions) == 0

        # Near tiers hold the values; one process invalidates a third of them.
        stale = names[:10]
        invalidated = await workers[0].call("invalidate", ns=NS, names=stale)
        assert sorted(invalidated["names"]) == sorted(stale)
        invalidated_at = invalidated["t_end"]

        async def renewed(worker: Member) -> bool:
            answer = await worker.call("gets", ns=NS, names=stale, compute_s=0.0, tag="after")
            assert answer["errors"] == [], answer["errors"]
            return all(value["began"] > invalidated_at for value in answer["values"])

        for worker in workers[1:]:
            await eventually(lambda worker=worker: renewed(worker), timeout=20.0)
        stats = [await worker.call("stats") for worker in workers]
        assert all(s["stats"]["connections"]["session"]["gaps"] == 0 for s in stats)


async def test_a_pooled_store_through_the_pooler_leaves_no_session_state(
    pooled_url: str, database_url: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    """Writes, invalidations and clears through the transaction pooler (their namespace
    locks are transaction locks, their statement_timeout local to the transaction) leave
    no advisory lock and no changed setting on the pooler's server connections: clients
    that get those server connections next see the server's defaults."""
    async with fleetcache.open(pooled_url, session_url=database_url, pool_size=3) as cache:
        keys = [Key(NS, f"state-{i}") for i in range(20)]
        await asyncio.gather(*(cache.get(key, produce) for key in keys))
        await asyncio.gather(*(cache.invalidate(NS, [key.name]) for key in keys[:5]))
        await cache.clear_namespace(NS)
        await asyncio.gather(*(cache.get(key, produce) for key in keys))
        await cache.clear_all()
        session = cache.stats()["connections"]["session"]["backend_pid"]
        assert await pooled_server_locks(admin, {session}) == 0
    # The pooler hands its most recently used server connections out first: three
    # clients at once, each in a transaction, get the ones the cache just used.
    clients = [
        await psycopg.AsyncConnection.connect(pooled_url, autocommit=True, prepare_threshold=None)
        for _ in range(3)
    ]
    try:
        for client in clients:
            await client.execute("BEGIN")
        for client in clients:
            cursor = await client.execute("SHOW statement_timeout")
            assert await cursor.fetchone() == ("0",)
    finally:
        for client in clients:
            await client.close()
