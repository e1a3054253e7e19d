"""The near tier: entries served from process memory, coherent with the fleet's store.

A bounded, least-recently-used map from key to entry in front of the store. Every entry a
``get`` obtains from the store or from a computation is kept (errors too, still subject to
their TTL). What a caller receives is a fresh copy: the tier keeps each entry's JSON parts
as text and decodes them on every hit, so no caller can change what the next one gets (and
the text's size is what the optional byte bound counts).

Coherence — when may a near hit be served, and why is it never stale beyond the broadcast?

1. **Only while notifications flow.** A near hit is served only while this process's LISTEN
   connection is up (``liveness.connected``) and has not dropped since the tier last looked
   (``liveness.gaps`` unchanged). The hub counts a drop the moment it notices it, before it
   reconnects; the tier then empties itself before any further near hit, because
   invalidations broadcast meanwhile may never arrive.
2. **Every invalidation evicts.** This process's own invalidations (the closure the store
   returned: names, aliases, dependents) and every peer's broadcast (which carries the same
   closure) evict the entries named or aliased by those names, and — transitively — the
   entries here whose deps meet them. Clearing a namespace or everything empties those parts.
3. **A fill that raced an invalidation is not inserted.** A filler reads :meth:`epoch`
   *before* its store read; every eviction advances the epoch; :meth:`put` inserts only if
   the epoch (and the hub's gap count) has not moved and notifications flow. Why that is
   enough: an invalidation that committed after the filler's read is broadcast after its
   commit, so its eviction reaches this process either before the fill (the epoch moved:
   the fill is dropped) or after it (the eviction removes the filled entry).

So a read that begins after this process heard an invalidation never returns what that
invalidation removed. The remaining window is the broadcast's latency: between a peer's
commit and the moment its NOTIFY is handled here, a near hit may still return the old
value (the bench reports that window's p50/p99). Only Postgres has the broadcast, so the
tier exists only there; see ``fleetcache.open``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from fleetcache.errors import ConfigurationError
from fleetcache.stores.base import Entry, Key


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
    """One entry as the tier keeps it: the immutable parts, and the JSON parts as text."""

    entry: Entry  # value, error and diagnostics replaced by None; see `text`
    text: str  # json of [value, error, diagnostics]

    def copy(self) -> Entry:
        value, error, diagnostics = json.loads(self.text)
        return dataclasses.replace(self.entry, value=value, error=error, diagnostics=diagnostics)


class NearCache:
    """The near tier (see the module docstring). ``max_entries`` bounds it by count and
    ``max_bytes`` (optional) by the size of the kept JSON text; the least recently used
    entries go first."""

    def __init__(
        self, liveness: Liveness, *, max_entries: int, max_bytes: int | None = None
    ) -> None:
        if max_entries < 1:
            raise ConfigurationError(f"the near tier needs max_entries >= 1, got {max_entries}")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigurationError(f"near max_bytes must be >= 1, got {max_bytes}")
        self._liveness = liveness
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Everything below is written and read only on the event loop, never across an
        # await (every method is synchronous): no lock. _entries is the LRU order; the
        # indexes map what invalidations name to the keys they must evict.
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

    def get(self, key: Key, *, by_alias: bool = False) -> Entry | None:
        """A copy of the kept entry for ``key`` (or, with ``by_alias``, of one aliased by
        its name), or None; never while notifications may have been missed."""
        if not self._live():
            self._stats["near_misses"] += 1
            return None
        kept = self._entries.get(key)
        if kept is None and by_alias:
            kept = self._aliased(key)
        if kept is None:
            self._stats["near_misses"] += 1
            return None
        self._entries.move_to_end(kept.entry.key)
        self._stats["near_hits"] += 1
        return kept.copy()

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
        if not self._live() or epoch != self._epoch:
            self._stats["near_fills_dropped"] += 1
            return False
        try:
            text = json.dumps([entry.value, entry.error, entry.diagnostics], separators=(",", ":"))
        except (TypeError, ValueError):  # a value a codec would not let through the store
            self._stats["near_fills_dropped"] += 1
            return False
        key = entry.key
        if key in self._entries:
            self._remove(key)
        kept = _Kept(dataclasses.replace(entry, value=None, error=None, diagnostics=None), text)
        self._entries[key] = kept
        self._bytes += len(text)
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
        self._epoch += 1
        keys = list(self._by_namespace.get(namespace, ()))
        for key in keys:
            self._remove(key)
        self._stats["near_evicted_invalidation"] += len(keys)
        return len(keys)

    def clear(self) -> int:
        """Evict everything (every entry may be stale); return how many went."""
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
        self._bytes -= len(kept.text)
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
        """The size of the JSON text kept, in characters."""
        return self._bytes

    def stats(self) -> dict[str, int]:
        """Counters: near hits and misses, fills kept and dropped (raced an eviction),
        evictions by cause (lru, invalidation, gap), and the current entries and bytes."""
        return {**self._stats, "near_entries": len(self._entries), "near_bytes": self._bytes}


def _discard(index: dict[Any, set[Key]], where: Any, key: Key) -> None:
    keys = index.get(where)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[where]
