"""Every SQL statement the stores run, named and commented, in one place.

Values are always bound as parameters (``%(name)s`` for psycopg, ``:name`` for sqlite3);
nothing here is ever formatted with a value. (The f-strings below only splice fixed column
lists and the advisory-lock classes, which are constants of this module.)

Schema version 3 (this release)
===============================

``fleetcache_entries`` holds one row per key ``(namespace, name, scope, user_id)``:
``value`` (the bytes its ``codec`` made: ``json`` is UTF-8 JSON text), ``deps`` (the names
it depends on), ``error`` and ``diagnostics`` (JSON text, SQL NULL when absent),
``created_at`` (ms since the epoch) and ``alias``. Values, errors and diagnostics are kept
exactly as encoded (``bytea``/``text``, never ``jsonb``, which reorders keys and rewrites
numbers), so a read decodes to what was written; ``deps`` stay a ``text[]`` on Postgres
because the closure queries match them through a GIN index. On Postgres the
primary key is ``key_hash``, the sha256 of the four fields each written as
``b"<utf-8 byte length>:" + utf-8 bytes`` (so no two splittings of the same characters
share a hash, and a key of any length fits a btree); sqlite keys the row by the fields.
Long texts are indexed through ``md5()`` on Postgres (a btree entry must stay under a third
of a page), and every query that probes such an index also compares the text itself.

``fleetcache_generations`` holds the *marks*: kind ``g`` (the one global mark, namespace
and name ``''``), ``n`` (a namespace, name ``''``) and ``k`` (a name of a namespace), each
saying which invalidation last set it and when (``marked_at``, for pruning). On Postgres
``bumped_by`` is the invalidating transaction's id (``xid8``) and a stamp is the statement
snapshot of a read (``pg_current_snapshot()``): a write is refused if a mark it depends on
was set by a transaction that snapshot does not see as committed. On sqlite ``seq`` is a
reading of the one-row invalidation clock ``fleetcache_clock``, and a write is refused if
a mark it depends on is newer than the stamp's reading. sqlite has no GIN index, so
``fleetcache_entry_deps`` lists each entry's deps, indexed by ``(namespace, dep)``.

``fleetcache_schema`` holds the version (one row). Version 1 (the first release) kept the
entries in a table named ``modules`` with the seed's column names; ``migrations`` upgrades
it (see ``PG_UPGRADE_1_TO_2`` and ``SQLITE_UPGRADE_1_TO_2``) and leaves ``modules`` alone.
Version 2 kept values, errors and diagnostics as ``jsonb`` on Postgres; version 3 converts
them in place (``PG_UPGRADE_2_TO_3``, ``SQLITE_UPGRADE_2_TO_3``). Version 4 differs from 3
only in the Postgres deps index, which keeps no pending list (``PG_UPGRADE_3_TO_4``).
Version 5 adds the Postgres functions ``fleetcache_invalidate``,
``fleetcache_clear_namespace`` (invalidation from SQL, in the caller's transaction) and their
helpers ``fleetcache_namespace_lock`` and ``fleetcache_invalidation_payloads``
(``PG_UPGRADE_4_TO_5``); the sqlite schema is unchanged.
Version 6 adds what a bounded table needs (``PG_UPGRADE_5_TO_6``, ``SQLITE_UPGRADE_5_TO_6``):
``fleetcache_counts``, the entries and value bytes kept by triggers on every insert, update
and delete (so a store learns the table's size without counting it), and an index on
``created_at`` (eviction takes the least recently written first).
Version 7 adds the Postgres function ``fleetcache_try_lock_and_read_v1`` (a key's try-lock
and its stamp-and-read in one statement, the read after the try; ``PG_UPGRADE_6_TO_7``);
the sqlite schema is unchanged. Version 8 counts Postgres inserts and updates with row
triggers (``PG_UPGRADE_7_TO_8``), and version 9 spreads the Postgres counts over
:data:`PG_COUNT_SHARDS` rows instead of 16 (``PG_UPGRADE_8_TO_9``); the sqlite schema is
unchanged by both.
"""

from __future__ import annotations

from fleetcache.stores.validation import MAX_NAME_BYTES

#: The schema version this release creates and understands.
SCHEMA_VERSION = 9

# Advisory-lock classes (the two-int form, a key space apart from the coordinator's
# one-bigint locks): schema changes, the global lock, a namespace's lock (second int: a
# 32-bit hash of the namespace; two namespaces sharing one only take turns).
LOCK_SCHEMA = 0x4643_0000
LOCK_GLOBAL = 0x4643_0001
LOCK_NAMESPACE = 0x4643_0002

# =========================================================================== Postgres

# ----------------------------------------------------------------- schema and migrations

#: Serialises schema creation and upgrades between processes opening one database.
PG_LOCK_SCHEMA = f"SELECT pg_advisory_xact_lock({LOCK_SCHEMA}, 0)"

#: Whether the version table exists (in the schema unqualified names resolve to).
PG_HAS_SCHEMA_TABLE = "SELECT to_regclass('fleetcache_schema') IS NOT NULL"
#: The version this database holds.
PG_GET_SCHEMA_VERSION = "SELECT version FROM fleetcache_schema"
#: How many of the first release's columns a table ``modules`` has (10: it is ours to copy).
PG_COUNT_V1_COLUMNS = """
    SELECT count(*) FROM pg_attribute
    WHERE attrelid = to_regclass('modules') AND NOT attisdropped
      AND attname = ANY (ARRAY['url', 'cache_scope', 'auth_user_id', 'resolved_realm_url',
                               'definitions', 'deps', 'error_doc', 'created_at', 'file_alias',
                               'diagnostics'])
"""
#: Records the version reached.
PG_SET_SCHEMA_VERSION = "UPDATE fleetcache_schema SET version = %(version)s"

# The entries table as version 2 created it (the upgrade from version 1 makes it so).
_PG_CREATE_ENTRIES_TABLE_V2 = """
    CREATE TABLE fleetcache_entries (
        key_hash bytea PRIMARY KEY,
        namespace text NOT NULL,
        name text NOT NULL,
        scope text NOT NULL,
        user_id text NOT NULL,
        value jsonb NOT NULL,
        deps text[] NOT NULL,
        error jsonb,
        created_at bigint,
        alias text,
        diagnostics jsonb,
        expires_at bigint,
        stale_until bigint,
        compute_ms integer
    )
"""

# The entries table now. (``codec`` comes last, where the upgrade from version 2 adds it.)
_PG_CREATE_ENTRIES_TABLE = """
    CREATE TABLE fleetcache_entries (
        key_hash bytea PRIMARY KEY,
        namespace text NOT NULL,
        name text NOT NULL,
        scope text NOT NULL,
        user_id text NOT NULL,
        value bytea NOT NULL,
        deps text[] NOT NULL,
        error text,
        created_at bigint,
        alias text,
        diagnostics text,
        expires_at bigint,
        stale_until bigint,
        compute_ms integer,
        codec text NOT NULL
    )
"""

_PG_ENTRIES_INDEXES = [
    # Purging entries past their stale window, oldest first.
    """
    CREATE INDEX fleetcache_entries_stale_until ON fleetcache_entries (stale_until)
        WHERE stale_until IS NOT NULL
    """,
    # Deletes by (namespace, name), closure rounds by name, namespace deletes (prefix).
    "CREATE INDEX fleetcache_entries_name ON fleetcache_entries (md5(namespace), md5(name))",
    # Alias reads within (namespace, scope, user); deletes and closure rounds by alias.
    """
    CREATE INDEX fleetcache_entries_alias
        ON fleetcache_entries (md5(namespace), md5(alias), md5(scope), md5(user_id))
    """,
    # Dependents: entries whose deps meet a set of names. Without a pending list
    # (fastupdate): every probe would scan all of it (up to 4 MB), and an invalidation
    # probes once per name.
    """
    CREATE INDEX fleetcache_entries_deps ON fleetcache_entries USING gin (deps)
        WITH (fastupdate = off)
    """,
]

_PG_MARKS_INDEXES = [
    """
    CREATE UNIQUE INDEX IF NOT EXISTS fleetcache_generations_key
        ON fleetcache_generations (kind, md5(namespace), md5(name))
    """,
    # Pruning finds the old marks without reading the young ones.
    "CREATE INDEX fleetcache_generations_marked_at ON fleetcache_generations (marked_at)",
]

# A write is one statement, ``SELECT fleetcache_write_v3(...)``, so it costs one round
# trip and no client-side transaction: the function share-locks the global and the
# namespace lock, in that order (everyone takes them in that order, so they never
# deadlock), and then, in its *next* statement, runs the guarded upsert. In READ COMMITTED
# a VOLATILE PL/pgSQL function takes a fresh snapshot for each statement, so the upsert's
# snapshot is taken after any wait for an invalidation has ended, and it sees that
# invalidation's marks (see "Why an invalidation closes every window" in postgres.py).
# The locks are held until the statement's transaction ends, so an invalidation either
# committed before the upsert's snapshot or waits for the write to commit.

# The write's arguments: name and SQL type, in the function's order.
_WRITE_ARGS = (
    ("key_hash", "bytea"),
    ("ns", "text"),
    ("name", "text"),
    ("scope", "text"),
    ("user", "text"),
    ("value", "bytea"),
    ("codec", "text"),
    ("deps", "text[]"),
    ("error", "text"),
    ("created_at", "bigint"),
    ("alias", "text"),
    ("diagnostics", "text"),
    ("expires_at", "bigint"),
    ("stale_until", "bigint"),
    ("compute_ms", "integer"),
    ("ns_lock", "integer"),
    ("guarded", "boolean"),
    ("names", "text[]"),
    ("snapshot", "pg_snapshot"),
    ("taken_at", "float8"),
    ("max_age", "float8"),
    ("channel", "text"),
    ("payload", "text"),
)

