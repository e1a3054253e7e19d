"""Shared fixtures and tiers: a real PostgreSQL per test session, a fresh database per test
cloned from one migrated template, and the ``postgres`` and ``slow`` markers set here."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from fleetcache.embedded import PgBouncer
    from fleetcache.stores.base import Store

#: Fixtures that reach the Postgres server; a test using any of them is a Postgres test.
POSTGRES_FIXTURES = frozenset({"postgres_server_url", "database_url", "empty_database_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses Postgres ``postgres`` (through a fixture, or a parameter
    whose value is "postgres", as the ``store`` fixture's), and every ``processes`` test
    ``slow``: ``-m "not slow"`` is the fast tier, ``-m "not postgres"`` needs no server."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & POSTGRES_FIXTURES or "postgres" in params:
            item.add_marker(pytest.mark.postgres)
        if item.get_closest_marker("processes") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A superuser connection string: TEST_DATABASE_URL, or a fresh embedded server."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from fleetcache.embedded import start_embedded_postgres

    server = start_embedded_postgres()
    try:
        with psycopg.connect(server.conninfo, autocommit=True) as admin:
            # A throwaway server: no flush to disk is worth waiting for (each DROP DATABASE
            # makes a checkpoint, seconds under load with fsync). Crash safety is not tested
            # on this server (the restart test starts its own).
            admin.execute("ALTER SYSTEM SET fsync = off")
            admin.execute("SELECT pg_reload_conf()")
        yield server.conninfo
    finally:
        server.stop()


class FreshDatabases:
    """Fresh databases for tests, each a copy of one template migrated at session start.

    A copy costs a ``CREATE DATABASE`` and a drop a ``DROP DATABASE`` (a tenth of a second
    or so each), so a few copies are made ahead, and used ones dropped, by one background
    thread while tests run. What a test leaves behind never reaches the next one: the
    sessions on its database are ended before its teardown returns. The fixtures below
    call this from the test thread, one at a time; the background thread has its own
    admin connection.
    """

    #: How many copies are kept ready (short tests come in bursts).
    AHEAD = 3

    def __init__(self, server_url: str) -> None:
        self._server_url = server_url
        # Unique per session: sessions sharing a TEST_DATABASE_URL server never collide,
        # and each builds its template from the migrations of its own checkout.
        self.template = f"fleetcache_template_{uuid.uuid4().hex[:12]}"
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-dbs")
        self._ready: deque[Future[str]] = deque()
        # Admin connections, one per thread (a psycopg connection is not shared across
        # threads here); the set of names still to drop is written by both threads
        # (single set operations, atomic under the GIL).
        self._local = threading.local()
        self._connections: list[psycopg.Connection[tuple[object, ...]]] = []
        self._undropped: set[str] = set()

    def url(self, name: str) -> str:
        """The connection string of database ``name``."""
        return make_conninfo(self._server_url, dbname=name)

    def _execute(self, statement: sql.Composed | str, params: tuple[object, ...] = ()) -> None:
        """Run one statement on this thread's admin connection (reconnecting once if the
        server dropped it, say after a restart)."""
        for attempt in range(2):
            conn: psycopg.Connection[tuple[object, ...]] | None = getattr(self._local, "conn", None)
            if conn is None or conn.closed:
                conn = psycopg.connect(
                    self._server_url, autocommit=True, application_name="fleetcache-tests-admin"
                )
                self._local.conn = conn
                self._connections.append(conn)
            try:
                conn.execute(statement, params)
                return
            except psycopg.OperationalError:
                conn.close()
                if attempt:
                    raise

    def build_template(self) -> None:
        """Create the template and bring it to the current schema the way a store does."""
        template = sql.Identifier(self.template)
        self._execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(template))
        self._undropped.add(self.template)
        # In the background thread: the caller may be inside a running event loop.
        self._background.submit(asyncio.run, self._migrate(self.url(self.template))).result()
        # A template must have no sessions while it is copied; none may open now.
        self._execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(template))

    @staticmethod
    async def _migrate(url: str) -> None:
        from fleetcache.stores.postgres import PostgresStore

        store = PostgresStore(url, max_size=1)
        await store.open()
        await store.close()

    def create(self, template: str) -> str:
        """A new database copied from ``template``; returns its name."""
        name = f"fleetcache_test_{uuid.uuid4().hex[:12]}"
        self._execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
        self._undropped.add(name)
        return name

    def take(self) -> str:
        """A fresh migrated database: the oldest one made ahead, or a new one if that
        failed (a test may have restarted or starved the server meanwhile)."""
        while len(self._ready) < self.AHEAD + 1:
            self._ready.append(self._background.submit(self.create, self.template))
        try:
            return self._ready.popleft().result()
        except psycopg.Error:
            return self.create(self.template)

    def give_back(self, name: str) -> None:
        """End every session on database ``name`` now, and drop it in the background."""
        ident = sql.Identifier(name)
        self._execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident))
        # DROP ... WITH (FORCE) would end them too, but only once the drop runs: a session
        # the test left (holding an advisory lock, say) must be gone before the next test.
        self._execute(
            "SELECT pg_terminate_backend(pid, 20000) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        self._background.submit(self._drop, name)

    def _drop(self, name: str) -> None:
        self._execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        self._undropped.discard(name)

    def close(self) -> None:
        """Wait for the background work, drop every database made here, disconnect."""
        self._background.shutdown(wait=True)
        try:
            for name in sorted(self._undropped):
                try:
                    self._drop(name)
                except psycopg.Error as exc:  # told, not fatal: an embedded server goes anyway
                    print(f"could not drop test database {name}: {exc}")
        finally:
            for conn in self._connections:
                conn.close()


@pytest.fixture(scope="session")
def fresh_databases(postgres_server_url: str) -> Iterator[FreshDatabases]:
    """The session's source of fresh databases (its template is built on first use)."""
    databases = FreshDatabases(postgres_server_url)
    try:
        databases.build_template()
        yield databases
    finally:
        databases.close()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, fresh_databases: FreshDatabases) -> Iterator[str]:
    """A connection string to a brand-new database that already has the current fleetcache
    schema (and nothing else), dropped after the test."""
    if request.node.get_closest_marker("postgres") is None:
        pytest.fail(
            f"{request.node.nodeid} uses Postgres but is not marked 'postgres': take a "
            "Postgres fixture as an argument, or mark it"
        )
    name = fresh_databases.take()
    try:
        yield fresh_databases.url(name)
    finally:
        fresh_databases.give_back(name)


