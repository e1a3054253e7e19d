"""Shared fixtures: a real PostgreSQL per test session, a clean database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from fleetcache.embedded import PgBouncer
    from fleetcache.stores import Store


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
        yield server.conninfo
    finally:
        server.stop()


@pytest.fixture
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A connection string to a brand-new, empty database, dropped after the test."""
    name = f"fleetcache_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield make_conninfo(postgres_server_url, dbname=name)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


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
    from fleetcache.stores import MemoryStore, PostgresStore, SqliteStore

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
