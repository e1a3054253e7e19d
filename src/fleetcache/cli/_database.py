"""The database a command runs on: the user's (``--database-url``/``DATABASE_URL``) or a
fresh embedded PostgreSQL that lives as long as the command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


@contextmanager
def command_database(url: str | None, dbname: str) -> Iterator[tuple[str, bool]]:
    """Yield ``(conninfo, embedded)``: ``url`` as given, or, when it is None, database
    ``dbname`` on an embedded server started here and stopped (and deleted) on exit."""
    if url is not None:
        yield url, False
        return
    from fleetcache.embedded import start_embedded_postgres  # noqa: PLC0415 - optional extra

    server = start_embedded_postgres()
    try:
        with psycopg.connect(server.conninfo, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        yield server.conninfo_for(dbname), True
    finally:
        server.stop()


def redacted(url: str) -> str:
    """The conninfo without its password (for reports)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable>"
    params.pop("password", None)
    return make_conninfo("", **params)
