"""A bounded table: ``max_entries`` and/or ``max_bytes`` (value bytes) per store, and how
much one eviction removes. Every store evicts the *least recently written* entries first
(smallest ``created_at``), in batches, each taking the entries depending on it along; an
eviction is a delete, never a mark (see docs/design.md, "A bounded table")."""

from __future__ import annotations

from dataclasses import dataclass

from fleetcache.errors import ConfigurationError

#: An eviction brings the table this far under its bound (a fraction of the bound), so
#: it runs once per so many writes rather than on every write.
HEADROOM = 0.05
#: The most entries one eviction statement picks (dependents come on top).
EVICT_BATCH = 1_000


@dataclass(frozen=True, slots=True)
class Bounds:
    """``max_entries`` (entries) and ``max_bytes`` (value bytes, as stored: after the
    codec and any compression); None: unbounded."""

    max_entries: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"{name} must be a positive int or None, got {value!r}")

    @property
    def bounded(self) -> bool:
        """Whether any bound is set."""
        return self.max_entries is not None or self.max_bytes is not None

    @property
    def check_every(self) -> int:
        """How many writes of one process may pass between two looks at the table's
        size: 1% of ``max_entries`` (so a fleet of ten writing at once overshoots by at
        most a tenth), 16 for a bound on bytes alone."""
        if self.max_entries is None:
            return 16
        return max(1, self.max_entries // 100)

    def next_check(self, entries: int, nbytes: int) -> int:
        """:attr:`check_every` once a look found ``entries`` entries holding ``nbytes``
        value bytes: for a bound on bytes, as many entries of their mean size as make 1% of
        it (so there too a fleet of ten writing at once overshoots by a tenth at most)."""
        every = self.check_every
        if self.max_bytes is not None and entries > 0 and nbytes > 0:
            by_bytes = max(1, self.max_bytes * entries // (100 * nbytes))
            every = by_bytes if self.max_entries is None else min(every, by_bytes)
        return every

    def over(self, entries: int, nbytes: int) -> bool:
        """Whether a table of ``entries`` entries and ``nbytes`` value bytes is over a bound."""
        return (self.max_entries is not None and entries > self.max_entries) or (
            self.max_bytes is not None and nbytes > self.max_bytes
        )

    def excess(self, entries: int, nbytes: int) -> int:
        """How many entries to evict from a table of that size (0: none): down to
        :data:`HEADROOM` under each bound that is exceeded (for bytes, in proportion to
        the mean entry's size), at most :data:`EVICT_BATCH`."""
        if not self.over(entries, nbytes) or entries <= 0:
            return 0
        want = 0
        if self.max_entries is not None and entries > self.max_entries:
            target = self.max_entries - max(1, int(self.max_entries * HEADROOM))
            want = entries - max(0, target)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            target_bytes = self.max_bytes - max(1, int(self.max_bytes * HEADROOM))
            mean = max(1.0, nbytes / entries)
            want = max(want, int((nbytes - max(0, target_bytes)) / mean) + 1)
        return max(1, min(want, EVICT_BATCH))
