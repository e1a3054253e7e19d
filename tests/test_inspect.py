"""``fleetcache inspect`` and ``fleetcache purge``: exact figures from a database seeded
through the public API, fleetcache's locks and waiters while they are held, read-only
inspection, and purges that take only dead entries."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import fleetcache
from fleetcache import Key, Produced
from fleetcache.coordination.base import lock_id
from fleetcache.errors import ConfigurationError, SchemaMissingError, SchemaVersionError
from fleetcache.inspection import CacheReport, MarkUsage, NamespaceUsage, inspect, purge
from fleetcache.stores import queries as q
from fleetcache.stores.migrations import migrate
from fleetcache.stores.postgres import namespace_lock
from fleetcache_cli import main
from waiting import PROMPT

A = "https://a.example/"
B = "https://b.example/"
C = "https://c.example/"
D = "https://d.example/"


@dataclass(frozen=True)
class Seeded:
    """What the seed wrote: when it finished (seconds) and every entry's created_at."""

    done_at: float
    created_at: list[int]


async def seed(url: str) -> Seeded:
    """Write a known cache through the public API.

    A: three values without expiry (12 bytes each: ``"xxxxxxxxxx"``) and one with ttl 100 s
    and a stale window of 100 s (22 bytes). B: two values with ttl 10 s and no stale window
    (7 bytes each) and one computed without expiry (5 bytes). C: one cached error (3
    bytes; the error TTL, 30 s). So 8 entries, 80 bytes. Marks: every ``set`` marks its
    name (6), ``invalidate`` of a name marks it (1), a namespace clear marks D (1).
    """
    async with fleetcache.open(url, pool_size=2) as cache:
        for name in ("a1", "a2", "a3"):
            await cache.set(Key(A, name), "x" * 10)
        await cache.set(Key(A, "a-exp"), "y" * 20, ttl=100, stale_ttl=100)
        for name in ("b1", "b2"):
            await cache.set(Key(B, name), "z" * 5, ttl=10, stale_ttl=0)

        async def produce(key: Key) -> Produced[str]:
            if key.namespace == C:
                return Produced(value="e", error={"message": "boom"})
            return Produced(value="ccc", deps=["dep"])

        computed = await cache.get(Key(B, "b-computed"), produce)
        failed = await cache.get(Key(C, "c-error"), produce)
        assert computed is not None
        assert failed is not None
        assert failed.error is not None
        await cache.invalidate(A, ["gone"])
        await cache.clear_namespace(D)
        keys = [Key(A, n) for n in ("a1", "a2", "a3", "a-exp")] + [
            Key(B, n) for n in ("b1", "b2", "b-computed")
        ]
        created = [entry.created_at for entry in [await cache.peek(k) for k in keys] if entry]
        created += [computed.created_at, failed.created_at]
    assert len(created) == 9
    assert all(c is not None for c in created)
    return Seeded(time.time(), [int(c) for c in created if c is not None])


def assert_seeded(report: CacheReport, seeded: Seeded) -> None:
    """The figures every report of the seed has, whenever it is judged."""
    assert report.schema_version == q.SCHEMA_VERSION
    assert report.entries == 8
    assert report.value_bytes == 80
    assert report.namespaces == 3
    assert report.without_expiry == 4
    assert report.errors == 1
    assert report.oldest_created_at_ms == min(seeded.created_at)
    assert report.newest_created_at_ms == max(seeded.created_at)
    assert report.storage_bytes > 0
    assert [(m.kind, m.count) for m in report.marks] == [("name", 7), ("namespace", 1)]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of each kind fleetcache can inspect, to a database that does not exist yet
    (sqlite) or is empty (Postgres)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.db'}"
    request.applymarker(pytest.mark.postgres)
    # Empty: some tests need a database without the schema (and seeding migrates anyway).
    database_url: str = request.getfixturevalue("empty_database_url")
    return database_url


# ------------------------------------------------------------------------ the report


