"""``fleetcache migrate``: the deploy-time schema upgrade as a command."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetcache.stores.migrations import LATEST
from fleetcache_cli import main

pytestmark = pytest.mark.postgres


def test_migrate_creates_then_finds_the_latest_schema(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh database goes from version 0 to the latest; a second run finds it there and
    changes nothing; both exit 0."""
    assert main(["migrate", "--database-url", database_url]) == 0
    assert f"version 0 -> {LATEST}" in capsys.readouterr().out
    assert main(["migrate", "--database-url", database_url]) == 0
    assert (
        f"version {LATEST} -> {LATEST} (already at the latest version)" in capsys.readouterr().out
    )


def test_migrate_a_sqlite_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sqlite URL is migrated the same way."""
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    assert main(["migrate", "--database-url", url]) == 0
    assert f"version 0 -> {LATEST}" in capsys.readouterr().out


def test_migrate_a_missing_database_fails_clearly(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that does not exist: exit 1 and one line naming the cause."""
    from psycopg.conninfo import make_conninfo

    missing = make_conninfo(database_url, dbname="fleetcache_no_such_database")
    assert main(["migrate", "--database-url", missing]) == 1
    err = capsys.readouterr().err
    assert "fleetcache migrate failed" in err
    assert "database-missing" in err


def test_migrate_refuses_a_newer_schema(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database newer than this release: exit 1, both version numbers named."""
    import psycopg

    assert main(["migrate", "--database-url", database_url]) == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE fleetcache_schema SET version = 99")
    capsys.readouterr()
    assert main(["migrate", "--database-url", database_url]) == 1
    err = capsys.readouterr().err
    assert "version 99" in err
    assert f"up to {LATEST}" in err


def test_migrate_without_a_url_says_what_to_give(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --database-url and no DATABASE_URL: exit 1 with a hint."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["migrate"]) == 1
    assert "--database-url" in capsys.readouterr().err
