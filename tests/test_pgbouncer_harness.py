"""The PgBouncer the tests run: a real pooler in transaction mode in front of the server."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fleetcache.embedded import PgBouncer
from fleetcache.errors import ConfigurationError

pytestmark = pytest.mark.postgres


def test_the_pooler_runs_in_transaction_mode_and_reaches_the_server(
    pgbouncer: PgBouncer, database_url: str
) -> None:
    """A statement through the pooler reaches the test's own database, and the pooler
    reports transaction pooling (two transactions may land on different server sessions)."""
    dbname = conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(
        pgbouncer.conninfo_for(str(dbname)), autocommit=True, prepare_threshold=None
    ) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row == (dbname,)
    with psycopg.connect(pgbouncer.admin_conninfo, autocommit=True, prepare_threshold=None) as adm:
        config = {r[0]: r[1] for r in adm.execute("SHOW CONFIG").fetchall()}
    assert config["pool_mode"] == "transaction"


def test_a_missing_pgbouncer_is_named_with_its_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the binary, starting the pooler fails with the command that installs it."""
    from fleetcache import embedded

    monkeypatch.setattr(embedded.shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(ConfigurationError, match="apt-get install pgbouncer"):
        embedded.start_pgbouncer("host=/nowhere")