# The upsert, written once with {placeholders}: bound as %(name)s parameters for EXPLAIN
# (tests look at its plan), and as the function's p_name arguments inside it. Unguarded, it
# always writes; guarded, only if the stamp is younger than the maximum age (by the
# server's clock) and no mark the write depends on (the global one, the namespace's, its
# names') was set by a transaction the stamp's snapshot did not see committed.
_UPSERT = """
    INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id, value, codec,
                                    deps, error, created_at, alias, diagnostics, expires_at,
                                    stale_until, compute_ms)
    SELECT {key_hash}, {ns}, {name}, {scope}, {user}, {value}::bytea, {codec}::text,
           {deps}::text[], {error}::text, {created_at}, {alias}, {diagnostics}::text,
           {expires_at}, {stale_until}, {compute_ms}
    WHERE NOT {guarded}
       OR ({taken_at}::float8 > extract(epoch FROM statement_timestamp()) - {max_age}::float8
           AND NOT EXISTS (
             SELECT 1 FROM fleetcache_generations
             WHERE ((kind = 'g' AND md5(namespace) = md5('') AND md5(name) = md5(''))
                    OR (kind = 'n' AND md5(namespace) = md5({ns}) AND md5(name) = md5('')
                        AND namespace = {ns})
                    OR (kind = 'k' AND md5(namespace) = md5({ns})
                        AND md5(name) = ANY (ARRAY(SELECT md5(n)
                                                   FROM unnest({names}::text[]) AS n))
                        AND namespace = {ns} AND name = ANY ({names}::text[])))
               AND NOT pg_visible_in_snapshot(bumped_by, {snapshot}::pg_snapshot)))
    ON CONFLICT (key_hash) DO UPDATE SET
        value = EXCLUDED.value, codec = EXCLUDED.codec, deps = EXCLUDED.deps,
        error = EXCLUDED.error, created_at = EXCLUDED.created_at, alias = EXCLUDED.alias,
        diagnostics = EXCLUDED.diagnostics, expires_at = EXCLUDED.expires_at,
        stale_until = EXCLUDED.stale_until, compute_ms = EXCLUDED.compute_ms
"""

#: The upsert alone, with %(name)s parameters (for EXPLAIN; writes go through the function).
PG_UPSERT_FOR_PLAN = _UPSERT.format(**{name: f"%({name})s" for name, _ in _WRITE_ARGS})

#: The write function: locks, then the upsert, then (only if it wrote) the NOTIFY to send
#: with the write's commit, when the row is visible to whoever hears it. Returns whether it
#: wrote. (Created by the migrations; version 3 replaced ``fleetcache_write_v2``, whose
#: value, error and diagnostics were ``jsonb``.)
PG_CREATE_WRITE_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION fleetcache_write_v3(
        {", ".join(f"p_{name} {kind}" for name, kind in _WRITE_ARGS)}
    ) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fleetcache$
    BEGIN
        PERFORM pg_advisory_xact_lock_shared({LOCK_GLOBAL}, 0),
                pg_advisory_xact_lock_shared({LOCK_NAMESPACE}, p_ns_lock);
        {_UPSERT.format(**{name: f"p_{name}" for name, _ in _WRITE_ARGS})};
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        IF p_channel IS NOT NULL THEN
            PERFORM pg_notify(p_channel, p_payload);
        END IF;
        RETURN true;
    END
    $fleetcache$
"""

# ------------------------------------------------------------- the table's size (v5)

#: How many rows ``fleetcache_counts`` may have on Postgres. Every statement that changes
#: the entries adds its deltas to *one* row, chosen by its backend's pid, so concurrent
#: writers rarely wait for one another's counter row (one hot row would serialise every
#: write of the fleet), and a transaction updates one counter row at most per statement
#: of one backend (always the same row), so counter rows never take part in a deadlock.
#: The size is the sum over the rows (a row alone may go negative); a row is made by its
#: first use. A writer holds its row until it commits, the commit's WAL flush included,
#: so two backends sharing a row take turns: with 16 rows (versions 6 to 8) and 32
#: backends writing (8 processes x 4 pooled connections, the bench's ``fast`` scenario),
#: the counter update took 1.57 ms on average, against 0.03-0.04 ms with 1,024 rows
#: (version 9), where backends share a row only if their pids differ by a multiple of 1,024.
PG_COUNT_SHARDS = 1024

# Adds d_entries and d_bytes to this backend's counter row (PL/pgSQL, in both count
# functions). An UNLOGGED table after a crash has lost the counts with the entries: the
# row comes back at its first use.
_PG_ADD_TO_COUNTS = f"""
    UPDATE fleetcache_counts
    SET entries = entries + d_entries, bytes = bytes + d_bytes
    WHERE shard = pg_backend_pid() % {PG_COUNT_SHARDS};
    IF NOT FOUND THEN
        INSERT INTO fleetcache_counts (shard, entries, bytes)
        VALUES (pg_backend_pid() % {PG_COUNT_SHARDS}, d_entries, d_bytes)
        ON CONFLICT (shard) DO UPDATE
        SET entries = fleetcache_counts.entries + EXCLUDED.entries,
            bytes = fleetcache_counts.bytes + EXCLUDED.bytes;
    END IF;
"""

# The statement-level trigger function, with transition tables: one counter update per
# statement however many rows it touched (an invalidation deleting 10,000 rows updates it
# once). It counts deletes (and, until version 8, inserts and updates).
_PG_COUNT_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION fleetcache_count_v1() RETURNS trigger
    LANGUAGE plpgsql AS $fleetcache$
    DECLARE
        d_entries bigint := 0;
        d_bytes bigint := 0;
        old_bytes bigint;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            SELECT count(*), coalesce(sum(octet_length(value)), 0)
                INTO d_entries, d_bytes FROM fleetcache_new;
        ELSIF TG_OP = 'DELETE' THEN
            SELECT -count(*), -coalesce(sum(octet_length(value)), 0)
                INTO d_entries, d_bytes FROM fleetcache_old;
        ELSE
            SELECT coalesce(sum(octet_length(value)), 0) INTO d_bytes FROM fleetcache_new;
            SELECT coalesce(sum(octet_length(value)), 0) INTO old_bytes FROM fleetcache_old;
            d_bytes := d_bytes - old_bytes;
        END IF;
        IF d_entries <> 0 OR d_bytes <> 0 THEN
            {_PG_ADD_TO_COUNTS}
        END IF;
        RETURN NULL;
    END
    $fleetcache$
"""

# Version 6's counts: the table (its shard 0 made at once, for the upgrade's first count),
# the count function, the delete trigger and the eviction index; and (until version 8)
# the insert and update triggers.
_PG_CREATE_COUNTS = [
    """
    CREATE TABLE fleetcache_counts (
        shard integer PRIMARY KEY,
        entries bigint NOT NULL,
        bytes bigint NOT NULL
    )
    """,
    "INSERT INTO fleetcache_counts (shard, entries, bytes) VALUES (0, 0, 0)",
    _PG_COUNT_FUNCTION,
    """
    CREATE TRIGGER fleetcache_count_delete AFTER DELETE ON fleetcache_entries
    REFERENCING OLD TABLE AS fleetcache_old
    FOR EACH STATEMENT EXECUTE FUNCTION fleetcache_count_v1()
    """,
    # Eviction reads the least recently written first (NULL created_at: oldest of all).
    """
    CREATE INDEX fleetcache_entries_created_at
        ON fleetcache_entries (created_at ASC NULLS FIRST)
    """,
]
# Version 6's insert and update triggers (replaced by row triggers in version 8).
_PG_COUNT_STATEMENT_TRIGGERS = [
    """
    CREATE TRIGGER fleetcache_count_insert AFTER INSERT ON fleetcache_entries
    REFERENCING NEW TABLE AS fleetcache_new
    FOR EACH STATEMENT EXECUTE FUNCTION fleetcache_count_v1()
    """,
    """
    CREATE TRIGGER fleetcache_count_update AFTER UPDATE ON fleetcache_entries
    REFERENCING OLD TABLE AS fleetcache_old NEW TABLE AS fleetcache_new
    FOR EACH STATEMENT EXECUTE FUNCTION fleetcache_count_v1()
    """,
]

#: Version 5 -> 6: the counts (starting from one count of the table, under the upgrade's
#: lock: writers of the old release would not be counted, which is why every process
#: must run this release before a bound is relied on) and the ``created_at`` index.
PG_UPGRADE_5_TO_6 = [
    *_PG_CREATE_COUNTS,
    *_PG_COUNT_STATEMENT_TRIGGERS,
    """
    UPDATE fleetcache_counts
    SET entries = (SELECT count(*) FROM fleetcache_entries),
        bytes = (SELECT coalesce(sum(octet_length(value)), 0) FROM fleetcache_entries)
    WHERE shard = 0
    """,
]

# Inserts and updates are counted by row triggers (version 8): a write is one row, and a
# statement-level trigger costs it two calls (INSERT ... ON CONFLICT fires the INSERT and
# the UPDATE statement triggers both), each reading its transition tables: 46-58 us of
# server CPU per write against 11 here (docs/design.md, "Schema versions"). An
# update keeping the value's size calls nothing (the WHEN clause).
_PG_COUNT_ROW_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION fleetcache_count_row_v1() RETURNS trigger
    LANGUAGE plpgsql AS $fleetcache$
    DECLARE
        d_entries bigint := 0;
        d_bytes bigint;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            d_entries := 1;
            d_bytes := octet_length(NEW.value);
        ELSE
            d_bytes := octet_length(NEW.value) - octet_length(OLD.value);
        END IF;
        {_PG_ADD_TO_COUNTS}
        RETURN NULL;
    END
    $fleetcache$
