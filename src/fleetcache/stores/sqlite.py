"""The sqlite store: the embedded default; one file, WAL mode, shareable by processes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from fleetcache.errors import NotOpenError, SchemaVersionError, StoreError
from fleetcache.stores import queries as q
from fleetcache.stores.base import (
    Entry,
    GenerationStamp,
    Key,
    stamp_names,
    validate_entry,
    write_params,
)

T = TypeVar("T")


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class SqliteStore:
    """A :class:`~fleetcache.stores.base.Store` in a sqlite file.

    All sqlite calls run on one worker thread owned by the store, so the event loop never
    blocks on disk. Writes and invalidations use ``BEGIN IMMEDIATE``, which serialises them
    across every process sharing the file; that is what makes a stamped write exact.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self._path = str(path)
        self._busy_timeout = busy_timeout
        # Touched only on the worker thread (opened there, used there, closed there).
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor = self._executor
        if executor is None:
            raise NotOpenError("SqliteStore is not open: call await store.open() first")

        def call() -> T:
            assert self._conn is not None
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise StoreError(f"{what} failed: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def open(self) -> None:
        """Open the file (creating it and the schema if needed) in WAL mode."""
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetcache-sqlite")
        self._executor = executor

        def connect() -> int | None:
            try:
                conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
                self._conn = conn
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                for statement in q.SQLITE_CREATE_SCHEMA:
                    conn.execute(statement)
                conn.execute(q.SQLITE_SET_SCHEMA_VERSION, {"version": q.SCHEMA_VERSION})
                row = conn.execute(q.SQLITE_GET_SCHEMA_VERSION).fetchone()
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"opening sqlite store {self._path!r} failed: {exc}") from exc
            return None if row is None else int(row[0])

        try:
            version = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except StoreError:
            await self.close()
            raise
        if version != q.SCHEMA_VERSION:
            await self.close()
            raise SchemaVersionError(
                f"{self._path}: schema version is {version}, this fleetcache knows "
                f"{q.SCHEMA_VERSION}; upgrade fleetcache"
            )

    async def close(self) -> None:
        """Close the file and stop the worker thread."""
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def disconnect() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, disconnect)
        executor.shutdown(wait=True)

    async def read(self, key: Key, *, session: object | None = None) -> Entry | None:
        """The entry named or aliased ``key.name`` under the key's namespace, scope and user."""
        params = {"ns": key.namespace, "scope": key.scope, "user": key.user, "name": key.name}

        def read(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(q.SQLITE_READ, params).fetchone()
            if row is None:
                return None
            url, scope, user, ns, value, deps, error, created_at, alias, diagnostics = row
            return Entry(
                key=Key(ns, url, scope, user),
                value=json.loads(value),
                deps=tuple(json.loads(deps)),
                error=_loads(error),
                created_at=created_at,
                alias=alias,
                diagnostics=_loads(diagnostics),
            )

        return await self._run(f"reading {key.coalesce_key!r}", read)

    async def stamp(
        self, namespace: str, names: Sequence[str], *, session: object | None = None
    ) -> GenerationStamp:
        """Now, as a reading of the file's invalidation clock."""

        def stamp(conn: sqlite3.Connection) -> int:
            return int(conn.execute(q.SQLITE_STAMP).fetchone()[0])

        point = await self._run(f"stamping {namespace!r}", stamp)
        return GenerationStamp(namespace, stamp_names(names), point)

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        session: object | None = None,
    ) -> bool:
        """Upsert ``entry``; with ``stamp``, only if nothing it depends on was invalidated
        since."""
        validate_entry(entry)
        key = entry.key
        params = write_params(entry, stamp)
        params["names"] = json.dumps(params["names"])

        def write(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            written = conn.execute(q.SQLITE_WRITE, params).rowcount > 0
            conn.execute("COMMIT")
            return written

        return await self._run(f"writing {key.coalesce_key!r}", write)

    async def _bump_and_delete(
        self, what: str, bumps: list[dict[str, str]], delete: str, params: dict[str, str]
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(q.SQLITE_TICK)
            conn.executemany(q.SQLITE_BUMP, bumps)
            conn.execute(delete, params)
            conn.execute("COMMIT")

        await self._run(what, run)

    async def delete_names(self, namespace: str, names: Sequence[str]) -> None:
        """Bump each name's counter and delete the entries named or aliased by ``names``."""
        unique = sorted(set(names))
        if not unique:
            return
        await self._bump_and_delete(
            f"invalidating names in {namespace!r}",
            [{"kind": "k", "ns": namespace, "name": name} for name in unique],
            q.SQLITE_DELETE_NAMES,
            {"ns": namespace, "names": json.dumps(unique)},
        )

    async def delete_namespace(self, namespace: str) -> None:
        """Bump the namespace's counter and delete its entries."""
        await self._bump_and_delete(
            f"clearing namespace {namespace!r}",
            [{"kind": "n", "ns": namespace, "name": ""}],
            q.SQLITE_DELETE_NAMESPACE,
            {"ns": namespace},
        )

    async def delete_all(self) -> None:
        """Bump the global counter and delete every entry."""
        await self._bump_and_delete(
            "clearing the whole cache",
            [{"kind": "g", "ns": "", "name": ""}],
            q.SQLITE_DELETE_ALL,
            {},
        )

    async def find_dependents(self, namespace: str, names: Sequence[str]) -> list[str]:
        """Names of entries of ``namespace`` whose deps meet ``names``."""
        if not names:
            return []
        params = {"ns": namespace, "names": json.dumps(sorted(set(names)))}

        def find(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute(q.SQLITE_FIND_DEPENDENTS, params)]

        return await self._run(f"finding dependents in {namespace!r}", find)
