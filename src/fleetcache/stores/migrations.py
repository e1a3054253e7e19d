"""Numbered schema migrations for the sqlite and Postgres stores, applied when a store opens
or at deploy time (``fleetcache migrate``): in one transaction, under a lock other
processes wait for, step by step from the database's version; a newer database is refused
(:class:`~fleetcache.errors.SchemaVersionError`). What each version changed is in
``docs/design.md`` ("Schema versions")."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

from fleetcache import _pg
from fleetcache.errors import SchemaVersionError, StoreError
from fleetcache.logcontext import get_logger
from fleetcache.stores import queries as q

logger = get_logger("fleetcache.stores.migrations")

#: The version this release creates, upgrades to, and understands.
LATEST = q.SCHEMA_VERSION

_MODULES_NOTE = (
    "%s: fleetcache schema upgraded from version 1 to %d; %s rows were copied from the "
    "table 'modules' into 'fleetcache_entries'. fleetcache no longer uses 'modules' and "
    "leaves it in place: drop it yourself once no process of the first release runs."
)


# ----------------------------------------------------------------------------- Postgres


async def _pg_upgrade_1_to_2(conn: psycopg.AsyncConnection[Any], where: str) -> None:
    for statement in q.PG_UPGRADE_1_TO_2:
        await conn.execute(statement)
    row = await (await conn.execute(q.PG_COUNT_V1_COLUMNS)).fetchone()
    if row is not None and row[0] == 10:
        copied = (await conn.execute(q.PG_COPY_V1_ENTRIES)).rowcount
        logger.warning(_MODULES_NOTE, where, 2, copied)
    else:
        logger.warning(
            "%s: fleetcache schema upgraded from version 1 to 2; no table 'modules' with the "
            "first release's columns was found, so no entries were copied",
            where,
        )


async def _pg_upgrade_2_to_3(conn: psycopg.AsyncConnection[Any], where: str) -> None:
    for statement in q.PG_UPGRADE_2_TO_3:
        await conn.execute(statement)
    logger.info("%s: fleetcache schema upgraded to version 3: values kept verbatim", where)


def _pg_statements(
    statements: list[str],
) -> Callable[[psycopg.AsyncConnection[Any], str], Awaitable[None]]:
    """An upgrade that runs ``statements`` in order, and nothing else."""

    async def upgrade(conn: psycopg.AsyncConnection[Any], where: str) -> None:
        for statement in statements:
            await conn.execute(statement)

    return upgrade


#: Postgres upgrades: ``PG_MIGRATIONS[n]`` takes a database from version n-1 to n.
PG_MIGRATIONS: dict[int, Callable[[psycopg.AsyncConnection[Any], str], Any]] = {
    2: _pg_upgrade_1_to_2,
    3: _pg_upgrade_2_to_3,
    4: _pg_statements(q.PG_UPGRADE_3_TO_4),
    5: _pg_statements(q.PG_UPGRADE_4_TO_5),
    6: _pg_statements(q.PG_UPGRADE_5_TO_6),
    7: _pg_statements(q.PG_UPGRADE_6_TO_7),
    8: _pg_statements(q.PG_UPGRADE_7_TO_8),
    9: _pg_statements(q.PG_UPGRADE_8_TO_9),
}


async def migrate_postgres(conn: psycopg.AsyncConnection[Any], where: str) -> tuple[int, int]:
    """Bring the database of ``conn`` (an autocommit connection) to :data:`LATEST`; return
    the versions (before, after). ``where`` names the database in messages."""
    async with conn.transaction():
        await conn.execute(q.PG_LOCK_SCHEMA)
        exists = await (await conn.execute(q.PG_HAS_SCHEMA_TABLE)).fetchone()
        if exists is not None and exists[0]:
            row = await (await conn.execute(q.PG_GET_SCHEMA_VERSION)).fetchone()
            if row is None:
                raise StoreError(f"{where}: fleetcache_schema exists but holds no version")
            before = int(row[0])
        else:
            before = 0
        if before > LATEST:
            raise SchemaVersionError(where, before, LATEST)
        if before == LATEST:
            return before, before
        if before == 0:
            for statement in [
                *q.PG_CREATE_LATEST,
                *q.PG_CREATE_INVALIDATION_FUNCTIONS,
                q.PG_CREATE_TRY_LOCK_AND_READ_FUNCTION,
            ]:
                await conn.execute(statement)
        else:
            for version in range(before + 1, LATEST + 1):
                await PG_MIGRATIONS[version](conn, where)
        await conn.execute(q.PG_SET_SCHEMA_VERSION, {"version": LATEST})
    if before == 0:
        logger.info("%s: created the fleetcache schema, version %d", where, LATEST)
    return before, LATEST


# ------------------------------------------------------------------------------- sqlite


def _sqlite_upgrade_1_to_2(conn: sqlite3.Connection, where: str) -> None:
    for statement in q.SQLITE_UPGRADE_1_TO_2:
        conn.execute(statement, {"now": time.time()} if ":now" in statement else {})
    if conn.execute(q.SQLITE_HAS_V1_ENTRIES).fetchone()[0]:
        copied = conn.execute(q.SQLITE_COPY_V1_ENTRIES[0]).rowcount
        conn.execute(q.SQLITE_COPY_V1_ENTRIES[1])
        logger.warning(_MODULES_NOTE, where, 2, copied)
    else:
        logger.warning(
            "%s: fleetcache schema upgraded from version 1 to 2; no table 'modules' with the "
            "first release's columns was found, so no entries were copied",
            where,
        )


def _sqlite_upgrade_2_to_3(conn: sqlite3.Connection, where: str) -> None:
    for statement in q.SQLITE_UPGRADE_2_TO_3:
        conn.execute(statement)
    logger.info("%s: fleetcache schema upgraded to version 3: values kept verbatim", where)


def _sqlite_upgrade_3_to_4(conn: sqlite3.Connection, where: str) -> None:
    """Nothing: version 4 changed only a Postgres index."""


def _sqlite_upgrade_4_to_5(conn: sqlite3.Connection, where: str) -> None:
    """Nothing: version 5 added only Postgres functions."""


def _sqlite_upgrade_5_to_6(conn: sqlite3.Connection, where: str) -> None:
    for statement in q.SQLITE_UPGRADE_5_TO_6:
        conn.execute(statement)


def _sqlite_upgrade_6_to_7(conn: sqlite3.Connection, where: str) -> None:
    """Nothing: version 7 added only a Postgres function."""


def _sqlite_upgrade_7_to_8(conn: sqlite3.Connection, where: str) -> None:
    """Nothing: version 8 changed only Postgres triggers."""


def _sqlite_upgrade_8_to_9(conn: sqlite3.Connection, where: str) -> None:
    """Nothing: version 9 changed only the Postgres count functions."""


#: sqlite upgrades: ``SQLITE_MIGRATIONS[n]`` takes a file from version n-1 to n.
SQLITE_MIGRATIONS: dict[int, Callable[[sqlite3.Connection, str], None]] = {
    2: _sqlite_upgrade_1_to_2,
    3: _sqlite_upgrade_2_to_3,
    4: _sqlite_upgrade_3_to_4,
    5: _sqlite_upgrade_4_to_5,
    6: _sqlite_upgrade_5_to_6,
    7: _sqlite_upgrade_6_to_7,
    8: _sqlite_upgrade_7_to_8,
    9: _sqlite_upgrade_8_to_9,
}


def migrate_sqlite(conn: sqlite3.Connection, where: str) -> tuple[int, int]:
    """Bring the file of ``conn`` (opened with ``isolation_level=None``) to :data:`LATEST`
    in one ``BEGIN IMMEDIATE`` transaction; return the versions (before, after). Any
    exception rolls the transaction back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute(q.SQLITE_HAS_SCHEMA_TABLE).fetchone()[0]:
            row = conn.execute(q.SQLITE_GET_SCHEMA_VERSION).fetchone()
            if row is None:
                raise StoreError(f"{where}: fleetcache_schema exists but holds no version")
            before = int(row[0])
        else:
            before = 0
        if before > LATEST:
            raise SchemaVersionError(where, before, LATEST)
        if before < LATEST:
            if before == 0:
                for statement in q.SQLITE_CREATE_LATEST:
                    conn.execute(statement)
            else:
                for version in range(before + 1, LATEST + 1):
                    SQLITE_MIGRATIONS[version](conn, where)
            conn.execute(q.SQLITE_SET_SCHEMA_VERSION, {"version": LATEST})
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    if before == 0:
        logger.info("%s: created the fleetcache schema, version %d", where, LATEST)
    return before, LATEST