"""
_PG_COUNT_ROW_TRIGGERS = [
    _PG_COUNT_ROW_FUNCTION,
    """
    CREATE TRIGGER fleetcache_count_insert AFTER INSERT ON fleetcache_entries
    FOR EACH ROW EXECUTE FUNCTION fleetcache_count_row_v1()
    """,
    """
    CREATE TRIGGER fleetcache_count_update AFTER UPDATE OF value ON fleetcache_entries
    FOR EACH ROW WHEN (octet_length(OLD.value) <> octet_length(NEW.value))
    EXECUTE FUNCTION fleetcache_count_row_v1()
    """,
]

#: Version 7 -> 8: inserts and updates counted by row triggers (see above), in place of
#: version 6's statement triggers; the counts themselves are unchanged.
PG_UPGRADE_7_TO_8 = [
    "DROP TRIGGER fleetcache_count_insert ON fleetcache_entries",
    "DROP TRIGGER fleetcache_count_update ON fleetcache_entries",
    *_PG_COUNT_ROW_TRIGGERS,
]

#: Version 8 -> 9: the count functions add to one of :data:`PG_COUNT_SHARDS` rows (1,024)
#: instead of 16. The rows already there keep their counts (the size is the sum of all).
PG_UPGRADE_8_TO_9 = [_PG_COUNT_FUNCTION, _PG_COUNT_ROW_FUNCTION]

#: Whether the entries table is UNLOGGED.
PG_IS_UNLOGGED = """
    SELECT relpersistence = 'u' FROM pg_class WHERE oid = to_regclass('fleetcache_entries')
"""
#: Makes the entries and their counts UNLOGGED (one rewrite of each, under an exclusive
#: lock, in one transaction): not written to the WAL, so emptied after a crash and absent
#: on streaming replicas. The marks stay logged (an invalidation must survive a crash).
PG_SET_UNLOGGED = [
    "LOCK TABLE fleetcache_entries, fleetcache_counts IN ACCESS EXCLUSIVE MODE",
    "ALTER TABLE fleetcache_entries SET UNLOGGED",
    "ALTER TABLE fleetcache_counts SET UNLOGGED",
]

#: The entries and value bytes the table holds now (committed), from the counts.
PG_TABLE_SIZE = "SELECT sum(entries)::bigint, sum(bytes)::bigint FROM fleetcache_counts"

#: Evicts up to ``limit`` least recently written entries (smallest ``created_at``, NULL
#: first), skipping rows another transaction holds, *and every entry depending on them,
#: transitively* (deps meeting a doomed entry's name or alias, in its namespace): an entry
#: whose dependency is gone would no longer be reached when that dependency's own
#: dependencies are invalidated, and would outlive them. Not an invalidation (nothing is
#: marked): a live entry deleted is a miss. Dependents are locked by the DELETE, which
#: waits for a writer holding one; the caller bounds that wait with ``lock_timeout`` so
#: eviction, never an invalidation, gives up when the two meet. Returns one row per entry
#: deleted. Per doomed entry one probe of the deps index (LATERAL, fenced by OFFSET 0 so
#: it is planned on its own: joined as a set, the planner scans the table per round), and
#: the delete by primary key: in proportion to the batch and its dependents, never to the
#: table.
PG_EVICT = """
    WITH RECURSIVE victims AS (
        SELECT key_hash, namespace, name, alias FROM fleetcache_entries
        ORDER BY created_at ASC NULLS FIRST
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ), doomed (key_hash, namespace, name, alias) AS (
        SELECT key_hash, namespace, name, alias FROM victims
        UNION
        SELECT f.key_hash, f.namespace, f.name, f.alias
        FROM doomed AS d
        CROSS JOIN LATERAL (
            SELECT e.key_hash, e.namespace, e.name, e.alias FROM fleetcache_entries AS e
            WHERE e.deps && array_remove(ARRAY[d.name, d.alias], NULL)
              AND e.namespace = d.namespace
            OFFSET 0) AS f
    )
    DELETE FROM fleetcache_entries
    WHERE key_hash = ANY (ARRAY(SELECT key_hash FROM doomed))
    RETURNING key_hash
"""

#: Bounds the eviction's lock waits (see ``PG_EVICT``), in its own transaction.
PG_EVICT_PATIENCE = "SELECT set_config('lock_timeout', %(patience)s, true)"

#: A new database: the latest schema directly.
PG_CREATE_LATEST = [
    """
    CREATE TABLE fleetcache_schema (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version integer NOT NULL
    )
    """,
    "INSERT INTO fleetcache_schema (version) VALUES (0)",
    _PG_CREATE_ENTRIES_TABLE,
    *_PG_ENTRIES_INDEXES,
    """
    CREATE TABLE fleetcache_generations (
        kind "char" NOT NULL,
        namespace text NOT NULL,
        name text NOT NULL,
        bumped_by xid8 NOT NULL,
        marked_at timestamptz NOT NULL
    )
    """,
    *_PG_MARKS_INDEXES,
    PG_CREATE_WRITE_FUNCTION,
    *_PG_CREATE_COUNTS,
    *_PG_COUNT_ROW_TRIGGERS,
]


def _pg_field(column: str) -> str:
    # One field of the key hash: b"<byte length>:" + UTF-8 bytes (see key_hash in
    # postgres.py, which must agree byte for byte).
    utf8 = f"convert_to({column}, 'UTF8')"
    return f"convert_to(length({utf8})::text || ':', 'UTF8') || {utf8}"


#: Version 1 -> 2: copy the rows of ``modules`` (when it has the first release's columns)
#: into ``fleetcache_entries`` with their key hash computed in SQL, deps as text[], JSON
#: null error/diagnostics as SQL NULL; ``modules`` itself is left as it is.
PG_COPY_V1_ENTRIES = f"""
    INSERT INTO fleetcache_entries (key_hash, namespace, name, scope, user_id, value, deps,
                                    error, created_at, alias, diagnostics)
    SELECT sha256({_pg_field("resolved_realm_url")} || {_pg_field("url")}
                  || {_pg_field("cache_scope")} || {_pg_field("auth_user_id")}),
           resolved_realm_url, url, cache_scope, auth_user_id, definitions,
           CASE WHEN jsonb_typeof(deps) = 'array'
                THEN ARRAY(SELECT d FROM jsonb_array_elements_text(deps) AS d)
                ELSE '{{}}'::text[] END,
           NULLIF(error_doc, 'null'::jsonb), created_at, file_alias,
           NULLIF(diagnostics, 'null'::jsonb)
    FROM modules
    ON CONFLICT (key_hash) DO NOTHING
"""

#: Version 1 -> 2 (the rest): the entries table, and a time on every mark. A version 1
#: mark gets the upgrade's time, so it is kept (and refuses what it refused) for the
#: whole retention from now. (No write function: an upgrade always goes on to version 3,
#: in the same transaction, and that step creates it.)
PG_UPGRADE_1_TO_2 = [
    _PG_CREATE_ENTRIES_TABLE_V2,
    *_PG_ENTRIES_INDEXES,
    """
    ALTER TABLE fleetcache_generations
        ADD COLUMN marked_at timestamptz NOT NULL DEFAULT statement_timestamp()
    """,
    "ALTER TABLE fleetcache_generations ALTER COLUMN marked_at DROP DEFAULT",
    *_PG_MARKS_INDEXES,
]

#: Version 2 -> 3: values become the bytes of their JSON text (codec ``json``), errors and
#: diagnostics JSON text, every row kept. A converted row holds ``jsonb``'s rendering of
#: its document, so it reads back as version 2 read it (keys in ``jsonb``'s order); rows
#: written from now on keep the text they were written with. Then the write function of
#: version 3 replaces version 2's (whose arguments were ``jsonb``).
PG_UPGRADE_2_TO_3 = [
    """
    ALTER TABLE fleetcache_entries
        ALTER COLUMN value TYPE bytea USING convert_to(value::text, 'UTF8'),
        ALTER COLUMN error TYPE text USING error::text,
        ALTER COLUMN diagnostics TYPE text USING diagnostics::text,
        ADD COLUMN codec text NOT NULL DEFAULT 'json'
    """,
    "ALTER TABLE fleetcache_entries ALTER COLUMN codec DROP DEFAULT",
    "DROP FUNCTION IF EXISTS fleetcache_write_v2",
    PG_CREATE_WRITE_FUNCTION,
]

#: Version 3 -> 4: the deps index without a pending list (see ``_PG_CREATE_ENTRIES``);
#: what is pending goes into the index now. (Neither blocks writes.)
PG_UPGRADE_3_TO_4 = [
    "ALTER INDEX fleetcache_entries_deps SET (fastupdate = off)",
    "SELECT gin_clean_pending_list('fleetcache_entries_deps'::regclass)",
]

# ------------------------------------------------------------------------------- reads

# The row a read returns; namespace, scope and user are the key's own.
_PG_ROW = (
    "name, value, codec, deps, error, created_at, alias, diagnostics, expires_at, stale_until,"
    " compute_ms"
)

# The entry stored under exactly the key: one primary-key probe (the fields are compared
# too, so even a hash collision could never hand out another key's row).
_PG_EXACT = f"""
    SELECT {_PG_ROW} FROM fleetcache_entries
    WHERE key_hash = %(key_hash)s AND namespace = %(ns)s AND name = %(name)s
      AND scope = %(scope)s AND user_id = %(user)s
"""

# The exact entry, else the most recently created one aliased by the name: Postgres runs
# the branches of UNION ALL in order and LIMIT 1 stops at the first row, so the alias probe
# runs only on an exact miss and an exact match wins without sorting.
_PG_EXACT_OR_ALIAS = f"""
    ({_PG_EXACT})
    UNION ALL
    (SELECT {_PG_ROW} FROM fleetcache_entries
     WHERE md5(namespace) = md5(%(ns)s) AND md5(alias) = md5(%(name)s)
       AND md5(scope) = md5(%(scope)s) AND md5(user_id) = md5(%(user)s)
       AND namespace = %(ns)s AND alias = %(name)s AND scope = %(scope)s
       AND user_id = %(user)s
     ORDER BY created_at DESC NULLS LAST
     LIMIT 1)
    LIMIT 1
