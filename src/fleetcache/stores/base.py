"""The store contract every backend passes (memory, sqlite, Postgres): entries under a key,
and beside them *marks* saying when a name, a namespace or the store was last invalidated,
against which a write under a :class:`GenerationStamp` is checked in its own transaction.
The arguments for the closure and for pruning marks are in ``docs/design.md``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fleetcache._json import compact

if TYPE_CHECKING:
    from fleetcache.stores.codecs import ValueCodec

#: A JSON document as Python sees it (dict, list, str, int, float, bool or None).
JSON = Any

#: Expands a name into every name its entries may be stored or depended on under,
#: itself included (e.g. with and without a file extension). Pure and thread-safe: the
#: sqlite store calls it on its worker thread.
Expand = Callable[[str], Iterable[str]]

#: How long (seconds) a mark is kept. Every process sharing a store must agree on it.
MARK_RETENTION = 3600.0
#: The oldest stamp (seconds) a write may carry; older ones are refused. Half the
#: retention, so no mark that could refuse a write is ever pruned before that write.
MAX_STAMP_AGE = MARK_RETENTION / 2


@dataclass(frozen=True, slots=True)
class Key:
    """Where an entry lives: ``namespace`` (e.g. a site or a tenant), ``name`` (e.g. a URL),
    ``scope`` (e.g. ``public``) and ``user`` (``""`` when the entry is not per user).

    Keys are compared and hashed by their fields; no field is ever joined into a string
    that decides which value a caller gets.
    """

    namespace: str
    name: str
    scope: str = "public"
    user: str = ""

    @property
    def coalesce_key(self) -> str:
        """The key as an unambiguous string, ``["namespace","name","scope","user"]`` (JSON):
        what logs show and what the fleet-wide lock id is hashed from."""
        try:
            return _cached_coalesce_key(self)
        except TypeError:  # a field that does not even hash: a key about to be refused
            return _coalesce_key(self)

    def with_name(self, name: str) -> Key:
        """The same key with another name (a candidate)."""
        return Key(self.namespace, name, self.scope, self.user)


def _coalesce_key(key: Key) -> str:
    return compact([key.namespace, key.name, key.scope, key.user])


# A miss names its key in its lock, its log context and its messages, and a key's hash costs
# far less than its JSON. Keys are immutable; the cache is bounded (and thread-safe).
_cached_coalesce_key = functools.lru_cache(maxsize=4096)(_coalesce_key)


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached artifact: ``value`` (JSON, or any picklable value in a store whose codec
    is pickle). ``error`` is a JSON error document, or None for a success;
    ``created_at`` is milliseconds since the epoch; ``alias`` is another name the entry
    answers to (e.g. the URL without its extension). ``expires_at`` (ms since the
    epoch) is when the value stops being fresh, ``stale_until`` when it stops being
    servable at all (the end of its stale window; None: never), and ``compute_ms`` how long
    computing it took. ``stored`` is False only for an answer a lookup returned without
    storing it (a result its producer marked not cacheable, or an error its caller asked
    not to persist); it is not compared."""

    key: Key
    value: JSON
    deps: tuple[str, ...] = ()
    error: JSON | None = None
    created_at: int | None = None
    alias: str | None = None
    diagnostics: JSON | None = None
    expires_at: int | None = None
    stale_until: int | None = None
    compute_ms: int | None = None
    stored: bool = field(default=True, compare=False)


@dataclass(frozen=True, slots=True)
class GenerationStamp:
    """A point in a store's invalidation history, taken in the same reading as a
    populate's re-read.

    ``names`` are what the populate is about (its key, candidates and alias). A write under
    the stamp is refused if, after ``point``, any of those names, the written entry's name,
    alias or deps, the namespace or the whole store was invalidated, or if the stamp is
    older than :data:`MAX_STAMP_AGE`. ``point`` is opaque to everyone but the store that
    made it (a Postgres snapshot and server time; a clock reading).
    """

    namespace: str
    names: tuple[str, ...]
    point: Any


@runtime_checkable
class Store(Protocol):
    """The contract every backend passes (``tests/test_store_contract.py``).

    Every method validates its input before any I/O (``fleetcache.stores.validation``)
    and leaves nothing open when it fails: any exception inside a transaction rolls it
    back. Driver errors leave as :class:`~fleetcache.errors.StoreError`.
    """

    @property
    def values(self) -> ValueCodec:
        """How this store encodes values, and which stored codecs it decodes (every row by
        its own codec's name)."""

    async def open(self) -> None:
        """Connect, and create or migrate the schema if needed. Idempotent."""

    async def close(self) -> None:
        """Release what ``open`` acquired (never a pool the caller passed in). Idempotent."""

    async def read(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """The entry stored under ``key``; if there is none and ``by_alias``, the most
        recently created entry of the key's namespace, scope and user whose alias is
        ``key.name``."""

    async def stamp_and_read(
        self, key: Key, names: Sequence[str], *, by_alias: bool = False
    ) -> tuple[GenerationStamp, Entry | None]:
        """A stamp for a populate of ``names`` and ``read(key, by_alias=...)``, taken so
        that the stamp is no later than the read: whatever the read did not see, a write
        under the stamp is checked against."""

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        notify: tuple[str, str] | None = None,
    ) -> bool:
        """Upsert ``entry``. With a ``stamp``, write only if nothing it depends on (the
        stamp's names, the entry's name, alias and deps, the namespace, the store) was
        invalidated since the stamp and the stamp is not too old; return False (and write
        nothing) otherwise. ``notify`` is a ``(channel, payload)`` NOTIFY to send in the
        write's own transaction when, and only when, the entry is written: it is delivered
        as the write commits, so whoever hears it finds the entry (stores without NOTIFY
        ignore it)."""

    async def invalidate(
        self, namespace: str, names: Sequence[str], *, expand: Expand | None = None
    ) -> list[str]:
        """Invalidate ``names`` of ``namespace`` and everything that depends on them, in one
        transaction serialised with every write of the namespace; return the names
        invalidated (the given ones first, each once).

        The closure starts from the given names, each expanded by ``expand``; an entry
        named or aliased by a name of the closure adds its name and alias, and an entry
        whose deps meet the closure adds its name and alias (expanded), until nothing new
        is found. Every name of the closure is marked, and every entry (all scopes and
        users) named or aliased by one is deleted."""

    async def clear_namespace(self, namespace: str) -> None:
        """Mark the namespace invalidated and delete its entries, in one transaction."""

    async def clear_all(self) -> None:
        """Mark the whole store invalidated and delete every entry, in one transaction."""

    async def purge_expired(self, before_ms: int, limit: int = 1000) -> int:
        """Delete up to ``limit`` entries whose ``stale_until`` is before ``before_ms`` (ms
        since the epoch): dead entries nobody may be served any more. Not an
        invalidation (nothing is marked). Return how many went."""


def guarded_names(entry: Entry, stamp: GenerationStamp) -> list[str]:
    """The names whose invalidation after ``stamp`` refuses writing ``entry``."""
    names = {*stamp.names, entry.key.name, *entry.deps}
    if entry.alias is not None:
        names.add(entry.alias)
    return sorted(names)
