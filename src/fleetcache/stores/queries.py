"""Every SQL statement the stores run, named and commented, in one place.

Values are always bound as parameters (``%(name)s`` for psycopg, ``:name`` for sqlite3);
nothing here is ever formatted with a value.

The entries table is the seed's ``modules`` table: ``resolved_realm_url`` is the namespace,
``url`` the name, ``cache_scope`` the scope, ``auth_user_id`` the user, ``definitions`` the
value, ``error_doc`` the error and ``file_alias`` the alias.

Generation marks live in ``fleetcache_generations``: kind ``g`` (one global row), ``n``
(one per namespace) and ``k`` (one per name within a namespace), each saying when it was
last invalidated. On Postgres that is the invalidating transaction's id (``bumped_by``,
``xid8``) and a populate's stamp is a snapshot (``pg_current_snapshot()``): a write is
refused if any mark it depends on was set by a transaction that snapshot does not see as
committed. On sqlite it is a reading of a one-row invalidation clock, and a write is
refused if any mark it depends on is newer than the stamp's reading.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# --------------------------------------------------------------------------- Postgres

#: Serialises concurrent schema creation by several processes (an advisory lock id).
PG_SCHEMA_LOCK_ID = 0x466C_6565_7443_6163  # "fleetCac"

PG_CREATE_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS fleetcache_schema (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version integer NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS modules (
        url text NOT NULL,
        cache_scope text NOT NULL,
        auth_user_id text NOT NULL DEFAULT '',
        resolved_realm_url text NOT NULL,
        definitions jsonb NOT NULL,
        deps jsonb NOT NULL DEFAULT '[]'::jsonb,
        error_doc jsonb,
        created_at bigint,
        file_alias text,
        diagnostics jsonb
    )
    """,
    # The key. md5() keeps long URLs within btree limits. Unlike the seed it includes the
    # namespace, so the generic cache may reuse a name in two namespaces.
    """
    CREATE UNIQUE INDEX IF NOT EXISTS modules_key
        ON modules (md5(resolved_realm_url), md5(url), cache_scope, auth_user_id)
    """,
    "CREATE INDEX IF NOT EXISTS modules_resolved_realm_url ON modules (resolved_realm_url)",
    "CREATE INDEX IF NOT EXISTS modules_file_alias ON modules (file_alias)",
    "CREATE INDEX IF NOT EXISTS modules_deps ON modules USING gin (deps)",
    """
    CREATE TABLE IF NOT EXISTS fleetcache_generations (
        kind "char" NOT NULL,
        namespace text NOT NULL,
        name text NOT NULL,
        bumped_by xid8 NOT NULL
    )
    """,
    """
    CREATE UNIQUE INDEX IF NOT EXISTS fleetcache_generations_key
        ON fleetcache_generations (kind, md5(namespace), md5(name))
    """,
]

#: Taken around schema creation: concurrent CREATE ... IF NOT EXISTS can still collide.
PG_LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(%(id)s)"
#: The schema version this database holds (one row).
PG_GET_SCHEMA_VERSION = "SELECT version FROM fleetcache_schema"
#: Records the schema version on a new database (an existing row is kept).
PG_SET_SCHEMA_VERSION = (
    "INSERT INTO fleetcache_schema (version) VALUES (%(version)s) ON CONFLICT DO NOTHING"
)

_PG_COLUMNS = (
    "url, cache_scope, auth_user_id, resolved_realm_url, definitions, deps, "
    "error_doc, created_at, file_alias, diagnostics"
)

#: One entry by name or alias within (namespace, scope, user); an exact name wins.
PG_READ = f"""
    SELECT {_PG_COLUMNS} FROM modules
    WHERE md5(resolved_realm_url) = md5(%(ns)s) AND resolved_realm_url = %(ns)s
      AND cache_scope = %(scope)s AND auth_user_id = %(user)s
      AND ((md5(url) = md5(%(name)s) AND url = %(name)s) OR file_alias = %(name)s)
    ORDER BY url = %(name)s DESC
    LIMIT 1
"""