"""

#: ``read(key)``.
PG_READ = _PG_EXACT
#: ``read(key, by_alias=True)``.
PG_READ_BY_ALIAS = _PG_EXACT_OR_ALIAS

# A stamp and a read in one statement: pg_current_snapshot() is the statement's snapshot,
# the one the read sees, so whatever the read missed was committed after the stamp and its
# marks refuse a write under it. statement_timestamp() is the server's time for the stamp's
# age (compared with the same server's clock when the write comes).
_PG_STAMP = """
    SELECT pg_current_snapshot()::text, extract(epoch FROM statement_timestamp())::float8, e.*
    FROM (VALUES (1)) AS one (x) LEFT JOIN LATERAL ({read}) AS e ON true
"""
#: ``stamp_and_read(key, names)``.
PG_STAMP_AND_READ = _PG_STAMP.format(read=_PG_EXACT)
#: ``stamp_and_read(key, names, by_alias=True)``.
PG_STAMP_AND_READ_BY_ALIAS = _PG_STAMP.format(read=_PG_EXACT_OR_ALIAS)


# A try of a key's session lock and its stamp-and-read in one statement (one round trip):
# in READ COMMITTED a VOLATILE PL/pgSQL function takes a fresh snapshot for each statement
# it runs, so the stamp and the read are taken *after* the try — a fill that committed
# before a won try is seen, as a separate stamp_and_read would see it. (One plain SELECT
# would take its snapshot before the try: a holder that committed and released in between
# would be missed, and the key computed twice.) The session lock outlives the statement
# whatever happens to it, so a caller whose statement failed unlocks.
def _with_arguments(query: str) -> str:
    """``query`` with the key's parameters replaced by the function's arguments."""
    for param in ("key_hash", "ns", "name", "scope", "user"):
        query = query.replace(f"%({param})s", f"p_{param}")
    return query


_TRY_READ_BY_ALIAS = _with_arguments(PG_STAMP_AND_READ_BY_ALIAS)
_TRY_READ_EXACT = _with_arguments(PG_STAMP_AND_READ)


#: Creates the try-and-read function (version 7).
PG_CREATE_TRY_LOCK_AND_READ_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION fleetcache_try_lock_and_read_v1(
        p_id bigint, p_key_hash bytea, p_ns text, p_name text, p_scope text, p_user text,
        p_by_alias boolean
    ) RETURNS TABLE (
        won boolean, snapshot text, taken_at float8, name text, value bytea, codec text,
        deps text[], error text, created_at bigint, alias text, diagnostics text,
        expires_at bigint, stale_until bigint, compute_ms integer
    ) LANGUAGE plpgsql VOLATILE AS $fleetcache$
    #variable_conflict use_column
    DECLARE
        v_won boolean := pg_try_advisory_lock(p_id);
    BEGIN
        IF p_by_alias THEN
            RETURN QUERY SELECT v_won, s.* FROM ({_TRY_READ_BY_ALIAS}) AS s;
        ELSE
            RETURN QUERY SELECT v_won, s.* FROM ({_TRY_READ_EXACT}) AS s;
        END IF;
    END
    $fleetcache$
"""

#: Tries the key's session lock, then stamps and reads the key: ``won`` and then the row
#: ``stamp_and_read`` gives.
PG_TRY_LOCK_AND_READ = """
    SELECT * FROM fleetcache_try_lock_and_read_v1(
        %(id)s, %(key_hash)s, %(ns)s, %(name)s, %(scope)s, %(user)s, %(by_alias)s)
"""

#: Version 6 -> 7: the try-and-read function.
PG_UPGRADE_6_TO_7 = [PG_CREATE_TRY_LOCK_AND_READ_FUNCTION]

# ------------------------------------------------------------------------------ writes

# The write function's call (every argument cast, so the call resolves whatever psycopg
# chose for a value's type).
_PG_WRITE_CALL = "fleetcache_write_v3({})".format(
    ", ".join(f"%({name})s::{kind}" for name, kind in _WRITE_ARGS)
)

#: A write: one statement. It first *tries* to share-lock the global and the namespace
#: lock; only when both are granted at once does it call the write function (which takes
#: them again, already held, and runs the guarded upsert in its next statement). Otherwise
#: it answers NULL having written nothing, and the store retries after waiting without a
#: connection. (A try fails while an invalidation holds the lock exclusively or is queued
#: for it, so writes never overtake a waiting invalidation.)
PG_WRITE = f"""
    SELECT CASE WHEN pg_try_advisory_xact_lock_shared({LOCK_GLOBAL}, 0)
                     AND pg_try_advisory_xact_lock_shared({LOCK_NAMESPACE}, %(ns_lock)s)
                THEN {_PG_WRITE_CALL} END
"""

#: Deletes up to ``limit`` entries whose stale window ended before ``before`` (ms since the
#: epoch), skipping rows another transaction holds. Not an invalidation (nothing is marked):
#: such an entry is dead already, and a computation storing its key afresh is welcome. A
#: row rewritten meanwhile is re-checked by FOR UPDATE and kept.
PG_PURGE_EXPIRED = """
    DELETE FROM fleetcache_entries
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM fleetcache_entries
        WHERE stale_until < %(before)s
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED))
"""

# ----------------------------------------------------------------------- invalidations

#: How long an invalidation's lock statement may wait (``%(patience)s``, e.g. ``'200ms'``)
#: before it fails with lock_not_available: the invalidation then rolls back, having done
#: nothing, and waits for its turn without a connection. Reset by
#: ``PG_BOUND_STATEMENTS`` once the locks are held.
PG_LOCK_PATIENCE = "SELECT set_config('lock_timeout', %(patience)s, true)"

#: The isolation level of the caller's transaction (an invalidation in it needs READ
#: COMMITTED: under a transaction snapshot the closure rounds would not see the writes that
#: committed after the snapshot and before the lock).
PG_TRANSACTION_ISOLATION = "SELECT current_setting('transaction_isolation')"

#: An invalidation of names, or a namespace clear: the global lock shared (so a clear_all
#: waits for it), the namespace lock exclusive (so every write of the namespace waits for
#: it, and it waits for every write under way).
PG_LOCK_NAMESPACE = f"""
    SELECT pg_advisory_xact_lock_shared({LOCK_GLOBAL}, 0),
           pg_advisory_xact_lock({LOCK_NAMESPACE}, %(ns_lock)s)
"""
#: ``clear_all``: the global lock exclusive (every write and invalidation waits for it).
PG_LOCK_ALL = f"SELECT pg_advisory_xact_lock({LOCK_GLOBAL}, 0)"

#: Bounds every later statement of the invalidation's transaction (taken after the locks,
#: so waiting for them is not bounded by it): see "Pruning" in postgres.py for why it must
#: be. Lock waits from here on are not cut short (lock_timeout back to 0).
PG_BOUND_STATEMENTS = """
    SELECT set_config('statement_timeout', %(timeout)s, true),
           set_config('lock_timeout', '0', true)
"""

_PG_E_IN_NAMESPACE = "md5(e.namespace) = md5({ns}) AND e.namespace = {ns}"

#: One round of the closure: key hash, name and alias of every entry of the namespace (any
#: scope or user) named or aliased by one of the names, or whose deps contain one. Per
#: name (LATERAL, each branch fenced by OFFSET 0 so it is planned on its own): one probe
#: of the name index, one of the alias index, one of the deps index (no namespace index
#: there, so it cannot be chosen instead). Cost: in proportion to the names and the rows
#: found, never to their product.
_CLOSURE_ROUND = f"""
    SELECT DISTINCT f.key_hash, f.name, f.alias
    FROM unnest({{names}}::text[]) AS n (name)
    CROSS JOIN LATERAL (
        (SELECT e.key_hash, e.name, e.alias FROM fleetcache_entries AS e
         WHERE {_PG_E_IN_NAMESPACE} AND md5(e.name) = md5(n.name) AND e.name = n.name
         OFFSET 0)
        UNION ALL
        (SELECT e.key_hash, e.name, e.alias FROM fleetcache_entries AS e
         WHERE {_PG_E_IN_NAMESPACE} AND md5(e.alias) = md5(n.name) AND e.alias = n.name
         OFFSET 0)
        UNION ALL
        (SELECT e.key_hash, e.name, e.alias FROM fleetcache_entries AS e
         WHERE e.deps @> ARRAY[n.name] AND e.namespace = {{ns}}
         OFFSET 0)
    ) AS f
"""
PG_CLOSURE_ROUND = _CLOSURE_ROUND.format(ns="%(ns)s", names="%(names)s")

#: Deletes up to ``limit`` marks older than the retention, skipping any a concurrent
#: transaction holds (so pruning never waits for anyone and so never joins a deadlock).
PG_PRUNE_MARKS = """
    DELETE FROM fleetcache_generations
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM fleetcache_generations
        WHERE marked_at < statement_timestamp() - make_interval(secs => %(retention)s)
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED))
"""

# Marks (kind, namespace, name) for each name as set by this transaction, now.
_MARK = """
    INSERT INTO fleetcache_generations (kind, namespace, name, bumped_by, marked_at)
    SELECT {kind}, {ns}, n, pg_current_xact_id(), clock_timestamp()
    FROM unnest({names}::text[]) AS n
    ON CONFLICT (kind, md5(namespace), md5(name))
    DO UPDATE SET bumped_by = EXCLUDED.bumped_by, marked_at = EXCLUDED.marked_at
"""
_PG_MARK = _MARK.format(kind="%(kind)s", ns="%(ns)s", names="%(names)s")