@pytest.fixture
def empty_database_url(fresh_databases: FreshDatabases) -> Iterator[str]:
    """A connection string to a brand-new, empty database (no fleetcache schema: for the
    tests of creating and upgrading it), dropped after the test."""
    name = fresh_databases.create("template0")
    try:
        yield fresh_databases.url(name)
    finally:
        fresh_databases.give_back(name)


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """A path for a new sqlite file."""
    return tmp_path / "cache.sqlite3"


STORE_KINDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open store of each kind, empty."""
    # Imported here, not at the top: tests that need no store (hub, broadcast) must not
    # depend on the stores importing.
    from fleetcache.stores.memory import MemoryStore
    from fleetcache.stores.postgres import PostgresStore
    from fleetcache.stores.sqlite import SqliteStore

    kind: str = request.param
    made: Store
    if kind == "memory":
        made = MemoryStore()
    elif kind == "sqlite":
        made = SqliteStore(tmp_path / "cache.sqlite3")
    else:
        made = PostgresStore(request.getfixturevalue("database_url"), max_size=4)
    await made.open()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture(scope="session")
def pgbouncer(postgres_server_url: str) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode in front of the test server (installed by `make
    test`; a missing one fails the test with the install command, never skips it)."""
    from fleetcache.embedded import start_pgbouncer

    bouncer = start_pgbouncer(postgres_server_url)
    try:
        yield bouncer
    finally:
        bouncer.stop()
