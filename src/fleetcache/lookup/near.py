"""The near tier: a bounded, least-recently-used copy of entries in process memory, kept
coherent with the store by the fleet's invalidation broadcast and safe from any thread.
A caller gets a fresh copy of a value (it is kept as its serializer's bytes). When a near
hit may be served is argued in ``docs/design.md`` ("Near-tier coherence")."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from fleetcache.errors import ConfigurationError
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.codecs import JSON_VALUES, ValueCodec


class Liveness(Protocol):
    """What the tier needs to know about the notification connection (the hub)."""

    @property
    def connected(self) -> bool:
        """Whether notifications are flowing right now."""

    @property
    def gaps(self) -> int:
        """How many times the connection was lost so far."""


@dataclass(frozen=True, slots=True)
class _Kept:
    """One entry as the tier keeps it: the immutable parts, the value's bytes, and error
    and diagnostics as JSON text (None when both are None, the common case)."""

    entry: Entry  # value, error and diagnostics replaced by None; see below
    value: bytes  # the value as the store's serializer made it
    rest: str | None  # json of [error, diagnostics]

    @property
    def size(self) -> int:
        return len(self.value) + (0 if self.rest is None else len(self.rest))

    def copy(self, values: ValueCodec) -> Entry:
        if self.rest is None:
            return dataclasses.replace(self.entry, value=values.loads(self.value))
        error, diagnostics = json.loads(self.rest)
        return dataclasses.replace(
            self.entry, value=values.loads(self.value), error=error, diagnostics=diagnostics
        )


class NearCache:
    """The near tier (see docs/design.md, "Near-tier coherence"). ``max_entries`` bounds it
    by count and ``max_bytes`` (optional) by the size of what it keeps; the least recently
    used entries go first. ``values`` serializes the kept values: the store's codec (its
    compression step aside)."""

    def __init__(
        self,
        liveness: Liveness,
        *,
        max_entries: int,
        max_bytes: int | None = None,
        values: ValueCodec = JSON_VALUES,
    ) -> None:
        if max_entries < 1:
            raise ConfigurationError(f"the near tier needs max_entries >= 1, got {max_entries}")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigurationError(f"near max_bytes must be >= 1, got {max_bytes}")
        self._liveness = liveness
        self._values = values
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Everything below is written by the event loop (fills, evictions) and by the sync
        # API's callers (fills after a store read on their thread), and read and reordered
        # by every thread that serves a hit: each method holds _lock from start to end
        # (never across an await, never while decoding a copy), so a fill checks the epoch
        # and an eviction bumps it atomically. _entries is the LRU order; the indexes map what
        # invalidations name to the keys they must evict.
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, _Kept] = OrderedDict()
        self._by_name: dict[tuple[str, str], set[Key]] = {}
        self._by_alias: dict[tuple[str, str], set[Key]] = {}
        self._by_dep: dict[tuple[str, str], set[Key]] = {}
        self._by_namespace: dict[str, set[Key]] = {}
        self._bytes = 0
        self._epoch = 0
        self._gaps_seen = liveness.gaps
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "near_hits",
                "near_misses",
                "near_fills",
                "near_fills_dropped",
                "near_evicted_lru",
                "near_evicted_invalidation",
                "near_evicted_gap",
            ),
            0,
        )

    # ------------------------------------------------------------------ reading

    def epoch(self) -> int:
        """Read before a store read whose result may be :meth:`put` here."""
        return self._epoch

    def get(self, key: Key, *, by_alias: bool = False, count_miss: bool = True) -> Entry | None:
        """A copy of the kept entry for ``key`` (or, with ``by_alias``, of one aliased by
        its name), or None; never while notifications may have been missed. A miss is not
        counted with ``count_miss=False`` (a probe whose caller asks again)."""
        with self._lock:
            kept = None
            if self._live():
                kept = self._entries.get(key)
                if kept is None and by_alias:
                    kept = self._aliased(key)
            if kept is None:
                if count_miss:
                    self._stats["near_misses"] += 1
                return None
            self._entries.move_to_end(kept.entry.key)
            self._stats["near_hits"] += 1
        return kept.copy(self._values)

    def count_miss(self) -> None:
        """Count the miss of a probe (``get(..., count_miss=False)``) whose caller then
        answered from the store without asking again."""
        with self._lock:
            self._stats["near_misses"] += 1

    def _aliased(self, key: Key) -> _Kept | None:
        for candidate in self._by_alias.get((key.namespace, key.name), ()):
            if (candidate.scope, candidate.user) == (key.scope, key.user):
                return self._entries[candidate]
        return None

    def _live(self) -> bool:
        """Whether near hits may be served; empties the tier after a connection drop."""
        gaps = self._liveness.gaps
        if gaps != self._gaps_seen:
            self._gaps_seen = gaps
            self._stats["near_evicted_gap"] += len(self._entries)
            self._clear()
        return self._liveness.connected

    # ------------------------------------------------------------------ filling

    def put(self, entry: Entry, *, epoch: int) -> bool:
        """Keep ``entry`` (as stored) unless an eviction happened since ``epoch`` was read
        or notifications may have been missed; return whether it was kept."""
        # Serialized before the lock: the value is the caller's, and this may take a while.
        try:
            value = self._values.dumps(entry.value)
            rest = None
            if entry.error is not None or entry.diagnostics is not None:
                rest = json.dumps([entry.error, entry.diagnostics], separators=(",", ":"))
        except Exception:  # noqa: BLE001 - a value that does not serialize is just not kept
            with self._lock:
                self._stats["near_fills_dropped"] += 1
            return False
        kept = _Kept(
            dataclasses.replace(entry, value=None, error=None, diagnostics=None), value, rest
        )
        with self._lock:
            return self._put(kept, epoch)

    def _put(self, kept: _Kept, epoch: int) -> bool:
        if not self._live() or epoch != self._epoch:
            self._stats["near_fills_dropped"] += 1
            return False
        entry = kept.entry
        key = entry.key
        if key in self._entries:
            self._remove(key)
        self._entries[key] = kept
        self._bytes += kept.size
        ns = key.namespace
        self._by_name.setdefault((ns, key.name), set()).add(key)
        if entry.alias is not None:
            self._by_alias.setdefault((ns, entry.alias), set()).add(key)
        for dep in entry.deps:
            self._by_dep.setdefault((ns, dep), set()).add(key)
        self._by_namespace.setdefault(ns, set()).add(key)
        self._stats["near_fills"] += 1
        while len(self._entries) > self.max_entries or (
            self.max_bytes is not None and self._bytes > self.max_bytes and len(self._entries) > 1
        ):
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self._stats["near_evicted_lru"] += 1
        return key in self._entries

    # ------------------------------------------------------------------ evicting

    def evict_names(self, namespace: str, names: Iterable[str]) -> int:
        """Evict the entries of ``namespace`` named or aliased by ``names``, and those whose
        deps meet them, transitively; return how many went."""
        with self._lock:
            return self._evict_names(namespace, names)

    def _evict_names(self, namespace: str, names: Iterable[str]) -> int:
        self._epoch += 1
        frontier = list(dict.fromkeys(names))
        seen = set(frontier)
        evicted = 0
        while frontier:
            name = frontier.pop()
            doomed = (
                self._by_name.get((namespace, name), set())
                | self._by_alias.get((namespace, name), set())
                | self._by_dep.get((namespace, name), set())
            )
            for key in doomed:
                kept = self._entries.get(key)
                if kept is None:
                    continue
                for more in (key.name, kept.entry.alias):
                    if more is not None and more not in seen:
                        seen.add(more)
                        frontier.append(more)
                self._remove(key)
                evicted += 1
        self._stats["near_evicted_invalidation"] += evicted
        return evicted

    def evict_namespace(self, namespace: str) -> int:
        """Evict every entry of ``namespace``; return how many went."""
        with self._lock:
            self._epoch += 1
            keys = list(self._by_namespace.get(namespace, ()))
            for key in keys:
                self._remove(key)
            self._stats["near_evicted_invalidation"] += len(keys)
            return len(keys)

    def clear(self) -> int:
        """Evict everything (every entry may be stale); return how many went."""
        with self._lock:
            count = len(self._entries)
            self._stats["near_evicted_invalidation"] += count
            self._clear()
            return count

    def _clear(self) -> None:
        self._epoch += 1
        self._entries.clear()
        self._by_name.clear()
        self._by_alias.clear()
        self._by_dep.clear()
        self._by_namespace.clear()
        self._bytes = 0

    def _remove(self, key: Key) -> None:
        kept = self._entries.pop(key)
        self._bytes -= kept.size
        ns = key.namespace
        _discard(self._by_name, (ns, key.name), key)
        if kept.entry.alias is not None:
            _discard(self._by_alias, (ns, kept.entry.alias), key)
        for dep in kept.entry.deps:
            _discard(self._by_dep, (ns, dep), key)
        _discard(self._by_namespace, ns, key)

    # ------------------------------------------------------------------ observing

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """The size of what is kept: the values' bytes and the other parts' JSON text."""
        return self._bytes

    def stats(self) -> dict[str, int]:
        """Counters: near hits and misses, fills kept and dropped (raced an eviction),
        evictions by cause (lru, invalidation, gap), and the current entries and bytes."""
        with self._lock:
            return {**self._stats, "near_entries": len(self._entries), "near_bytes": self._bytes}


def _discard(index: dict[Any, set[Key]], where: Any, key: Key) -> None:
    keys = index.get(where)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[where]