#: Marks every name of the closure and deletes the entries its rounds found (by key
#: hash, one probe each): every entry of the namespace named or aliased by a name of the
#: closure, all scopes and users (an entry found through its deps has its name in the
#: closure). The namespace is locked exclusively, so no other entry can have appeared.
#: (Two tables, so one statement may do both.)
PG_MARK_AND_DELETE_NAMES = f"""
    WITH marked AS ({_PG_MARK})
    DELETE FROM fleetcache_entries WHERE key_hash = ANY (%(hashes)s::bytea[])
"""
_PG_IN_NAMESPACE = "md5(namespace) = md5(%(ns)s) AND namespace = %(ns)s"

#: Marks the namespace (kind 'n', names ['']) and deletes its entries.
PG_MARK_AND_DELETE_NAMESPACE = f"""
    WITH marked AS ({_PG_MARK})
    DELETE FROM fleetcache_entries WHERE {_PG_IN_NAMESPACE}
"""
#: Marks the store (kind 'g', namespace '', names ['']) and deletes every entry.
PG_MARK_AND_DELETE_ALL = f"""
    WITH marked AS ({_PG_MARK})
    DELETE FROM fleetcache_entries
"""

#: The invalidation's broadcast, sent in its own transaction: NOTIFY is delivered exactly
#: when the transaction commits (never after a rollback), so no caller cancelled after the
#: commit can lose it. One ``pg_notify`` per payload, in order.
PG_BROADCAST = "SELECT pg_notify(%(channel)s, p) FROM unnest(%(payloads)s::text[]) AS p"

# ------------------------------------------------------- invalidation from SQL (version 5)

# Three functions, created by the migrations, for writers that are not Python and for
# triggers: they run in the caller's transaction, so (as ``invalidate(..., conn=)``) the
# invalidation takes effect and is announced when that transaction commits, and never if it
# rolls back. They do what ``PostgresStore.invalidate`` does, with the same statements
# (``_CLOSURE_ROUND`` and ``_MARK`` are spliced into both): the namespace lock, the closure
# in rounds, the marks, the deletes, the broadcast. Without ``expand`` (a Python function):
# the closure grows from the names given and what the entries hold (names, aliases, deps).
# No pruning and no timeouts set: both would outlive the call, in the caller's transaction.

#: The namespace lock's second int, as ``namespace_lock`` computes it in postgres.py (the
#: first 4 bytes of sha256 over the UTF-8 namespace, a signed big-endian int).
PG_CREATE_NAMESPACE_LOCK_FUNCTION = """
    CREATE OR REPLACE FUNCTION fleetcache_namespace_lock(p_namespace text)
    RETURNS integer LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fleetcache$
        SELECT ('x' || encode(substr(sha256(convert_to(p_namespace, 'UTF8')), 1, 4), 'hex'))
               ::bit(32)::integer
    $fleetcache$
"""

#: The broadcast's payloads, byte for byte what ``invalidation_payloads`` in payloads.py
#: builds (the test suite compares the two on the same inputs): ``to_json`` escapes a text
#: as ``json.dumps(..., ensure_ascii=False)`` does, and sizes are UTF-8 bytes. A namespace
#: NULL or empty: the payload for everything; names NULL: the namespace's.
PG_CREATE_PAYLOADS_FUNCTION = """
    CREATE OR REPLACE FUNCTION fleetcache_invalidation_payloads(
        p_namespace text, p_names text[], p_origin text DEFAULT NULL,
        p_budget integer DEFAULT 7000
    ) RETURNS text[] LANGUAGE plpgsql STABLE AS $fleetcache$
    DECLARE
        v_tail text := CASE WHEN p_origin IS NULL THEN '}'
                            ELSE ',"o":' || to_json(p_origin)::text || '}' END;
        v_whole_namespace text;
        v_head text;
        v_fixed integer;
        v_size integer;
        v_piece text;
        v_piece_size integer;
        v_name text;
        v_chunk text[] := '{}';
        v_payloads text[] := '{}';
    BEGIN
        IF p_namespace IS NULL OR p_namespace = '' THEN
            RETURN ARRAY['{"k":"global"' || v_tail];
        END IF;
        v_whole_namespace := '{"k":"realm","r":' || to_json(p_namespace)::text || v_tail;
        IF octet_length(convert_to(v_whole_namespace, 'UTF8')) >= p_budget THEN
            RETURN ARRAY['{"k":"global"' || v_tail];
        END IF;
        IF p_names IS NULL THEN
            RETURN ARRAY[v_whole_namespace];
        END IF;
        v_head := '{"k":"module","r":' || to_json(p_namespace)::text || ',"m":[';
        v_tail := ']' || v_tail;
        v_fixed := octet_length(convert_to(v_head, 'UTF8'))
                   + octet_length(convert_to(v_tail, 'UTF8'));
        v_size := v_fixed;
        FOREACH v_name IN ARRAY p_names LOOP
            IF v_name IS NULL OR v_name = '' THEN
                RETURN ARRAY[v_whole_namespace];
            END IF;
            v_piece := to_json(v_name)::text;
            v_piece_size := octet_length(convert_to(v_piece, 'UTF8'));
            IF v_fixed + v_piece_size >= p_budget THEN
                RETURN ARRAY[v_whole_namespace];
            END IF;
            IF cardinality(v_chunk) > 0 AND v_size + 1 + v_piece_size >= p_budget THEN
                v_payloads := v_payloads || (v_head || array_to_string(v_chunk, ',') || v_tail);
                v_chunk := '{}';
                v_size := v_fixed;
            END IF;
            v_size := v_size + v_piece_size + CASE WHEN cardinality(v_chunk) > 0 THEN 1 ELSE 0 END;
            v_chunk := v_chunk || v_piece;
        END LOOP;
        IF cardinality(v_chunk) > 0 THEN
            v_payloads := v_payloads || (v_head || array_to_string(v_chunk, ',') || v_tail);
        END IF;
        RETURN v_payloads;
    END
    $fleetcache$
"""

_SQL_NAMESPACE_CHECK = """
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'fleetcache: invalidating in a % transaction could miss entries %',
                current_setting('transaction_isolation'),
                'written after its snapshot: invalidate in a READ COMMITTED transaction'
                USING ERRCODE = 'invalid_transaction_state';
        END IF;
        IF p_namespace IS NULL OR p_namespace = '' THEN
            RAISE EXCEPTION 'fleetcache: the namespace to invalidate must be a non-empty text'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF octet_length(convert_to(p_namespace, 'UTF8')) > {max_bytes} THEN
            RAISE EXCEPTION 'fleetcache: the namespace to invalidate is % bytes long; limit %',
                octet_length(convert_to(p_namespace, 'UTF8')), {max_bytes}
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
"""
# The locks of ``PG_LOCK_NAMESPACE``, in the same order (global shared, namespace exclusive).
_SQL_LOCK_NAMESPACE = """
        PERFORM pg_advisory_xact_lock_shared({lock_global}, 0),
                pg_advisory_xact_lock({lock_namespace}, fleetcache_namespace_lock(p_namespace));
"""

#: ``fleetcache_invalidate(namespace, names[, channel])``: the invalidation of ``names``
#: and their dependents in the caller's transaction; returns the closure (the given names
#: first, each once, in order). The lock is taken first, so every round sees every write
#: committed before it, and none commits until the caller's transaction ends.
PG_CREATE_INVALIDATE_FUNCTION = """
    CREATE OR REPLACE FUNCTION fleetcache_invalidate(
        p_namespace text, p_names text[],
        p_channel text DEFAULT 'fleetcache_invalidated_v1'
    ) RETURNS text[] LANGUAGE plpgsql VOLATILE AS $fleetcache$
    DECLARE
        v_closure text[];
        v_frontier text[];
        v_new text[];
        v_hashes bytea[];
        v_found bytea[] := '{{}}';
    BEGIN
        {check}
        IF p_names IS NULL OR array_position(p_names, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'fleetcache: the names to invalidate in namespace % must be %',
                quote_literal(p_namespace), 'an array of texts without NULL'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF EXISTS (SELECT 1 FROM unnest(p_names) AS n
                   WHERE octet_length(convert_to(n, 'UTF8')) > {max_bytes}) THEN
            RAISE EXCEPTION 'fleetcache: a name to invalidate in namespace % is over % bytes',
                quote_literal(p_namespace), {max_bytes}
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        {lock}
        SELECT coalesce(array_agg(g.n ORDER BY g.first), '{{}}') INTO v_closure
        FROM (SELECT u.n, min(u.i) AS first
              FROM unnest(p_names) WITH ORDINALITY AS u (n, i) GROUP BY u.n) AS g;
        IF cardinality(v_closure) = 0 THEN
            RETURN v_closure;
        END IF;
        v_frontier := v_closure;
        WHILE cardinality(v_frontier) > 0 LOOP
            SELECT coalesce(array_agg(DISTINCT r.key_hash), '{{}}'),
                   coalesce(array_agg(DISTINCT x.name)
                            FILTER (WHERE x.name IS NOT NULL AND x.name <> ALL (v_closure)),
                            '{{}}')
            INTO v_hashes, v_new
            FROM ({round}) AS r
            CROSS JOIN LATERAL unnest(ARRAY[r.name, r.alias]) AS x (name);
            v_found := v_found || v_hashes;
            v_closure := v_closure || v_new;
            v_frontier := v_new;
        END LOOP;
        {mark};
        DELETE FROM fleetcache_entries WHERE key_hash = ANY (v_found);
        IF p_channel IS NOT NULL THEN
            PERFORM pg_notify(p_channel, p)
            FROM unnest(fleetcache_invalidation_payloads(p_namespace, v_closure)) AS p;
        END IF;
        RETURN v_closure;
    END
    $fleetcache$
"""