async def test_a_seeded_cache_reports_exact_figures(url: str) -> None:
    """Entries, bytes, namespaces (top N), oldest/newest, and the states at four moments
    (now; past B's expiry and the error TTL; inside A's stale window; past it) are exactly
    what the seed wrote."""
    seeded = await seed(url)
    t = seeded.done_at

    now = await inspect(url, now=t)
    assert_seeded(now, seeded)
    assert (now.fresh, now.stale, now.dead) == (8, 0, 0)
    assert now.top_namespaces == (
        NamespaceUsage(A, entries=4, value_bytes=58, stale=0, dead=0),
        NamespaceUsage(B, entries=3, value_bytes=19, stale=0, dead=0),
        NamespaceUsage(C, entries=1, value_bytes=3, stale=0, dead=0),
    )
    assert now.now_ms == int(t * 1000)

    later = await inspect(url, now=t + 50, top=2)
    assert_seeded(later, seeded)
    assert (later.fresh, later.stale, later.dead) == (5, 0, 3)
    assert later.top_namespaces == (
        NamespaceUsage(A, entries=4, value_bytes=58, stale=0, dead=0),
        NamespaceUsage(B, entries=3, value_bytes=19, stale=0, dead=2),
    )

    in_window = await inspect(url, now=t + 150, top=1)
    assert (in_window.fresh, in_window.stale, in_window.dead) == (4, 1, 3)
    assert in_window.top_namespaces == (NamespaceUsage(A, 4, 58, stale=1, dead=0),)

    past = await inspect(url, now=t + 250, top=0)
    assert (past.fresh, past.stale, past.dead) == (4, 0, 4)
    assert past.top_namespaces == ()


async def test_mark_ages_are_read_from_the_marks(url: str) -> None:
    """A mark set half an hour ago is reported as the oldest of its kind, about 1800 s
    old; the newest is the one the seed set last."""
    await seed(url)
    if url.startswith("sqlite:"):
        lite = sqlite3.connect(url.removeprefix("sqlite:///"))
        with lite:
            lite.execute(
                "UPDATE fleetcache_generations SET marked_at = ? WHERE name = 'a1'",
                (time.time() - 1800,),
            )
        lite.close()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "UPDATE fleetcache_generations SET marked_at = now() - interval '1800 seconds'"
                " WHERE name = 'a1'"
            )
    report = await inspect(url)
    name = report.marks[0]
    assert name.kind == "name"
    assert name.count == 7
    assert 1800 <= name.oldest_age_seconds < 1800 + PROMPT
    assert 0 <= name.newest_age_seconds < PROMPT
    namespace = report.marks[1]
    assert namespace == MarkUsage(
        "namespace", 1, namespace.oldest_age_seconds, namespace.oldest_age_seconds
    )


async def test_sqlite_reports_no_locks_or_backends(tmp_path: Path) -> None:
    """On sqlite there is no server: the report's activity is None, and the table says
    the locks and backends are not applicable."""
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    await seed(url)
    assert (await inspect(url)).activity is None


# ----------------------------------------------------------------- locks and backends


async def _report_when(url: str, ready: Callable[[CacheReport], object], what: str) -> CacheReport:
    """Inspect until ``ready(report)`` holds (bounded: the thing waited for is a server
    state another task is about to reach)."""
    deadline = time.monotonic() + PROMPT
    while True:
        report = await inspect(url)
        if ready(report):
            return report
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {PROMPT} s: {report.activity}")
        await asyncio.sleep(0.02)


