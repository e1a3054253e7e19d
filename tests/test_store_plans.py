"""Lean paths: no statement of a read, a stamp, a guarded write, a closure round, an
invalidation's delete, a prune or an eviction scans a namespace (or the marks); each probes
an index. Checked with the planners' own EXPLAIN on a namespace of 5,000 entries and marks."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fleetcache.stores import queries as q
from fleetcache.stores.base import Key
from fleetcache.stores.postgres import PostgresStore, key_hash
from fleetcache.stores.sqlite import PRUNE_BATCH, SqliteStore

NS = "https://realm.example/"
BIG_TABLE_SCAN = re.compile(
    r"SCAN (fleetcache_entries|fleetcache_entry_deps|fleetcache_generations)\b"
)
ROWS = 5_000


def seq_scans(plan: dict[str, Any]) -> list[str]:
    """The relations a Postgres JSON plan reads with a sequential scan."""
    found = [plan["Relation Name"]] if plan.get("Node Type") == "Seq Scan" else []
    for child in plan.get("Plans", []):
        found += seq_scans(child)
    return found


async def test_postgres_statements_probe_indexes(database_url: str) -> None:
    """Every per-key or per-name statement of the Postgres store uses an index, never a
    sequential scan of the entries or the marks."""
    store = PostgresStore(database_url, max_size=1)
    await store.open()
    try:
        async with store.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id,"
                " value, codec, deps, alias)"
                " SELECT sha256(('k' || i)::bytea), %(ns)s, %(ns)s || 'm' || i || '.gts',"
                " 'public', '', '{}'::bytea, 'json', ARRAY[%(ns)s || 'm' || (i + 1)],"
                " %(ns)s || 'm' || i"
                " FROM generate_series(1, %(rows)s) AS i",
                {"ns": NS, "rows": ROWS},
            )
            await conn.execute(
                "INSERT INTO fleetcache_generations"
                " SELECT 'k', %(ns)s, %(ns)s || 'm' || i, '5'::xid8, now()"
                " FROM generate_series(1, %(rows)s) AS i",
                {"ns": NS, "rows": ROWS},
            )
            await conn.execute("ANALYZE")
        key = Key(NS, NS + "m5")
        params: dict[str, Any] = {
            "key_hash": key_hash(key),
            "ns": NS,
            "name": key.name,
            "scope": "public",
            "user": "",
        }
        names = [NS + "m5", NS + "m6.gts"]
        stamp, _ = await store.stamp_and_read(key, ["m5"])
        write = {
            **params,
            "value": b"1",
            "codec": "json",
            "deps": [],
            "error": None,
            "created_at": None,
            "alias": None,
            "diagnostics": None,
            "expires_at": None,
            "stale_until": None,
            "compute_ms": None,
            "guarded": True,
            "names": names,
            "snapshot": stamp.point.snapshot,
            "taken_at": stamp.point.taken_at,
            "max_age": 100.0,
        }
        statements = {
            "read": (q.PG_READ, params),
            "read by alias": (q.PG_READ_BY_ALIAS, params),
            "stamp and read": (q.PG_STAMP_AND_READ_BY_ALIAS, params),
            "guarded write": (q.PG_UPSERT_FOR_PLAN, write),
            "closure round": (q.PG_CLOSURE_ROUND, {"ns": NS, "names": names}),
            "mark and delete": (
                q.PG_MARK_AND_DELETE_NAMES,
                {"kind": "k", "ns": NS, "names": names, "hashes": [key_hash(key)]},
            ),
            "prune": (q.PG_PRUNE_MARKS, {"retention": 3600.0, "limit": 10_000}),
            "purge expired": (q.PG_PURGE_EXPIRED, {"before": 0, "limit": 1000}),
            "evict": (q.PG_EVICT, {"limit": 500}),
        }
        async with store.pool.connection() as conn:
            for label, (statement, bound) in statements.items():
                async with conn.transaction(force_rollback=True):
                    cursor = await conn.execute("EXPLAIN (FORMAT JSON) " + statement, bound)
                    row = await cursor.fetchone()
                assert row is not None
                plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
                assert seq_scans(plan[0]["Plan"]) == [], f"{label} scans: {plan}"
    finally:
        await store.close()


def test_sqlite_statements_probe_indexes(tmp_path: Path) -> None:
    """Every per-key or per-name statement of the sqlite store searches an index (or the
    primary key), never scans the entries, their deps or the marks."""
    import asyncio

    path = tmp_path / "plans.sqlite3"

    async def create() -> None:
        store = SqliteStore(path)
        await store.open()
        await store.close()

    asyncio.run(create())
    conn = sqlite3.connect(path)
    try:
        conn.executemany(
            "INSERT INTO fleetcache_entries"
            " (namespace, name, scope, user_id, value, codec, deps, alias)"
            " VALUES (?, ?, 'public', '', X'7b7d', 'json', '[]', ?)",
            [(NS, f"{NS}m{i}.gts", f"{NS}m{i}") for i in range(ROWS)],
        )
        conn.executemany(
            "INSERT INTO fleetcache_entry_deps VALUES (?, ?, 'public', '', ?)",
            [(NS, f"{NS}m{i}.gts", f"{NS}m{i + 1}") for i in range(ROWS)],
        )
        conn.execute("ANALYZE")
        key = {"ns": NS, "name": NS + "m5", "scope": "public", "user": ""}
        names = json.dumps([NS + "m5", NS + "m6.gts"])
        statements: dict[str, tuple[str, dict[str, Any]]] = {
            "read": (q.SQLITE_READ, key),
            "read by alias": (q.SQLITE_READ_BY_ALIAS, key),
            "stamp and read": (q.SQLITE_STAMP_AND_READ_BY_ALIAS, key),
            "closure round": (q.SQLITE_CLOSURE_ROUND, {"ns": NS, "names": names}),
            "delete deps": (q.SQLITE_DELETE_NAMES[0], {"ns": NS, "names": names}),
            "delete entries": (q.SQLITE_DELETE_NAMES[1], {"ns": NS, "names": names}),
            "prune": (q.SQLITE_PRUNE_MARKS, {"cutoff": 0.0, "limit": PRUNE_BATCH}),
        }
        for label, (statement, bound) in statements.items():
            plan = conn.execute("EXPLAIN QUERY PLAN " + statement, bound).fetchall()
            details = [row[-1] for row in plan]
            # The big tables are never aliased in these statements, so a scan of one
            # reads "SCAN <table>" (scans of json_each, the one-row clock or a one-row
            # subquery are fine).
            scans = [d for d in details if BIG_TABLE_SCAN.match(d)]
            assert scans == [], f"{label}: {details}"
        # Eviction reads the entries in created_at order (an index, stopped by LIMIT) and
        # searches the deps and entries per doomed entry.
        plan = conn.execute("EXPLAIN QUERY PLAN " + q.SQLITE_EVICTION, {"limit": 500})
        details = [row[-1] for row in plan.fetchall()]
        worktables = ("SCAN d", "SCAN (")  # the recursion's rows and the LIMIT subquery
        scans = [d for d in details if d.startswith("SCAN") and not d.startswith(worktables)]
        assert scans == ["SCAN fleetcache_entries USING INDEX fleetcache_entries_created_at"], (
            details
        )
        assert any(d.startswith("SEARCH x USING") for d in details), details
        assert any(d.startswith("SEARCH e USING") for d in details), details
    finally:
        conn.close()


def index_conditions(plan: dict[str, Any]) -> list[str]:
    """The index conditions of every index probe of a Postgres JSON plan."""
    found = [plan["Index Cond"]] if "Index Cond" in plan else []
    for child in plan.get("Plans", []):
        found += index_conditions(child)
    return found


@pytest.mark.parametrize("statistics", ["fresh", "stale"])
async def test_a_large_closure_round_probes_the_indexes_once_per_name(
    database_url: str, statistics: str
) -> None:
    """A closure round over 4,000 names probes the name, alias and deps indexes with each
    name (cost in proportion to the names), never filters the namespace's entries against
    the whole list (every entry compared with every name: seconds for thousands) — with
    fresh statistics, and with statistics taken while the table was nearly empty."""
    store = PostgresStore(database_url, max_size=1)
    await store.open()
    try:
        async with store.pool.connection() as conn:
            await conn.execute("ALTER TABLE fleetcache_entries SET (autovacuum_enabled = off)")
            await conn.execute(
                "INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id,"
                " value, codec, deps) SELECT sha256(('o' || i)::bytea), 'other', 'o' || i,"
                " 'public', '', '{}'::bytea, 'json', '{}' FROM generate_series(1, 50) AS i"
            )
            if statistics == "stale":
                await conn.execute("ANALYZE fleetcache_entries")
            await conn.execute(
                "INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id,"
                " value, codec, deps, alias)"
                " SELECT sha256(('k' || i)::bytea), %(ns)s, %(ns)s || 'm' || i || '.gts',"
                " 'public', '', '{}'::bytea, 'json', ARRAY[%(ns)s || 'hub'], %(ns)s || 'm' || i"
                " FROM generate_series(1, %(rows)s) AS i",
                {"ns": NS, "rows": 2_000},
            )
            if statistics == "fresh":
                await conn.execute("ANALYZE fleetcache_entries")
            names = [f"{NS}m{i}{ext}" for i in range(1, 2_001) for ext in (".gts", "")]
            cursor = await conn.execute(
                "EXPLAIN (FORMAT JSON) " + q.PG_CLOSURE_ROUND, {"ns": NS, "names": names}
            )
            row = await cursor.fetchone()
        assert row is not None
        plan = (row[0] if isinstance(row[0], list) else json.loads(row[0]))[0]["Plan"]
        assert seq_scans(plan) == [], f"closure round scans: {plan}"
        conditions = index_conditions(plan)
        assert len(conditions) == 3, conditions  # name, alias, deps
        per_name = re.compile(r"\bn(_\d+)?\.name\b")
        assert all(per_name.search(c) for c in conditions), conditions
    finally:
        await store.close()
