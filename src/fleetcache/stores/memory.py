"""The in-memory store: one process, no persistence; passes the same contract as the others."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence

from fleetcache.stores.base import (
    Entry,
    GenerationStamp,
    Key,
    guarded_names,
    stamp_names,
    validate_entry,
)

_GLOBAL = ("g", "", "")


class MemoryStore:
    """A :class:`~fleetcache.stores.base.Store` kept in a dict.

    Values are deep-copied in and out, so callers never share mutable state with the store.
    """

    def __init__(self) -> None:
        # Written and read only by this store's methods, on the event loop's thread; each
        # method runs without awaiting, so no lock is needed.
        self._entries: dict[Key, Entry] = {}
        # The invalidation clock, and for each (kind, namespace, name) the clock reading of
        # its last invalidation.
        self._clock = 0
        self._bumped: dict[tuple[str, str, str], int] = {}

    async def open(self) -> None:
        """Nothing to connect; present for the contract."""

    async def close(self) -> None:
        """Nothing to release; present for the contract."""

    async def read(self, key: Key, *, session: object | None = None) -> Entry | None:
        """The entry named or aliased ``key.name`` under the key's namespace, scope and user."""
        await asyncio.sleep(0)
        found = self._entries.get(key)
        if found is None:
            found = next(
                (
                    entry
                    for stored_key, entry in self._entries.items()
                    if entry.alias == key.name
                    and (stored_key.namespace, stored_key.scope, stored_key.user)
                    == (key.namespace, key.scope, key.user)
                ),
                None,
            )
        return copy.deepcopy(found)

    async def stamp(
        self, namespace: str, names: Sequence[str], *, session: object | None = None
    ) -> GenerationStamp:
        """Now, as a reading of the invalidation clock."""
        await asyncio.sleep(0)
        return GenerationStamp(namespace, stamp_names(names), self._clock)

    async def write(
        self,
        entry: Entry,
        *,
        stamp: GenerationStamp | None = None,
        session: object | None = None,
    ) -> bool:
        """Upsert ``entry`` unless ``stamp`` is given and something the entry depends on was
        invalidated after it."""
        validate_entry(entry)
        await asyncio.sleep(0)
        if stamp is not None:
            ns = stamp.namespace
            marks = [_GLOBAL, ("n", ns, ""), *(("k", ns, n) for n in guarded_names(entry, stamp))]
            if any(self._bumped.get(mark, 0) > int(stamp.point) for mark in marks):
                return False
        self._entries[entry.key] = copy.deepcopy(entry)
        return True

    async def delete_names(self, namespace: str, names: Sequence[str]) -> None:
        """Delete entries of ``namespace`` named or aliased by ``names``; bump each name."""
        await asyncio.sleep(0)
        wanted = set(names)
        self._clock += 1
        for name in wanted:
            self._bumped["k", namespace, name] = self._clock
        for key, entry in list(self._entries.items()):
            if key.namespace == namespace and (key.name in wanted or entry.alias in wanted):
                del self._entries[key]

    async def delete_namespace(self, namespace: str) -> None:
        """Delete every entry of ``namespace``; bump its counter."""
        await asyncio.sleep(0)
        self._bump(("n", namespace, ""))
        for key in [key for key in self._entries if key.namespace == namespace]:
            del self._entries[key]

    async def delete_all(self) -> None:
        """Delete every entry; bump the global counter."""
        await asyncio.sleep(0)
        self._bump(_GLOBAL)
        self._entries.clear()

    async def find_dependents(self, namespace: str, names: Sequence[str]) -> list[str]:
        """Names of entries of ``namespace`` whose deps meet ``names``."""
        await asyncio.sleep(0)
        wanted = set(names)
        return sorted(
            {
                key.name
                for key, entry in self._entries.items()
                if key.namespace == namespace and wanted.intersection(entry.deps)
            }
        )

    def _bump(self, mark: tuple[str, str, str]) -> None:
        self._clock += 1
        self._bumped[mark] = self._clock