@pytest.mark.postgres
async def test_locks_held_and_waiters_right_now(database_url: str) -> None:
    """While a key is computed, its coordinator's lock shows as held by a
    'fleetcache-session' backend with the key's lock id; a namespace lock held by another
    session shows with its namespace; a cache's invalidation waiting for it shows as a
    waiter blocked by that session (holding the global lock shared meanwhile); another
    application's bigint lock is not fleetcache's; connections are grouped by
    application_name."""
    url = database_url
    await seed(url)
    key = Key(A, "slow")
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(k: Key) -> Produced[str]:
        started.set()
        await release.wait()
        return Produced(value="done")

    holder = await psycopg.AsyncConnection.connect(
        make_conninfo(url, application_name="inspect-test-holder"), autocommit=True
    )
    idle = [
        await psycopg.AsyncConnection.connect(
            make_conninfo(url, application_name="inspect-test-idle"), autocommit=True
        )
        for _ in range(2)
    ]
    try:
        async with fleetcache.open(url, pool_size=2) as cache:
            computing = asyncio.create_task(cache.get(key, slow))
            await asyncio.wait_for(started.wait(), PROMPT)
            # Someone else's one-bigint advisory lock: the same key space, not ours.
            await holder.execute("SELECT pg_advisory_lock(%s)", (lock_id(key.coalesce_key) + 1,))
            await holder.execute("BEGIN")
            await holder.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)", (q.LOCK_NAMESPACE, namespace_lock(A))
            )
            setting = asyncio.create_task(cache.set(Key(A, "a1"), "new"))
            report = await _report_when(
                url, lambda r: r.activity is not None and r.activity.waiting, "a waiter"
            )
            assert not setting.done()
            activity = report.activity
            assert activity is not None
            holder_pid = holder.info.backend_pid

            (waiter,) = activity.waiting
            assert (waiter.kind, waiter.namespace, waiter.mode) == ("namespace", A, "exclusive")
            assert waiter.lock == namespace_lock(A)
            assert waiter.application_name == "fleetcache"
            assert waiter.blocked_by == (holder_pid,)
            assert waiter.waiting_seconds is not None
            assert waiter.waiting_seconds >= 0

            held = {(lock.kind, lock.mode, lock.application_name): lock for lock in activity.held}
            assert set(held) == {
                ("key", "exclusive", "fleetcache-session"),
                ("namespace", "exclusive", "inspect-test-holder"),
                ("global", "shared", "fleetcache"),
            }
            assert held["key", "exclusive", "fleetcache-session"].lock == lock_id(key.coalesce_key)
            namespace = held["namespace", "exclusive", "inspect-test-holder"]
            assert (namespace.namespace, namespace.pid) == (A, holder_pid)
            assert namespace.state == "idle in transaction"
            assert held["global", "shared", "fleetcache"].pid == waiter.pid
            assert all(lock.blocked_by == () for lock in activity.held)

            groups = {g.application_name: g for g in activity.connections}
            assert (
                groups["inspect-test-holder"].total,
                groups["inspect-test-holder"].idle_in_transaction,
            ) == (1, 1)
            assert (groups["inspect-test-idle"].total, groups["inspect-test-idle"].idle) == (2, 2)
            assert groups["fleetcache"].waiting_for_lock == 1
            assert groups["fleetcache-session"].total >= 1
            assert "fleetcache-inspect" not in groups  # the inspecting backend itself
            assert activity.max_connections > 0
            assert activity.server_connections >= sum(g.total for g in activity.connections)

            await holder.execute("COMMIT")
            await asyncio.wait_for(setting, PROMPT)
            release.set()
            await asyncio.wait_for(computing, PROMPT)
            after = await inspect(url)
            assert after.activity is not None
            assert after.activity.waiting == ()
            assert [lock.kind for lock in after.activity.held] == []
    finally:
        release.set()
        await holder.close()
        for conn in idle:
            await conn.close()


@pytest.mark.postgres
async def test_key_locks_follow_the_urls_application_name(database_url: str) -> None:
    """A fleet whose URL sets its own application_name is still recognised: a key lock
    held by such a session is reported when the same URL is inspected, and not when
    another prefix is asked for."""
    url = make_conninfo(database_url, application_name="shop-cache")
    await seed(url)
    lid = lock_id(Key(A, "k").coalesce_key)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (lid,))
        mine = await inspect(url)
        assert mine.activity is not None
        assert [(lock.kind, lock.lock) for lock in mine.activity.held] == [("key", lid)]
        other = await inspect(url, key_lock_prefix="fleetcache")
        assert other.activity is not None
        assert other.activity.held == ()


# ------------------------------------------------------------------ nothing to inspect


def _pg_fleetcache_objects(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE 'fleetcache%%'"
            " UNION ALL SELECT proname FROM pg_proc WHERE proname LIKE 'fleetcache%%'"
        ).fetchall()
    return [row[0] for row in rows]


@pytest.mark.postgres
async def test_inspecting_an_empty_database_creates_nothing(empty_database_url: str) -> None:
    """An empty database: SchemaMissingError naming it, and afterwards it still holds no
    fleetcache table, index or function (neither inspect nor purge created or migrated)."""
    database_url = empty_database_url
    with pytest.raises(SchemaMissingError, match="holds no fleetcache schema"):
        await inspect(database_url)
    with pytest.raises(SchemaMissingError):
        await purge(database_url)
    assert _pg_fleetcache_objects(database_url) == []