#: The marks a write depends on: the global one, its namespace's, and its names'.
_PG_MARKS = """
    (kind = 'g' AND md5(namespace) = md5('') AND md5(name) = md5(''))
    OR (kind = 'n' AND md5(namespace) = md5(%(ns)s) AND md5(name) = md5('')
        AND namespace = %(ns)s)
    OR (kind = 'k' AND md5(namespace) = md5(%(ns)s)
        AND md5(name) = ANY (ARRAY(SELECT md5(n) FROM unnest(%(names)s::text[]) AS n))
        AND namespace = %(ns)s AND name = ANY (%(names)s::text[]))
"""

#: The stamp a populate takes before it reads: a snapshot of which transactions committed.
PG_STAMP = "SELECT pg_current_snapshot()::text"

#: Share-locks the marks a write depends on (global, namespace, then names, in the
#: caller's sorted order) until the transaction ends. Invalidations take the same locks
#: in the same order, exclusively for what they bump, so a write and an invalidation of
#: the same thing serialise: whichever commits second sees the first.
PG_LOCK_SHARED = """
    SELECT count(pg_advisory_xact_lock_shared(c, i))
    FROM unnest(%(classes)s::int[], %(ids)s::int[]) AS l(c, i)
"""
PG_LOCK_EXCLUSIVE = """
    SELECT count(pg_advisory_xact_lock(c, i))
    FROM unnest(%(classes)s::int[], %(ids)s::int[]) AS l(c, i)
"""

#: Upsert an entry; with a stamp, only when no mark it depends on was set by a transaction
#: the stamp's snapshot did not see committed (run after PG_LOCK_SHARED, so any such
#: transaction has finished by now).
PG_WRITE = f"""
    INSERT INTO modules ({_PG_COLUMNS})
    SELECT %(name)s, %(scope)s, %(user)s, %(ns)s, %(value)s::jsonb, %(deps)s::jsonb,
           %(error)s::jsonb, %(created_at)s, %(alias)s, %(diagnostics)s::jsonb
    WHERE %(unconditional)s
       OR NOT EXISTS (
           SELECT 1 FROM fleetcache_generations
           WHERE ({_PG_MARKS})
             AND NOT pg_visible_in_snapshot(bumped_by, %(point)s::pg_snapshot))
    ON CONFLICT (md5(resolved_realm_url), md5(url), cache_scope, auth_user_id) DO UPDATE SET
        definitions = EXCLUDED.definitions, deps = EXCLUDED.deps,
        error_doc = EXCLUDED.error_doc, created_at = EXCLUDED.created_at,
        file_alias = EXCLUDED.file_alias, diagnostics = EXCLUDED.diagnostics
    RETURNING 1
"""

#: Mark each (kind, namespace, name) given as invalidated by this transaction.
PG_BUMP = """
    INSERT INTO fleetcache_generations (kind, namespace, name, bumped_by)
    SELECT k, n, m, pg_current_xact_id()
    FROM unnest(%(kinds)s::"char"[], %(nss)s::text[], %(names)s::text[]) AS b(k, n, m)
    ON CONFLICT (kind, md5(namespace), md5(name))
    DO UPDATE SET bumped_by = EXCLUDED.bumped_by
"""

#: The entries of a namespace named or aliased by any of the names (all scopes and users).
PG_DELETE_NAMES = """
    DELETE FROM modules
    WHERE resolved_realm_url = %(ns)s
      AND (url = ANY (%(names)s::text[]) OR file_alias = ANY (%(names)s::text[]))
"""
#: Every entry of a namespace.
PG_DELETE_NAMESPACE = "DELETE FROM modules WHERE resolved_realm_url = %(ns)s"
#: Every entry.
PG_DELETE_ALL = "DELETE FROM modules"

#: Names of the entries in a namespace whose deps array holds any of the names.
PG_FIND_DEPENDENTS = """
    SELECT DISTINCT url FROM modules
    WHERE resolved_realm_url = %(ns)s AND deps ?| %(names)s::text[]
    ORDER BY url
"""

# ----------------------------------------------------------------------------- sqlite

