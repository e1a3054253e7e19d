"""In-process generation counters: global, per namespace, per (namespace, name)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The counters a computation depends on, as they were when it began."""

    namespace: str
    names: tuple[str, ...]
    values: tuple[int, ...]


class Generations:
    """Counters bumped by invalidations in this process (and replayed from other
    processes by the invalidation listener).

    Written by the ``bump_*`` methods and read by ``snapshot``/``changed``, all on the
    event loop's thread and never across an await: no lock is needed. Per-name counters
    exist only for names ever invalidated, so memory grows with distinct invalidated names.
    """

    def __init__(self) -> None:
        self._global = 0
        self._namespaces: dict[str, int] = {}
        self._names: dict[tuple[str, str], int] = {}

    def snapshot(self, namespace: str, names: Iterable[str]) -> Snapshot:
        """The current counters for ``names`` of ``namespace``."""
        unique = tuple(dict.fromkeys(names))
        return Snapshot(namespace, unique, self._values(namespace, unique))

    def changed(self, snapshot: Snapshot) -> bool:
        """Whether any counter of ``snapshot`` moved since it was taken."""
        return self._values(snapshot.namespace, snapshot.names) != snapshot.values

    def _values(self, namespace: str, names: tuple[str, ...]) -> tuple[int, ...]:
        return (
            self._global,
            self._namespaces.get(namespace, 0),
            *(self._names.get((namespace, name), 0) for name in names),
        )

    def bump_names(self, namespace: str, names: Iterable[str]) -> None:
        """Invalidate ``names`` of ``namespace``."""
        for name in names:
            self._names[namespace, name] = self._names.get((namespace, name), 0) + 1

    def bump_namespace(self, namespace: str) -> None:
        """Invalidate all of ``namespace``."""
        self._namespaces[namespace] = self._namespaces.get(namespace, 0) + 1

    def bump_global(self) -> None:
        """Invalidate everything."""
        self._global += 1

    def value(self, namespace: str | None = None, name: str | None = None) -> int:
        """One counter: the global one, a namespace's, or a name's (for observers/tests)."""
        if namespace is None:
            return self._global
        if name is None:
            return self._namespaces.get(namespace, 0)
        return self._names.get((namespace, name), 0)