async def test_inspecting_a_missing_or_empty_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    """A sqlite path that does not exist is not created; an empty file stays without
    tables; both are SchemaMissingError."""
    missing = tmp_path / "missing.db"
    with pytest.raises(SchemaMissingError, match="does not exist"):
        await inspect(f"sqlite:///{missing}")
    with pytest.raises(SchemaMissingError):
        await purge(f"sqlite:///{missing}")
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(SchemaMissingError, match="holds no fleetcache schema"):
        await inspect(f"sqlite:///{empty}")
    conn = sqlite3.connect(empty)
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.close()


async def test_older_and_newer_schemas_are_refused_and_left_alone(url: str) -> None:
    """A schema newer than this release is SchemaVersionError naming both versions; an
    older one is SchemaMissingError saying to migrate, and inspecting (or purging) leaves
    it at its version."""
    await migrate(url)
    for version, error, words in (
        (99, SchemaVersionError, "version 99"),
        (1, SchemaMissingError, "run `fleetcache migrate` first"),
    ):
        _set_version(url, version)
        with pytest.raises(error, match=words):
            await inspect(url)
        with pytest.raises(error):
            await purge(url)
        assert _get_version(url) == version


def _set_version(url: str, version: int) -> None:
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        with conn:
            conn.execute("UPDATE fleetcache_schema SET version = ?", (version,))
        conn.close()
        return
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("UPDATE fleetcache_schema SET version = %s", (version,))


def _get_version(url: str) -> int:
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return int(conn.execute("SELECT version FROM fleetcache_schema").fetchone()[0])
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as pg:
        row = pg.execute("SELECT version FROM fleetcache_schema").fetchone()
    assert row is not None
    return int(row[0])


async def test_memory_and_unknown_urls_are_refused() -> None:
    """memory:// lives inside one process: refused, saying so; an unknown scheme too."""
    with pytest.raises(ConfigurationError, match="nothing to inspect from outside"):
        await inspect("memory://")
    with pytest.raises(ConfigurationError, match="nothing to inspect from outside"):
        await purge("memory://")
    with pytest.raises(ConfigurationError, match="unsupported cache URL"):
        await inspect("redis://localhost/0")


# --------------------------------------------------------------------------- purge


async def seed_for_purge(url: str) -> None:
    """Two dead entries (ttl and stale window of 1 ms, waited out), two inside their
    stale window (ttl 1 ms, window 1 h), one fresh with a ttl (1 h) and one without."""
    async with fleetcache.open(url, pool_size=2) as cache:
        for name in ("dead1", "dead2"):
            await cache.set(Key(A, name), "d", ttl=0.001, stale_ttl=0.001)
        for name in ("stale1", "stale2"):
            await cache.set(Key(A, name), "s", ttl=0.001, stale_ttl=3600)
        await cache.set(Key(B, "fresh"), "f", ttl=3600)
        await cache.set(Key(B, "forever"), "f")
    deadline = time.monotonic() + PROMPT
    while (await inspect(url)).dead != 2:  # the two dead ones' windows end within ms
        assert time.monotonic() < deadline, "the 1 ms entries never died"
        await asyncio.sleep(0.01)


async def test_purge_takes_only_the_dead_and_loops_its_batches(url: str) -> None:
    """With no margin, purge deletes exactly the two dead entries, one batch at a time
    (batch 1); entries in their stale window, fresh ones and those that never expire
    stay. Judged an hour and a half later, the stale-window and fresh ones are dead too,
    and only the one without expiry is left."""
    await seed_for_purge(url)
    done = await purge(url, margin=0, batch=1)
    assert done.entries == 2
    report = await inspect(url)
    assert (report.entries, report.fresh, report.stale, report.dead) == (4, 2, 2, 0)
    assert (await purge(url, margin=0)).entries == 0
    later = time.time() + 5400
    assert (await purge(url, margin=0, now=later)).entries == 3
    left = await inspect(url, now=later)
    assert (left.entries, left.without_expiry, left.dead) == (1, 1, 0)
    assert left.top_namespaces == (NamespaceUsage(B, 1, 3, 0, 0),)


async def test_purge_keeps_entries_dead_for_less_than_the_margin(url: str) -> None:
    """The default margin (60 s, as the fleet's own purge) keeps entries that died just
    now; the margin is measured from now."""
    await seed_for_purge(url)
    assert (await purge(url)).entries == 0
    assert (await purge(url, margin=60, now=time.time() + 61)).entries == 2
    report = await inspect(url)
    assert (report.entries, report.dead) == (4, 0)