#: ``fleetcache_clear_namespace(namespace[, channel])``: the namespace's clear in the
#: caller's transaction (mark ``n``, every entry of the namespace deleted, announced).
PG_CREATE_CLEAR_NAMESPACE_FUNCTION = """
    CREATE OR REPLACE FUNCTION fleetcache_clear_namespace(
        p_namespace text, p_channel text DEFAULT 'fleetcache_invalidated_v1'
    ) RETURNS void LANGUAGE plpgsql VOLATILE AS $fleetcache$
    BEGIN
        {check}
        {lock}
        {mark};
        DELETE FROM fleetcache_entries
        WHERE md5(namespace) = md5(p_namespace) AND namespace = p_namespace;
        IF p_channel IS NOT NULL THEN
            PERFORM pg_notify(p_channel, p)
            FROM unnest(fleetcache_invalidation_payloads(p_namespace, NULL)) AS p;
        END IF;
    END
    $fleetcache$
"""


def _sql_functions() -> list[str]:
    check = _SQL_NAMESPACE_CHECK.format(max_bytes=MAX_NAME_BYTES)
    lock = _SQL_LOCK_NAMESPACE.format(lock_global=LOCK_GLOBAL, lock_namespace=LOCK_NAMESPACE)
    return [
        PG_CREATE_NAMESPACE_LOCK_FUNCTION,
        PG_CREATE_PAYLOADS_FUNCTION,
        PG_CREATE_INVALIDATE_FUNCTION.format(
            check=check,
            lock=lock,
            max_bytes=MAX_NAME_BYTES,
            round=_CLOSURE_ROUND.format(ns="p_namespace", names="v_frontier"),
            mark=_MARK.format(kind="'k'", ns="p_namespace", names="v_closure"),
        ),
        PG_CREATE_CLEAR_NAMESPACE_FUNCTION.format(
            check=check,
            lock=lock,
            mark=_MARK.format(kind="'n'", ns="p_namespace", names="ARRAY['']"),
        ),
    ]


#: A trigger invalidating, in the changing transaction, the names a changed row maps to:
#: ``{names}`` is the operator's SQL expression (a text[]) over the row ``r`` (OLD for a
#: delete, NEW for an insert, both for an update); the other placeholders are quoted by
#: ``fleetcache.stores.triggers`` (identifiers and a literal), never spliced as text.
PG_INVALIDATION_TRIGGER = """
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $fleetcache$
DECLARE
    r {table}%ROWTYPE;
    v_names text[] := '{{}}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        r := OLD;
        v_names := v_names || ({names})::text[];
    END IF;
    IF TG_OP <> 'DELETE' THEN
        r := NEW;
        v_names := v_names || ({names})::text[];
    END IF;
    PERFORM fleetcache_invalidate({namespace}, v_names, {channel});
    RETURN NULL;
END
$fleetcache$;
CREATE OR REPLACE TRIGGER {trigger}
    AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();
"""

#: The invalidation of names from a caller's synchronous connection (the sync API):
#: the SQL function, which runs the same statements as the library.
PG_CALL_INVALIDATE = "SELECT fleetcache_invalidate(%(ns)s, %(names)s::text[], %(channel)s)"
#: The namespace's clear, likewise.
PG_CALL_CLEAR_NAMESPACE = "SELECT fleetcache_clear_namespace(%(ns)s, %(channel)s)"

#: Whether the invalidation functions exist (schema version 5 or later).
PG_HAS_INVALIDATE_FUNCTION = (
    "SELECT to_regprocedure('fleetcache_invalidate(text, text[], text)') IS NOT NULL"
)

#: The invalidation functions, in the order they must be created (a new database gets them
#: after ``PG_CREATE_LATEST``).
PG_CREATE_INVALIDATION_FUNCTIONS = _sql_functions()
#: Version 4 -> 5: the invalidation functions (nothing else changes).
PG_UPGRADE_4_TO_5 = PG_CREATE_INVALIDATION_FUNCTIONS

# ============================================================================= sqlite

# ----------------------------------------------------------------- schema and migrations

#: Whether the version table exists.
SQLITE_HAS_SCHEMA_TABLE = (
    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'fleetcache_schema'"
)
#: The version this file holds.
SQLITE_GET_SCHEMA_VERSION = "SELECT version FROM fleetcache_schema"
#: Whether a table ``modules`` with the first release's columns exists (1) or not (0).
SQLITE_HAS_V1_ENTRIES = """
    SELECT count(*) = 10 FROM pragma_table_info('modules')
    WHERE name IN ('url', 'cache_scope', 'auth_user_id', 'resolved_realm_url', 'definitions',
                   'deps', 'error_doc', 'created_at', 'file_alias', 'diagnostics')
"""
#: Records the version reached.
SQLITE_SET_SCHEMA_VERSION = "UPDATE fleetcache_schema SET version = :version"

# The entries table as version 2 created it (the upgrade from version 1 makes it so).
_SQLITE_CREATE_ENTRIES_TABLE_V2 = """
    CREATE TABLE fleetcache_entries (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        user_id TEXT NOT NULL,
        value TEXT NOT NULL,
        deps TEXT NOT NULL,
        error TEXT,
        created_at INTEGER,
        alias TEXT,
        diagnostics TEXT,
        expires_at INTEGER,
        stale_until INTEGER,
        compute_ms INTEGER,
        PRIMARY KEY (namespace, name, scope, user_id)
    )
"""

# The entries table now: ``value`` holds the codec's bytes (a BLOB), ``deps`` a JSON array.
# (An upgraded file keeps ``value TEXT`` as declared; a TEXT column stores a BLOB as given.)
_SQLITE_CREATE_ENTRIES_TABLE = """
    CREATE TABLE fleetcache_entries (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        user_id TEXT NOT NULL,
        value BLOB NOT NULL,
        deps TEXT NOT NULL,
        error TEXT,
        created_at INTEGER,
        alias TEXT,
        diagnostics TEXT,
        expires_at INTEGER,
        stale_until INTEGER,
        compute_ms INTEGER,
        codec TEXT NOT NULL,
        PRIMARY KEY (namespace, name, scope, user_id)
    )
"""

