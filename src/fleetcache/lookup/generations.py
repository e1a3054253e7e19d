"""In-process generation counters: global, per namespace, per (namespace, name)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Snapshot:
    """When a computation began, as a reading of the bump clock, and what it is about."""

    namespace: str
    names: tuple[str, ...]
    epoch: int


class Generations:
    """Invalidations seen by this process (made here, or replayed from other processes by
    the invalidation listener).

    Every bump advances one clock (``epoch``) and records, for what it bumped, the epoch it
    happened at; a snapshot is just the clock's reading, so taking one costs a hit nothing.
    Per-target counts are kept beside, for observers. Written by the ``bump_*`` methods and
    read by ``snapshot``/``changed``/``value``, all on the event loop's thread and never
    across an await: no lock is needed. Per-name entries exist only for names ever
    invalidated, so memory grows with distinct invalidated names.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self._global_at = 0
        self._namespace_at: dict[str, int] = {}
        self._name_at: dict[tuple[str, str], int] = {}
        self._counts: dict[tuple[str | None, str | None], int] = {}

    def snapshot(self, namespace: str, names: Iterable[str], epoch: int | None = None) -> Snapshot:
        """A snapshot for ``names`` of ``namespace`` as of ``epoch`` (default: now)."""
        return Snapshot(
            namespace, tuple(dict.fromkeys(names)), self.epoch if epoch is None else epoch
        )

    def changed(self, snapshot: Snapshot) -> bool:
        """Whether anything ``snapshot`` is about was invalidated since it was taken."""
        since = snapshot.epoch
        if self.epoch == since:
            return False
        ns = snapshot.namespace
        return (
            self._global_at > since
            or self._namespace_at.get(ns, 0) > since
            or any(self._name_at.get((ns, name), 0) > since for name in snapshot.names)
        )

    def bump_names(self, namespace: str, names: Iterable[str]) -> None:
        """Invalidate ``names`` of ``namespace``."""
        self.epoch += 1
        for name in names:
            self._name_at[namespace, name] = self.epoch
            self._count(namespace, name)

    def bump_namespace(self, namespace: str) -> None:
        """Invalidate all of ``namespace``."""
        self.epoch += 1
        self._namespace_at[namespace] = self.epoch
        self._count(namespace, None)

    def bump_global(self) -> None:
        """Invalidate everything."""
        self.epoch += 1
        self._global_at = self.epoch
        self._count(None, None)

    def _count(self, namespace: str | None, name: str | None) -> None:
        self._counts[namespace, name] = self._counts.get((namespace, name), 0) + 1

    def value(self, namespace: str | None = None, name: str | None = None) -> int:
        """How many times something was invalidated: everything (no arguments), a
        namespace as a whole, or one name of it."""
        return self._counts.get((namespace, name), 0)