# ---------------------------------------------------------------------- deploy-time use


def _is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://")) or (
        "=" in target and not target.startswith("sqlite:")
    )


async def migrate(target: str | Path) -> tuple[int, int]:
    """Bring a database to the latest schema version; return the versions (before, after).

    ``target`` is a Postgres URL or connection string, or a sqlite path (optionally
    ``sqlite:///path``). Raises :class:`~fleetcache.errors.SchemaVersionError` if the
    database is newer than this release, :class:`~fleetcache.errors.DatabaseConnectError`
    if it cannot be reached, :class:`~fleetcache.errors.StoreError` if a statement fails.
    """
    text = str(target)
    if _is_postgres(text):
        where = _pg.describe_target(text)
        conn = await _pg.connect(text, application_name="fleetcache-migrate")
        try:
            with _pg.translate(f"migrating {where}"):
                return await migrate_postgres(conn, where)
        finally:
            await conn.close()
    # sqlite:///relative/path, sqlite:////absolute/path (SQLAlchemy's form), or a bare path.
    path = text.removeprefix("sqlite:///")
    return await asyncio.to_thread(_migrate_sqlite_file, path)


def _migrate_sqlite_file(path: str) -> tuple[int, int]:
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"opening sqlite file {path!r} failed: {exc}") from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        return migrate_sqlite(conn, f"sqlite file {path!r}")
    except sqlite3.Error as exc:
        raise StoreError(f"migrating sqlite file {path!r} failed: {exc}") from exc
    finally:
        conn.close()