_SQLITE_ENTRIES_INDEXES = [
    """
    CREATE INDEX fleetcache_entries_stale_until ON fleetcache_entries (stale_until)
        WHERE stale_until IS NOT NULL
    """,
    # Alias reads within (namespace, scope, user); deletes and closure rounds by alias.
    """
    CREATE INDEX fleetcache_entries_alias
        ON fleetcache_entries (namespace, alias, scope, user_id)
    """,
    # Each entry's deps, one row each (sqlite has no GIN): dependents by (namespace, dep).
    """
    CREATE TABLE fleetcache_entry_deps (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        user_id TEXT NOT NULL,
        dep TEXT NOT NULL,
        PRIMARY KEY (namespace, name, scope, user_id, dep)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX fleetcache_entry_deps_dep ON fleetcache_entry_deps (namespace, dep)",
]

# ------------------------------------------------------------- the table's size (v5)

# One row of counts, kept by row triggers (sqlite has one writer at a time, so one row
# costs no contention). A table with triggers is never emptied by sqlite's truncate
# optimisation, so ``DELETE FROM fleetcache_entries`` is counted too.
_SQLITE_VALUE_LENGTH = "length(CAST({row}.value AS BLOB))"
_SQLITE_CREATE_COUNTS = [
    """
    CREATE TABLE fleetcache_counts (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        entries INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )
    """,
    """
    INSERT INTO fleetcache_counts (singleton, entries, bytes)
    SELECT 1, count(*), coalesce(sum(length(CAST(value AS BLOB))), 0) FROM fleetcache_entries
    """,
    f"""
    CREATE TRIGGER fleetcache_count_insert AFTER INSERT ON fleetcache_entries BEGIN
        UPDATE fleetcache_counts
        SET entries = entries + 1, bytes = bytes + {_SQLITE_VALUE_LENGTH.format(row="new")};
    END
    """,
    f"""
    CREATE TRIGGER fleetcache_count_update AFTER UPDATE OF value ON fleetcache_entries BEGIN
        UPDATE fleetcache_counts
        SET bytes = bytes - {_SQLITE_VALUE_LENGTH.format(row="old")}
                          + {_SQLITE_VALUE_LENGTH.format(row="new")};
    END
    """,
    f"""
    CREATE TRIGGER fleetcache_count_delete AFTER DELETE ON fleetcache_entries BEGIN
        UPDATE fleetcache_counts
        SET entries = entries - 1, bytes = bytes - {_SQLITE_VALUE_LENGTH.format(row="old")};
    END
    """,
    # Eviction reads the least recently written first (sqlite sorts NULL first).
    "CREATE INDEX fleetcache_entries_created_at ON fleetcache_entries (created_at)",
]

#: Version 4 -> 5: the counts (from one count of the file) and the ``created_at`` index.
SQLITE_UPGRADE_5_TO_6 = _SQLITE_CREATE_COUNTS

#: The entries and value bytes the file holds now, from the counts.
SQLITE_TABLE_SIZE = "SELECT entries, bytes FROM fleetcache_counts"

#: The keys of up to ``limit`` least recently written entries (smallest ``created_at``,
#: NULL first) and of every entry depending on them, transitively (deps meeting a doomed
#: entry's name or alias, in its namespace): see ``PG_EVICT`` for why dependents go too.
#: Deleted with ``SQLITE_DELETE_KEY`` in the same transaction.
SQLITE_EVICTION = """
    WITH RECURSIVE doomed (namespace, name, scope, user_id, alias) AS (
        SELECT * FROM (
            SELECT namespace, name, scope, user_id, alias FROM fleetcache_entries
            ORDER BY created_at LIMIT :limit)
        UNION
        SELECT e.namespace, e.name, e.scope, e.user_id, e.alias
        FROM doomed AS d
        JOIN fleetcache_entry_deps AS x
          ON x.namespace = d.namespace AND x.dep IN (d.name, d.alias)
        JOIN fleetcache_entries AS e
          ON e.namespace = x.namespace AND e.name = x.name AND e.scope = x.scope
             AND e.user_id = x.user_id
    )
    SELECT namespace, name, scope, user_id FROM doomed
"""

#: A new file: the latest schema directly.
SQLITE_CREATE_LATEST = [
    """
    CREATE TABLE fleetcache_schema (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        version INTEGER NOT NULL
    )
    """,
    "INSERT INTO fleetcache_schema (singleton, version) VALUES (1, 0)",
    _SQLITE_CREATE_ENTRIES_TABLE,
    *_SQLITE_ENTRIES_INDEXES,
    """
    CREATE TABLE fleetcache_generations (
        kind TEXT NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        marked_at REAL NOT NULL,
        PRIMARY KEY (kind, namespace, name)
    )
    """,
    "CREATE INDEX fleetcache_generations_marked_at ON fleetcache_generations (marked_at)",
    # The invalidation clock: one row, advanced by every invalidation.
    """
    CREATE TABLE fleetcache_clock (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        seq INTEGER NOT NULL
    )
    """,
    "INSERT INTO fleetcache_clock (singleton, seq) VALUES (1, 0)",
    *_SQLITE_CREATE_COUNTS,
]

#: Version 1 -> 2: copy the rows of ``modules`` into ``fleetcache_entries`` (deps kept as
#: a JSON array of their strings, JSON null error/diagnostics as SQL NULL).
SQLITE_COPY_V1_ENTRIES = [
    """
    INSERT OR IGNORE INTO fleetcache_entries (namespace, name, scope, user_id, value, deps,
                                              error, created_at, alias, diagnostics)
    SELECT resolved_realm_url, url, cache_scope, auth_user_id, definitions,
           CASE WHEN json_valid(deps) AND json_type(deps) = 'array'
                THEN (SELECT json_group_array(d.value) FROM json_each(modules.deps) AS d
                      WHERE d.type = 'text')
                ELSE '[]' END,
           NULLIF(error_doc, 'null'), created_at, file_alias, NULLIF(diagnostics, 'null')
    FROM modules
    """,
    """
    INSERT OR IGNORE INTO fleetcache_entry_deps (namespace, name, scope, user_id, dep)
    SELECT e.namespace, e.name, e.scope, e.user_id, d.value
    FROM fleetcache_entries AS e, json_each(e.deps) AS d
    """,
]

#: Version 1 -> 2 (the rest): the entries tables, and a time on every mark (the upgrade's,
#: bound as ``:now``, so a version 1 mark is kept for the whole retention from now).
SQLITE_UPGRADE_1_TO_2 = [
    _SQLITE_CREATE_ENTRIES_TABLE_V2,
    *_SQLITE_ENTRIES_INDEXES,
    "ALTER TABLE fleetcache_generations ADD COLUMN marked_at REAL NOT NULL DEFAULT 0",
    "UPDATE fleetcache_generations SET marked_at = :now",
    "CREATE INDEX fleetcache_generations_marked_at ON fleetcache_generations (marked_at)",
]

#: Version 2 -> 3: every value (already the JSON text it was written as) becomes the
#: bytes of that text, with codec ``json``. (sqlite cannot drop a column default; writers
#: always give the codec.)
SQLITE_UPGRADE_2_TO_3 = [
    "ALTER TABLE fleetcache_entries ADD COLUMN codec TEXT NOT NULL DEFAULT 'json'",
    "UPDATE fleetcache_entries SET value = CAST(value AS BLOB) WHERE typeof(value) = 'text'",
]

# ------------------------------------------------------------------------------- reads

_SQLITE_ROW = (
    "name, value, codec, deps, error, created_at, alias, diagnostics, expires_at, stale_until,"
    " compute_ms"
)

_SQLITE_EXACT = f"""
    SELECT {_SQLITE_ROW} FROM fleetcache_entries
    WHERE namespace = :ns AND name = :name AND scope = :scope AND user_id = :user
"""
# As on Postgres: the exact probe first; the alias probe only runs when it found nothing.
_SQLITE_EXACT_OR_ALIAS = f"""
    SELECT * FROM ({_SQLITE_EXACT})
    UNION ALL
    SELECT * FROM (
        SELECT {_SQLITE_ROW} FROM fleetcache_entries
        WHERE namespace = :ns AND alias = :name AND scope = :scope AND user_id = :user
        ORDER BY created_at IS NULL, created_at DESC
        LIMIT 1)
    LIMIT 1
"""

#: ``read(key)``.
SQLITE_READ = _SQLITE_EXACT
#: ``read(key, by_alias=True)``.
SQLITE_READ_BY_ALIAS = _SQLITE_EXACT_OR_ALIAS

# The clock's reading and the read in one statement, so one read transaction (one
# snapshot of the file) answers both.
_SQLITE_STAMP = """
    SELECT c.seq, e.* FROM fleetcache_clock AS c LEFT JOIN ({read}) AS e ON 1
"""
#: ``stamp_and_read(key, names)``.
SQLITE_STAMP_AND_READ = _SQLITE_STAMP.format(read=_SQLITE_EXACT)
#: ``stamp_and_read(key, names, by_alias=True)``.
SQLITE_STAMP_AND_READ_BY_ALIAS = _SQLITE_STAMP.format(read=_SQLITE_EXACT_OR_ALIAS)

# ------------------------------------------------------------------------------ writes

_SQLITE_INSERT = """
    INSERT INTO fleetcache_entries (namespace, name, scope, user_id, value, codec, deps,
                                    error, created_at, alias, diagnostics, expires_at,
                                    stale_until, compute_ms)
    SELECT :ns, :name, :scope, :user, :value, :codec, :deps, :error, :created_at, :alias,
           :diagnostics, :expires_at, :stale_until, :compute_ms
"""
_SQLITE_UPSERT = """
    ON CONFLICT (namespace, name, scope, user_id) DO UPDATE SET
        value = excluded.value, codec = excluded.codec, deps = excluded.deps,
        error = excluded.error, created_at = excluded.created_at, alias = excluded.alias,
        diagnostics = excluded.diagnostics, expires_at = excluded.expires_at,
        stale_until = excluded.stale_until, compute_ms = excluded.compute_ms
"""

#: Upsert without a stamp. (``WHERE true`` resolves sqlite's INSERT ... SELECT ... ON
#: CONFLICT parsing ambiguity.)
SQLITE_WRITE = _SQLITE_INSERT + " WHERE true " + _SQLITE_UPSERT

#: Upsert under a stamp: only when no mark the write depends on is newer than the stamp's
#: clock reading. Run inside BEGIN IMMEDIATE, which serialises it with every invalidation.
SQLITE_GUARDED_WRITE = f"""
    {_SQLITE_INSERT}
    WHERE NOT EXISTS (
        SELECT 1 FROM fleetcache_generations
        WHERE ((kind = 'g' AND namespace = '' AND name = '')
               OR (kind = 'n' AND namespace = :ns AND name = '')
               OR (kind = 'k' AND namespace = :ns
                   AND name IN (SELECT value FROM json_each(:names))))
          AND seq > :point)
    {_SQLITE_UPSERT}
"""

#: The deps rows of one key go before its new deps are listed (after an upsert).
SQLITE_FORGET_DEPS = """
    DELETE FROM fleetcache_entry_deps
    WHERE namespace = :ns AND name = :name AND scope = :scope AND user_id = :user
"""
#: Lists one key's deps.
SQLITE_LIST_DEPS = """
    INSERT OR IGNORE INTO fleetcache_entry_deps (namespace, name, scope, user_id, dep)
    SELECT :ns, :name, :scope, :user, value FROM json_each(:deps)
"""

#: The keys of up to ``limit`` entries whose stale window ended before ``before`` (ms).
SQLITE_EXPIRED = """
    SELECT namespace, name, scope, user_id FROM fleetcache_entries
    WHERE stale_until < :before LIMIT :limit
"""
#: Deletes one key's entry and its deps rows (a purge of a dead entry, not an invalidation).
SQLITE_DELETE_KEY = [
    """
    DELETE FROM fleetcache_entry_deps
    WHERE namespace = :ns AND name = :name AND scope = :scope AND user_id = :user
    """,
    """
    DELETE FROM fleetcache_entries
    WHERE namespace = :ns AND name = :name AND scope = :scope AND user_id = :user
    """,
]

# ----------------------------------------------------------------------- invalidations

#: One round of the closure: names and aliases of the entries of the namespace named or
#: aliased by one of the names, and names of the entries whose deps meet them (their
#: aliases come in the next round, as entries named by a name of the closure).
SQLITE_CLOSURE_ROUND = """
    SELECT name, alias FROM fleetcache_entries
    WHERE namespace = :ns AND name IN (SELECT value FROM json_each(:names))
    UNION
    SELECT name, alias FROM fleetcache_entries
    WHERE namespace = :ns AND alias IN (SELECT value FROM json_each(:names))
    UNION
    SELECT name, NULL FROM fleetcache_entry_deps
    WHERE namespace = :ns AND dep IN (SELECT value FROM json_each(:names))
"""

#: Advances the invalidation clock (once per invalidating transaction, before its marks).
SQLITE_TICK = "UPDATE fleetcache_clock SET seq = seq + 1"

#: Deletes up to ``limit`` marks older than ``cutoff`` (seconds since the epoch).
SQLITE_PRUNE_MARKS = """
    DELETE FROM fleetcache_generations
    WHERE rowid IN (SELECT rowid FROM fleetcache_generations
                    WHERE marked_at < :cutoff LIMIT :limit)
"""

#: Marks (kind, namespace, name) for each name of the JSON array ``names`` at the clock's
#: current reading and ``now``.
SQLITE_MARK = """
    INSERT INTO fleetcache_generations (kind, namespace, name, seq, marked_at)
    SELECT :kind, :ns, value, (SELECT seq FROM fleetcache_clock), :now
    FROM json_each(:names) WHERE true
    ON CONFLICT (kind, namespace, name) DO UPDATE SET
        seq = excluded.seq, marked_at = excluded.marked_at
"""

#: The deps rows, then the entries, of the namespace named or aliased by the names. (The
#: deps rows of an aliased entry are found through its name, an index probe, then matched
#: on scope and user; a row-value IN over the four fields would scan the deps table.)
SQLITE_DELETE_NAMES = [
    """
    DELETE FROM fleetcache_entry_deps
    WHERE namespace = :ns
      AND (name IN (SELECT value FROM json_each(:names))
           OR (name IN (SELECT name FROM fleetcache_entries
                        WHERE namespace = :ns
                          AND alias IN (SELECT value FROM json_each(:names)))
               AND EXISTS (SELECT 1 FROM fleetcache_entries AS e
                           WHERE e.namespace = fleetcache_entry_deps.namespace
                             AND e.name = fleetcache_entry_deps.name
                             AND e.scope = fleetcache_entry_deps.scope
                             AND e.user_id = fleetcache_entry_deps.user_id
                             AND e.alias IN (SELECT value FROM json_each(:names)))))
    """,
    """
    DELETE FROM fleetcache_entries
    WHERE namespace = :ns
      AND (name IN (SELECT value FROM json_each(:names))
           OR alias IN (SELECT value FROM json_each(:names)))
    """,
]
#: Every entry of a namespace, with its deps rows.
SQLITE_DELETE_NAMESPACE = [
    "DELETE FROM fleetcache_entry_deps WHERE namespace = :ns",
    "DELETE FROM fleetcache_entries WHERE namespace = :ns",
]
#: Every entry.
SQLITE_DELETE_ALL = ["DELETE FROM fleetcache_entry_deps", "DELETE FROM fleetcache_entries"]

# =========================================================== inspection (read-only)
# What ``fleetcache.inspection`` reads: the table's shape, the marks, and on Postgres the
# advisory locks and backends right now. Every statement here only reads (inspection runs
# them in a READ ONLY transaction); ``purge`` goes through the stores' own purge_expired.
# States of an entry at ``now`` (ms, the inspecting process's clock, as the fleet's own
# readers judge it; see fleetcache.lookup.expiry): fresh (no expiry, or now < expires_at),
# stale (expires_at <= now < stale_until: served while one refresh runs) and dead (past its
# stale window: a miss, purged in passing).

_INSPECT_STATES = """
    count(*) FILTER (WHERE expires_at IS NULL),
    count(*) FILTER (WHERE expires_at > {now}),
    count(*) FILTER (WHERE expires_at <= {now} AND stale_until > {now}),
    count(*) FILTER (WHERE expires_at <= {now} AND (stale_until IS NULL OR stale_until <= {now})),
    count(*) FILTER (WHERE error IS NOT NULL)
"""

# ---------------------------------------------------------------------------- Postgres

#: The type of ``fleetcache_entries.value`` (``jsonb`` in schema version 2), which decides
#: how a value's size is read.
PG_INSPECT_VALUE_TYPE = """
    SELECT format_type(atttypid, NULL) FROM pg_attribute
    WHERE attrelid = to_regclass('fleetcache_entries') AND attname = 'value'
      AND NOT attisdropped
"""
# A value's size in bytes: octet_length of a text or bytea column as stored; a jsonb value
# is measured as its text (the server's rendering of it). Keyed by PG_INSPECT_VALUE_TYPE's
# answer ("jsonb", anything else "octets").
_PG_VALUE_BYTES = {"jsonb": "octet_length(value::text)", "octets": "octet_length(value)"}

_PG_INSPECT_TOTALS = f"""
    SELECT count(*), coalesce(sum({{value_bytes}}), 0)::bigint, count(DISTINCT namespace),
           min(created_at), max(created_at),
           {_INSPECT_STATES.format(now="%(now)s")},
           pg_total_relation_size('fleetcache_entries'),
           current_setting('server_version')
    FROM fleetcache_entries
"""
#: Entries, value bytes, namespaces, oldest and newest created_at, the states at
#: ``now`` (no expiry, fresh with an expiry, stale, dead, errors), the table's size on
#: disk (heap, TOAST and indexes) and the server's version.
PG_INSPECT_TOTALS = {
    kind: _PG_INSPECT_TOTALS.format(value_bytes=size) for kind, size in _PG_VALUE_BYTES.items()
}

_PG_INSPECT_NAMESPACES = """
    SELECT namespace, count(*), coalesce(sum({value_bytes}), 0)::bigint,
           count(*) FILTER (WHERE expires_at <= %(now)s AND stale_until > %(now)s),
           count(*) FILTER (WHERE expires_at <= %(now)s
                            AND (stale_until IS NULL OR stale_until <= %(now)s))
    FROM fleetcache_entries
    GROUP BY namespace
    ORDER BY 2 DESC, 3 DESC, namespace COLLATE "C"
    LIMIT %(top)s
"""
#: The ``top`` namespaces by entries (then bytes): entries, value bytes, stale, dead.
PG_INSPECT_NAMESPACES = {
    kind: _PG_INSPECT_NAMESPACES.format(value_bytes=size) for kind, size in _PG_VALUE_BYTES.items()
}

#: Marks by kind ('g' global, 'n' namespace, 'k' name): how many, and the ages (seconds,
#: by the server's clock, which set them) of the oldest and the newest.
PG_INSPECT_MARKS = """
    SELECT kind::text, count(*),
           extract(epoch FROM statement_timestamp() - min(marked_at))::float8,
           extract(epoch FROM statement_timestamp() - max(marked_at))::float8
    FROM fleetcache_generations
    GROUP BY kind
    ORDER BY kind
"""

#: Every namespace an entry or a mark names (to name the namespace of a namespace lock).
PG_INSPECT_KNOWN_NAMESPACES = """
    SELECT DISTINCT namespace FROM fleetcache_entries
    UNION
    SELECT namespace FROM fleetcache_generations WHERE kind <> 'g'
"""

#: fleetcache's advisory locks in this database, held or awaited: the store's two-int
#: locks (objsubid 2, first int one of ``classes``: schema, global, namespace) and the
#: coordinator's one-bigint key locks (objsubid 1) of sessions whose application_name
#: starts with ``prefix`` (the key space is shared with any application's bigint locks, so
#: the holder tells whose a lock is). With each: the backend, its state, how long its
#: current statement has run (a waiter: how long it has waited), and a waiter's blockers.
PG_INSPECT_LOCKS = """
    SELECT l.objsubid::int, l.classid::bigint, l.objid::bigint, l.mode, l.granted, l.pid,
           a.application_name, a.state, a.client_addr::text,
           extract(epoch FROM statement_timestamp() - a.query_start)::float8,
           CASE WHEN l.granted THEN NULL ELSE pg_blocking_pids(l.pid) END
    FROM pg_locks AS l
    LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((l.objsubid = 2 AND l.classid::bigint = ANY (%(classes)s::bigint[]))
           OR (l.objsubid = 1 AND starts_with(a.application_name, %(prefix)s)))
    ORDER BY l.granted DESC, l.objsubid DESC, l.classid::bigint, l.objid::bigint, l.pid
"""

#: The client backends of this database but this one, by application_name: how many, how
#: many active, idle, idle in a transaction, and waiting for a lock (of any kind).
PG_INSPECT_CONNECTIONS = """
    SELECT coalesce(application_name, ''), count(*),
           count(*) FILTER (WHERE state = 'active'),
           count(*) FILTER (WHERE state = 'idle'),
           count(*) FILTER (WHERE state IN ('idle in transaction',
                                            'idle in transaction (aborted)')),
           count(*) FILTER (WHERE wait_event_type = 'Lock')
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND backend_type = 'client backend'
    GROUP BY 1
    ORDER BY 2 DESC, 1
"""

#: The server's connection budget: client backends of every database, and max_connections.
PG_INSPECT_SERVER_CONNECTIONS = """
    SELECT count(*) FILTER (WHERE backend_type = 'client backend'),
           current_setting('max_connections')::int
    FROM pg_stat_activity
"""

# ------------------------------------------------------------------------------ sqlite

# A value's size in bytes: a TEXT value as its UTF-8 bytes, a BLOB as it is.
_SQLITE_VALUE_BYTES = "length(CAST(value AS BLOB))"

#: As PG_INSPECT_TOTALS, with the file's size (every table: page_count * page_size) and
#: sqlite's version.
SQLITE_INSPECT_TOTALS = f"""
    SELECT count(*), coalesce(sum({_SQLITE_VALUE_BYTES}), 0), count(DISTINCT namespace),
           min(created_at), max(created_at),
           {_INSPECT_STATES.format(now=":now")},
           (SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()),
           sqlite_version()
    FROM fleetcache_entries
"""

#: As PG_INSPECT_NAMESPACES.
SQLITE_INSPECT_NAMESPACES = f"""
    SELECT namespace, count(*), coalesce(sum({_SQLITE_VALUE_BYTES}), 0),
           count(*) FILTER (WHERE expires_at <= :now AND stale_until > :now),
           count(*) FILTER (WHERE expires_at <= :now
                            AND (stale_until IS NULL OR stale_until <= :now))
    FROM fleetcache_entries
    GROUP BY namespace
    ORDER BY 2 DESC, 3 DESC, namespace
    LIMIT :top
"""

#: As PG_INSPECT_MARKS, with ages by ``now_s`` (seconds; the marking processes' clocks).
SQLITE_INSPECT_MARKS = """
    SELECT kind, count(*), :now_s - min(marked_at), :now_s - max(marked_at)
    FROM fleetcache_generations
    GROUP BY kind
    ORDER BY kind
"""
