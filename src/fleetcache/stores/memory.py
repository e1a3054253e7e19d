"""The in-memory store: one process, no persistence; it passes the same contract as the
others. Every method runs without an ``await``, so on the event loop each is atomic, and
every operation costs time in proportion to what it touches (entries are indexed by every
way they are looked up)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fleetcache.errors import ConfigurationError, InvalidInputError
from fleetcache.stores.base import (
    MARK_RETENTION,
    Entry,
    Expand,
    GenerationStamp,
    Key,
    guarded_names,
)
from fleetcache.stores.bounds import Bounds
from fleetcache.stores.closure import Closure
from fleetcache.stores.codecs import JSON_VALUES, ValueCodec
from fleetcache.stores.validation import (
    check_name,
    encode_entry,
    names_to_invalidate,
    stamped_names,
    validate_key,
)

#: The most old marks one invalidation prunes, besides twice the marks it sets.
PRUNE_BATCH = 10_000

_Mark = tuple[str, str, str]  # (kind, namespace, name)
_GLOBAL: _Mark = ("g", "", "")


@dataclass(frozen=True, slots=True)
class MemoryPoint:
    """What a memory stamp holds: the invalidation clock's reading and the time then."""

    seq: int
    taken_at: float


@dataclass(frozen=True, slots=True)
class _Stored:
    # An entry as stored: the encoded bytes and JSON text, decoded on every read, so no
    # caller ever shares a mutable value with the store (cheaper than a deep copy in and
    # out) and a read returns exactly what was written, as the other stores do.
    key: Key
    value: bytes
    codec: str
    deps: tuple[str, ...]
    error: str | None
    created_at: int | None
    alias: str | None
    diagnostics: str | None
    expires_at: int | None
    stale_until: int | None
    compute_ms: int | None
    order: int  # when it was written (ties of created_at: the later write wins)

    def entry(self, values: ValueCodec) -> Entry:
        return Entry(
            key=self.key,
            value=values.decode(self.key, self.codec, self.value),
            deps=self.deps,
            error=None if self.error is None else json.loads(self.error),
            created_at=self.created_at,
            alias=self.alias,
            diagnostics=None if self.diagnostics is None else json.loads(self.diagnostics),
            expires_at=self.expires_at,
            stale_until=self.stale_until,
            compute_ms=self.compute_ms,
        )


def _add(index: dict[Any, dict[Key, None]], at: Any, key: Key) -> None:
    index.setdefault(at, {})[key] = None


def _discard(index: dict[Any, dict[Key, None]], at: Any, key: Key) -> None:
    keys = index.get(at)
    if keys is not None:
        keys.pop(key, None)
        if not keys:
            del index[at]