SQLITE_CREATE_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS fleetcache_schema (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        version INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS modules (
        url TEXT NOT NULL,
        cache_scope TEXT NOT NULL,
        auth_user_id TEXT NOT NULL DEFAULT '',
        resolved_realm_url TEXT NOT NULL,
        definitions TEXT NOT NULL,
        deps TEXT NOT NULL DEFAULT '[]',
        error_doc TEXT,
        created_at INTEGER,
        file_alias TEXT,
        diagnostics TEXT,
        PRIMARY KEY (resolved_realm_url, url, cache_scope, auth_user_id)
    )
    """,
    "CREATE INDEX IF NOT EXISTS modules_file_alias ON modules (resolved_realm_url, file_alias)",
    """
    CREATE TABLE IF NOT EXISTS fleetcache_generations (
        kind TEXT NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (kind, namespace, name)
    )
    """,
    # The invalidation clock: one row, advanced by every invalidation.
    """
    CREATE TABLE IF NOT EXISTS fleetcache_clock (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        seq INTEGER NOT NULL
    )
    """,
    "INSERT INTO fleetcache_clock (singleton, seq) VALUES (1, 0) ON CONFLICT DO NOTHING",
]

#: The schema version this file holds (one row).
SQLITE_GET_SCHEMA_VERSION = "SELECT version FROM fleetcache_schema"
#: Records the schema version on a new file (an existing row is kept).
SQLITE_SET_SCHEMA_VERSION = (
    "INSERT INTO fleetcache_schema (singleton, version) VALUES (1, :version) ON CONFLICT DO NOTHING"
)

#: One entry by name or alias within (namespace, scope, user); an exact name wins.
SQLITE_READ = f"""
    SELECT {_PG_COLUMNS} FROM modules
    WHERE resolved_realm_url = :ns AND cache_scope = :scope AND auth_user_id = :user
      AND (url = :name OR file_alias = :name)
    ORDER BY url = :name DESC
    LIMIT 1
"""

#: The stamp a populate takes before it reads: the invalidation clock's reading.
SQLITE_STAMP = "SELECT seq FROM fleetcache_clock"

#: Upsert an entry; with a stamp, only when no mark it depends on is newer than it. Run
#: inside BEGIN IMMEDIATE, which serialises it with every invalidation of the file.
SQLITE_WRITE = f"""
    INSERT INTO modules ({_PG_COLUMNS})
    SELECT :name, :scope, :user, :ns, :value, :deps, :error, :created_at, :alias, :diagnostics
    WHERE :unconditional OR NOT EXISTS (
        SELECT 1 FROM fleetcache_generations
        WHERE ((kind = 'g' AND namespace = '' AND name = '')
               OR (kind = 'n' AND namespace = :ns AND name = '')
               OR (kind = 'k' AND namespace = :ns
                   AND name IN (SELECT value FROM json_each(:names))))
          AND seq > :point)
    ON CONFLICT (resolved_realm_url, url, cache_scope, auth_user_id) DO UPDATE SET
        definitions = excluded.definitions, deps = excluded.deps,
        error_doc = excluded.error_doc, created_at = excluded.created_at,
        file_alias = excluded.file_alias, diagnostics = excluded.diagnostics
"""

#: Advances the invalidation clock (once per invalidating transaction, before its marks).
SQLITE_TICK = "UPDATE fleetcache_clock SET seq = seq + 1"

#: Marks one (kind, namespace, name) as invalidated at the clock's current reading.
SQLITE_BUMP = """
    INSERT INTO fleetcache_generations (kind, namespace, name, seq)
    VALUES (:kind, :ns, :name, (SELECT seq FROM fleetcache_clock))
    ON CONFLICT (kind, namespace, name) DO UPDATE SET seq = excluded.seq
"""

#: The entries of a namespace named or aliased by any of the names (all scopes and users).
SQLITE_DELETE_NAMES = """
    DELETE FROM modules
    WHERE resolved_realm_url = :ns
      AND (url IN (SELECT value FROM json_each(:names))
           OR file_alias IN (SELECT value FROM json_each(:names)))
"""
#: Every entry of a namespace.
SQLITE_DELETE_NAMESPACE = "DELETE FROM modules WHERE resolved_realm_url = :ns"
#: Every entry.
SQLITE_DELETE_ALL = "DELETE FROM modules"

#: Names of the entries in a namespace whose deps array holds any of the names.
SQLITE_FIND_DEPENDENTS = """
    SELECT DISTINCT m.url FROM modules AS m, json_each(m.deps) AS d
    WHERE m.resolved_realm_url = :ns AND d.value IN (SELECT value FROM json_each(:names))
    ORDER BY m.url
"""