async def test_purge_refuses_bad_options(url: str) -> None:
    """A negative or infinite margin, or a batch under 1, is a ConfigurationError."""
    for kwargs in ({"margin": -1.0}, {"margin": float("inf")}, {"batch": 0}):
        with pytest.raises(ConfigurationError):
            await purge(url, **kwargs)


# ------------------------------------------------------------------ the command line


def test_the_command_prints_json_and_tables(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``fleetcache inspect --json`` prints the report (the same figures as the
    function) and exits 0; without --json it prints the tables, saying on sqlite that
    locks are not applicable."""
    seeded = asyncio.run(seed(url))
    assert main(["inspect", "--database-url", url, "--json", "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["entries"] == 8
    assert data["value_bytes"] == 80
    assert data["namespaces"] == 3
    assert data["oldest_created_at_ms"] == min(seeded.created_at)
    assert [ns["namespace"] for ns in data["top_namespaces"]] == [A, B]
    assert data["marks"][0] == {**data["marks"][0], "kind": "name", "count": 7}
    assert (data["activity"] is None) == url.startswith("sqlite:")

    assert main(["inspect", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "Entries" in out
    assert "Invalidation marks" in out
    assert "Largest namespaces" in out
    if url.startswith("sqlite:"):
        assert "not applicable" in out
    else:
        assert "Advisory locks held: 0" in out
        assert "Connections to this database" in out


def test_the_command_exits_2_when_there_is_nothing_to_inspect(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No schema, a newer schema, memory:// and no URL at all: exit 2 and one line on
    stderr, for inspect and purge alike."""
    for command in ("inspect", "purge"):
        assert main([command, "--database-url", url]) == 2
        err = capsys.readouterr().err
        assert "holds no fleetcache schema" in err or "does not exist" in err
        assert main([command, "--database-url", "memory://"]) == 2
        assert "nothing to inspect from outside" in capsys.readouterr().err
        monkeypatch.delenv("DATABASE_URL", raising=False)
        assert main([command]) == 2
        assert "--database-url" in capsys.readouterr().err
    asyncio.run(migrate(url))
    _set_version(url, 99)
    assert main(["inspect", "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert "version 99" in err
    assert f"up to {q.SCHEMA_VERSION}" in err


@pytest.mark.postgres
def test_the_command_exits_1_when_the_database_cannot_be_reached(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that does not exist: exit 1, naming the cause."""
    missing = make_conninfo(database_url, dbname="fleetcache_no_such_database")
    assert main(["inspect", "--database-url", missing]) == 1
    err = capsys.readouterr().err
    assert "fleetcache inspect failed" in err
    assert "database-missing" in err


def test_the_purge_command_takes_only_the_dead(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fleetcache purge`` keeps entries dead for less than the default margin, and
    with ``--margin 0`` deletes exactly the dead ones; the live ones stay."""
    asyncio.run(seed_for_purge(url))
    assert main(["purge", "--database-url", url]) == 0
    assert capsys.readouterr().out.startswith("purged 0 entries past their stale window")
    assert main(["purge", "--database-url", url, "--margin", "0"]) == 0
    assert capsys.readouterr().out.startswith("purged 2 entries past their stale window")
    report = asyncio.run(inspect(url))
    assert (report.entries, report.stale, report.dead) == (4, 2, 0)


@pytest.mark.processes
def test_the_command_as_a_real_process(url: str) -> None:
    """Run as ``python -m fleetcache_cli``: on an empty database exit 2 with one line and
    no traceback; seeded, ``--json`` prints the exact figures and exits 0 even without
    rich, while the tables without rich exit 2 naming it."""
    command = [sys.executable, "-m", "fleetcache_cli", "inspect", "--database-url", url]
    empty = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert empty.returncode == 2, empty.stderr
    assert "nothing to inspect" in empty.stderr
    assert "Traceback" not in empty.stderr

    asyncio.run(seed(url))
    done = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (data["entries"], data["value_bytes"], data["errors"]) == (8, 80, 1)

    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from fleetcache_cli import main\n"
        "print(main(['inspect', '--database-url', sys.argv[1], '--json']))\n"
        "print(main(['inspect', '--database-url', sys.argv[1]]))\n"
    )
    bare = subprocess.run(
        [sys.executable, "-c", code, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.splitlines()[-2:] == ["0", "2"]
    assert "needs the module 'rich'" in bare.stderr