class MemoryStore:
    """A :class:`~fleetcache.stores.base.Store` kept in dicts, for one process.

    ``mark_retention`` (seconds) is how long marks are kept; stamps older than half of it
    are refused. ``clock`` (monotonic seconds) may be replaced in tests. ``values``: how
    values are encoded (see :class:`~fleetcache.stores.codecs.ValueCodec`; JSON by default).
    ``max_entries``/``max_bytes`` (value bytes as encoded) bound the store: a write that
    takes it over a bound evicts the least recently written entries (and their dependents)
    until it is 5% under, in the same step, so the store never holds more than the bound.
    """

    def __init__(
        self,
        *,
        mark_retention: float = MARK_RETENTION,
        clock: Callable[[], float] = time.monotonic,
        values: ValueCodec = JSON_VALUES,
        max_entries: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if mark_retention <= 0:
            raise ConfigurationError(f"mark_retention must be positive, got {mark_retention}")
        self.values = values
        self.bounds = Bounds(max_entries, max_bytes)
        self._retention = float(mark_retention)
        self._max_age = self._retention / 2
        self._clock = clock
        # All state below is written and read only by this store's methods, on the event
        # loop's thread; no method awaits, so none can observe another half done.
        self._entries: dict[Key, _Stored] = {}
        self._by_alias: dict[tuple[str, str, str, str], dict[Key, None]] = {}
        self._by_ns_name: dict[tuple[str, str], dict[Key, None]] = {}
        self._by_ns_alias: dict[tuple[str, str], dict[Key, None]] = {}
        self._by_ns: dict[str, dict[Key, None]] = {}
        self._by_dep: dict[tuple[str, str], dict[Key, None]] = {}
        self._written = 0
        # Value bytes held, and (only when bounded) every key in the order last written,
        # oldest first (an OrderedDict: popping its oldest is O(1), where a dict's first
        # key is found by walking past every slot freed before it).
        self._bytes = 0
        self._order: OrderedDict[Key, None] | None = OrderedDict() if self.bounds.bounded else None
        # The invalidation clock, and for each mark the reading and time it was last set,
        # oldest first.
        self._seq = 0
        self._marks: OrderedDict[_Mark, tuple[int, float]] = OrderedDict()

    @property
    def mark_retention(self) -> float:
        """How long (seconds) marks are kept."""
        return self._retention

    @property
    def mark_count(self) -> int:
        """How many marks are kept now."""
        return len(self._marks)

    async def table_size(self) -> tuple[int, int]:
        """The entries and value bytes held now."""
        return len(self._entries), self._bytes

    async def open(self) -> None:
        """Nothing to connect; present for the contract."""

    async def close(self) -> None:
        """Nothing to release; present for the contract (the entries stay)."""

    # ------------------------------------------------------------------------- reads

    def _find(self, key: Key, by_alias: bool) -> Entry | None:
        stored = self._entries.get(key)
        if stored is None and by_alias:
            aliased = self._by_alias.get((key.namespace, key.scope, key.user, key.name))
            if aliased:
                stored = max(
                    (self._entries[k] for k in aliased),
                    key=lambda s: (s.created_at is not None, s.created_at or 0, s.order),
                )
        return None if stored is None else stored.entry(self.values)

    async def read(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """The entry under ``key``, else (with ``by_alias``) the most recently created one
        aliased ``key.name`` in the key's namespace, scope and user."""
        validate_key(key)
        return self._find(key, by_alias)

    async def stamp_and_read(
        self, key: Key, names: Sequence[str], *, by_alias: bool = False
    ) -> tuple[GenerationStamp, Entry | None]:
        """A stamp (the clock's reading) and ``read(key, by_alias=...)``, in one step."""
        stamped = stamped_names(key, names)
        point = MemoryPoint(self._seq, self._clock())
        return GenerationStamp(key.namespace, stamped, point), self._find(key, by_alias)

    # ------------------------------------------------------------------------ writes

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        notify: tuple[str, str] | None = None,
    ) -> bool:
        """Upsert ``entry``; with ``stamp``, only if nothing it depends on was invalidated
        since and the stamp is younger than half the retention."""
        encoded = encode_entry(entry, self.values)
        key = entry.key
        if stamp is not None and not self._stamp_holds(stamp, entry):
            return False
        old = self._entries.get(key)
        if old is not None:
            self._unindex(old)
        self._written += 1
        stored = _Stored(key=key, order=self._written, **encoded.columns())
        self._entries[key] = stored
        ns = key.namespace
        _add(self._by_ns, ns, key)
        _add(self._by_ns_name, (ns, key.name), key)
        if stored.alias is not None:
            _add(self._by_alias, (ns, key.scope, key.user, stored.alias), key)
            _add(self._by_ns_alias, (ns, stored.alias), key)
        for dep in stored.deps:
            _add(self._by_dep, (ns, dep), key)
        self._bytes += len(stored.value)
        if self._order is not None:
            self._order[key] = None
            self._evict()
        return True

    def _evict(self) -> None:
        # Evict while over a bound: the oldest written first, each with the entries that
        # depend on it (transitively), which would otherwise outlive an invalidation of
        # what it depended on (docs/design.md, "A bounded table").
        order = self._order
        assert order is not None
        while order and self.bounds.over(len(self._entries), self._bytes):
            want = self.bounds.excess(len(self._entries), self._bytes)
            victims = [order.popitem(last=False)[0] for _ in range(min(want, len(order)))]
            self._delete(self._with_dependents(victims))

    def _with_dependents(self, victims: list[Key]) -> list[Key]:
        doomed = dict.fromkeys(victims)
        frontier = victims
        while frontier:
            found: list[Key] = []
            for key in frontier:
                stored = self._entries[key]
                for name in (key.name, stored.alias):
                    if name is None:
                        continue
                    for dependent in self._by_dep.get((key.namespace, name), ()):
                        if dependent not in doomed:
                            doomed[dependent] = None
                            found.append(dependent)
            frontier = found
        return list(doomed)

    def _stamp_holds(self, stamp: GenerationStamp, entry: Entry) -> bool:
        key = entry.key
        if stamp.namespace != key.namespace:
            raise InvalidInputError(
                f"a stamp of namespace {stamp.namespace!r} cannot guard a write of "
                f"{key.coalesce_key}"
            )
        point = stamp.point
        if not isinstance(point, MemoryPoint):
            raise InvalidInputError(
                f"the stamp for {key.coalesce_key} was not made by a memory store"
            )
        if self._clock() - point.taken_at > self._max_age:
            return False
        ns = key.namespace
        marks: Iterable[_Mark] = (
            _GLOBAL,
            ("n", ns, ""),
            *(("k", ns, name) for name in guarded_names(entry, stamp)),
        )
        for mark in marks:
            set_at = self._marks.get(mark)
            if set_at is not None and set_at[0] > point.seq:
                return False
        return True

    def _unindex(self, stored: _Stored) -> None:
        key = stored.key
        ns = key.namespace
        _discard(self._by_ns, ns, key)
        _discard(self._by_ns_name, (ns, key.name), key)
        if stored.alias is not None:
            _discard(self._by_alias, (ns, key.scope, key.user, stored.alias), key)
            _discard(self._by_ns_alias, (ns, stored.alias), key)
        for dep in stored.deps:
            _discard(self._by_dep, (ns, dep), key)
        self._bytes -= len(stored.value)
        if self._order is not None:
            self._order.pop(key, None)

    def _delete(self, keys: Iterable[Key]) -> None:
        pop = self._entries.pop
        unindex = self._unindex
        for key in list(keys):
            stored = pop(key, None)
            if stored is not None:
                unindex(stored)

    async def purge_expired(self, before_ms: int, limit: int = 1000) -> int:
        """Delete up to ``limit`` entries whose stale window ended before ``before_ms``
        (ms since the epoch); return how many went. (A scan: the memory store is for one
        process and tests; purging is rare.) Not an invalidation: nothing is marked."""
        dead = [
            key
            for key, stored in self._entries.items()
            if stored.stale_until is not None and stored.stale_until < before_ms
        ][:limit]
        self._delete(dead)
        return len(dead)

    # ----------------------------------------------------------------- invalidations

    async def invalidate(
        self, namespace: str, names: Sequence[str], *, expand: Expand | None = None
    ) -> list[str]:
        """Invalidate ``names`` and every entry depending on them, in one step."""
        given = names_to_invalidate(namespace, names, expand)
        if not given:
            return []
        # The closure first: expand may raise, and then nothing has changed. Each entry is
        # looked at once: the first time a round reaches it, it adds its name and alias;
        # when one of those is a frontier name, it is doomed (named or aliased by a name of
        # the closure), and the rounds found every such entry, so the delete needs no
        # second search. Cost: in proportion to the names and entries reached.
        closure = Closure(given, expand)
        entries = self._entries
        by_name, by_alias, by_dep = self._by_ns_name, self._by_ns_alias, self._by_dep
        reached: set[Key] = set()
        doomed: list[Key] = []
        frontier = list(closure.names)
        while frontier:
            found: list[str | None] = []
            for name in frontier:
                at = (namespace, name)
                for index in (by_name, by_alias):
                    for key in index.get(at, ()):
                        if key not in reached:
                            reached.add(key)
                            found += (key.name, entries[key].alias)
                        doomed.append(key)
                for key in by_dep.get(at, ()):
                    if key not in reached:
                        reached.add(key)
                        found += (key.name, entries[key].alias)
            frontier = closure.add(found)
        self._mark("k", namespace, closure.names)
        self._delete(doomed)
        return closure.names

    async def clear_namespace(self, namespace: str) -> None:
        """Mark the namespace invalidated and delete its entries."""
        check_name("the namespace to clear", namespace, allow_empty=False)
        self._mark("n", namespace, [""])
        self._delete(self._by_ns.get(namespace, ()))

    async def clear_all(self) -> None:
        """Mark the whole store invalidated and delete every entry."""
        self._mark("g", "", [""])
        self._entries.clear()
        self._bytes = 0
        if self._order is not None:
            self._order.clear()
        for index in (self._by_alias, self._by_ns_name, self._by_ns_alias, self._by_dep):
            index.clear()
        self._by_ns.clear()

    def _mark(self, kind: str, namespace: str, names: Sequence[str]) -> None:
        now = self._clock()
        # Prune first: at most a bounded batch, oldest first, all older than the retention.
        cutoff = now - self._retention
        for _ in range(PRUNE_BATCH + 2 * len(names)):
            if not self._marks:
                break
            oldest = next(iter(self._marks.values()))
            if oldest[1] >= cutoff:
                break
            self._marks.popitem(last=False)
        self._seq += 1
        for name in names:
            mark = (kind, namespace, name)
            self._marks.pop(mark, None)  # re-set marks move to the young end
            self._marks[mark] = (self._seq, now)
