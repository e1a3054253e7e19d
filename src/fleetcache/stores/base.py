"""The store contract: what every backend (memory, sqlite, Postgres) provides.

A store keeps *entries* under a key ``(namespace, name, scope, user)`` and, beside them,
*generation marks* (one global, one per namespace, one per name) that every deletion
sets, in the same transaction as the delete, to "invalidated now". A populate takes a
:class:`GenerationStamp` (a point in that history) before it reads, and its write succeeds
only if nothing it depends on — its names, the entry's deps, the namespace, the store — was
invalidated after that point: that is how a store refuses a stale write even when the
invalidation came from another process, or hit a dependency of an entry not yet stored
(guarantee 3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fleetcache.errors import SerializationError

#: A JSON document as Python sees it (dict, list, str, int, float, bool or None).
JSON = Any


@dataclass(frozen=True, slots=True)
class Key:
    """Where an entry lives: ``namespace`` (e.g. a realm URL), ``name`` (e.g. a module URL),
    ``scope`` (e.g. ``public``) and ``user`` (``""`` when the entry is not per user)."""

    namespace: str
    name: str
    scope: str = "public"
    user: str = ""

    @property
    def coalesce_key(self) -> str:
        """The in-flight key, ``namespace|name|scope|user``."""
        return f"{self.namespace}|{self.name}|{self.scope}|{self.user}"

    def with_name(self, name: str) -> Key:
        """The same key with another name (a candidate)."""
        return Key(self.namespace, name, self.scope, self.user)


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached artifact. ``error`` is a JSON error document, or None for a success;
    ``created_at`` is milliseconds since the epoch; ``alias`` is another name the entry
    answers to (in the seed: the URL without its extension)."""

    key: Key
    value: JSON
    deps: tuple[str, ...] = ()
    error: JSON | None = None
    created_at: int | None = None
    alias: str | None = None
    diagnostics: JSON | None = None


@dataclass(frozen=True, slots=True)
class GenerationStamp:
    """A point in a store's invalidation history, taken before a populate reads.

    ``names`` are what the populate is about (its key, candidates and alias). A write under
    the stamp is refused if, after ``point``, any of those names, any of the written entry's
    deps, the namespace or the whole store was invalidated. ``point`` is opaque: a
    Postgres snapshot, or a sqlite / in-memory invalidation clock reading.
    """

    namespace: str
    names: tuple[str, ...]
    point: int | str


@runtime_checkable
class Store(Protocol):
    """The contract every backend passes (``tests/test_store_contract.py``).

    ``session`` is an opaque handle a coordinator may pass so that a populate runs on the
    connection that holds its lock (the Postgres store accepts its own connection there;
    the other stores ignore it).
    """

    async def open(self) -> None:
        """Connect and create the schema if needed. Idempotent."""

    async def close(self) -> None:
        """Release what ``open`` acquired (never a pool the caller passed in). Idempotent."""

    async def read(self, key: Key, *, session: object | None = None) -> Entry | None:
        """The entry named ``key.name`` or aliased ``key.name`` within the key's namespace,
        scope and user; an exact name match wins over an alias match."""

    async def stamp(
        self, namespace: str, names: Sequence[str], *, session: object | None = None
    ) -> GenerationStamp:
        """Now, as a point in the invalidation history, for a populate of ``names``."""

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        session: object | None = None,
    ) -> bool:
        """Upsert ``entry``. With a ``stamp``, write only if nothing it depends on (the
        stamp's names, the entry's deps, the namespace, the store) was invalidated since
        the stamp; return False (and write nothing) when something was."""

    async def delete_names(self, namespace: str, names: Sequence[str]) -> None:
        """Delete every entry of ``namespace`` (all scopes and users) whose name or alias is
        in ``names``, and bump each name's counter, in one transaction."""

    async def delete_namespace(self, namespace: str) -> None:
        """Delete every entry of ``namespace`` and bump its counter, in one transaction."""

    async def delete_all(self) -> None:
        """Delete every entry and bump the global counter, in one transaction."""

    async def find_dependents(self, namespace: str, names: Sequence[str]) -> list[str]:
        """Names of the entries of ``namespace`` whose deps contain any of ``names``."""


def to_json(what: str, value: JSON) -> str:
    """Serialise ``value`` as compact JSON or raise :class:`SerializationError` naming it."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{what} is not JSON-serialisable: {exc}") from exc


def guarded_names(entry: Entry, stamp: GenerationStamp) -> list[str]:
    """The names whose invalidation refuses a write: the stamp's and the entry's deps."""
    return sorted({*stamp.names, *entry.deps})


def write_params(entry: Entry, stamp: GenerationStamp | None) -> dict[str, Any]:
    """The bind parameters of a store's guarded write (``PG_WRITE``/``SQLITE_WRITE``): the
    entry's columns as JSON text, and the stamp to check (``names`` as a list; the sqlite
    store re-encodes it as JSON)."""
    key = entry.key
    return {
        "name": key.name,
        "scope": key.scope,
        "user": key.user,
        "ns": key.namespace,
        "value": to_json("value", entry.value),
        "deps": to_json("deps", list(entry.deps)),
        "error": None if entry.error is None else to_json("error", entry.error),
        "created_at": entry.created_at,
        "alias": entry.alias,
        "diagnostics": (
            None if entry.diagnostics is None else to_json("diagnostics", entry.diagnostics)
        ),
        "unconditional": stamp is None,
        "names": guarded_names(entry, stamp) if stamp else [],
        "point": stamp.point if stamp else None,
    }


def validate_entry(entry: Entry) -> None:
    """Raise :class:`SerializationError` unless every JSON part of ``entry`` serialises."""
    to_json(f"value of {entry.key.coalesce_key!r}", entry.value)
    if entry.error is not None:
        to_json(f"error of {entry.key.coalesce_key!r}", entry.error)
    if entry.diagnostics is not None:
        to_json(f"diagnostics of {entry.key.coalesce_key!r}", entry.diagnostics)
    if not all(isinstance(dep, str) for dep in entry.deps):
        raise SerializationError(f"deps of {entry.key.coalesce_key!r} must all be strings")


def stamp_names(names: Sequence[str]) -> tuple[str, ...]:
    """The canonical (sorted, unique) form of a stamp's names."""
    return tuple(sorted(set(names)))
